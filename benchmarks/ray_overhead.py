"""One Ray Train + DeepSpeed worker against the local path, same model, same config, same micro-batch, one run each.

    python benchmarks/ray_overhead.py [--steps 30] [--micro-batch 16] [--studies 200] [--zero-stage 2] [--threads 1]

Targets: step time at most 1.15x the local path's; time to the first optimizer step within 30 s.

Both runtimes run `training.loop.train` with log_every=1, so both are measured by the same instrument: the loop's
per-step wall time (samples_per_step / train/samples_per_s, from MLflow), which includes waiting for the batch.
The local path decodes its batches in the training process; the Ray worker gets them from Ray Data tasks running
ahead of it (on a 2-core machine those tasks compete with training for the same cores). Steady state = the median
step of each stage, excluding the first 3 steps of the run and the first 2 of Stage B (pipeline start-up).
Time to first step = from the call that starts the run (cluster start included for Ray: `ray.init` happens inside
the timed region) to the first optimizer step's metric timestamp; the Ray number is also given from the moment
the trainer starts, i.e. on an already running cluster.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def config(data: Path, out: Path, args: argparse.Namespace, **extra):
    from launcher.config import load_config

    sets = {
        "data.root": str(data), "data.synth_if_missing": "false", "output.dir": str(out),
        "train.max_steps": args.steps, "train.micro_batch_size": args.micro_batch, "train.grad_accum": 1,
        "train.warmup_steps": 3, "train.log_every": 1, "train.eval_every": 0, "train.save_every": 0,
        "train.val_batches": 0, "deepspeed.zero_stage": args.zero_stage, "ray.num_workers": 1,
        "ray.cpus_per_worker": float(args.threads), "ray.name": "bench", **extra,
    }
    return load_config(REPO / "configs" / "tiny.yaml", [f"{k}={v}" for k, v in sets.items()])


def step_metrics(summary: dict, t0_wall: float, samples_per_step: int) -> dict:
    """Per-stage steady-state step time (s) and seconds from t0 to the first step, from the run's MLflow metrics."""
    from mlflow import MlflowClient

    client = MlflowClient(summary["tracking_uri"])
    sps = {m.step: m for m in client.get_metric_history(summary["mlflow_run_id"], "train/samples_per_s")}
    stage = {m.step: m.value for m in client.get_metric_history(summary["mlflow_run_id"], "train/stage")}
    out: dict = {"first_step_s": sps[1].timestamp / 1000.0 - t0_wall}
    for name, code, first in (("A", 0.0, 4), ("B", 1.0, summary["stage_switch_step"] + 3)):
        steps = [s for s in sps if stage.get(s) == code and s >= first]
        out[name] = statistics.median(samples_per_step / sps[s].value for s in steps) if steps else math.nan
    return out


def run_local_side(data: Path, work: Path, args) -> dict:
    from launcher.local import run_local

    cfg = config(data, work / "local", args)
    t0 = time.time()
    summary = run_local(cfg, device="cpu", show_progress=False)
    return step_metrics(summary, t0, args.micro_batch)


def run_ray_side(data: Path, work: Path, args) -> dict:
    import ray

    from launcher.ray_train import run_ray

    cfg = config(data, work / "ray", args)
    t0 = time.time()
    ray_temp = tempfile.mkdtemp(prefix="rb", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    ray.init(address="local", num_cpus=args.threads + 2, include_dashboard=False,
             _node_ip_address="127.0.0.1", _temp_dir=ray_temp)
    t_cluster = time.time()
    try:
        summary = run_ray(cfg)
    finally:
        ray.shutdown()
        shutil.rmtree(ray_temp, ignore_errors=True)
    m = step_metrics(summary, t0, args.micro_batch)
    m["first_step_on_running_cluster_s"] = m["first_step_s"] - (t_cluster - t0)
    m["startup"] = {"ray.init": round(t_cluster - t0, 1), **(summary.get("startup_s") or {})}
    return m


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--micro-batch", type=int, default=16, help="default: configs/tiny.yaml's")
    p.add_argument("--studies", type=int, default=200)
    p.add_argument("--zero-stage", type=int, default=2, choices=[2, 3])
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads on both sides (= ray.cpus_per_worker); more threads than idle cores makes "
                        "OpenMP spin: on a busy 2-core machine 2 threads run ~7x slower than 1")
    args = p.parse_args()
    import torch

    torch.set_num_threads(args.threads)  # the local side; the Ray worker sets floor(ray.cpus_per_worker)

    from datasets_io.synth import write_synthetic

    work = Path(tempfile.mkdtemp(prefix="ray_overhead_"))
    data = work / "data"
    write_synthetic(data, args.studies, seed=0, image_size=(256, 256), progress=False)
    print(f"[bench] {args.steps} steps, micro-batch {args.micro_batch}, {args.threads} torch thread(s), "
          f"{os.cpu_count()} CPUs, work dir {work}")
    try:
        local = run_local_side(data, work, args)
        ray_m = run_ray_side(data, work, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("\n                          local        ray (1 worker, DeepSpeed ZeRO-%d)   ratio" % args.zero_stage)
    for stage in ("A", "B"):
        lo, ra = local[stage], ray_m[stage]
        print(f"step time, stage {stage} (s)   {lo:8.3f}     {ra:8.3f}                            {ra / lo:5.2f}x"
              f"   (target <= 1.15x)")
    print(f"time to first step (s)     {local['first_step_s']:8.1f}     {ray_m['first_step_s']:8.1f} "
          f"(cluster start included)   {ray_m['first_step_s'] / local['first_step_s']:5.2f}x   (target <= 30 s)")
    print(f"                                        {ray_m['first_step_on_running_cluster_s']:8.1f} "
          "(on a running cluster)")
    print("Ray time to first step, by phase (s): " + ", ".join(f"{k} {v}" for k, v in ray_m["startup"].items()))


if __name__ == "__main__":
    main()
