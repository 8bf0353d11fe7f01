"""One Ray Train + DeepSpeed worker against the local path, same model, same config, same micro-batch, one run each.

    python benchmarks/ray_overhead.py [--steps 30] [--micro-batch 16] [--studies 200] [--zero-stage 2] [--threads 1]
                                      [--skip-running-cluster]

Targets: step time at most 1.15x the local path's; time to the first optimizer step at most 1.3x a bare Ray Train
run's on the same machine (last line: `first step vs bare Ray Train: X.XXx`).

Both runtimes run `training.loop.train` with log_every=1, so both are measured by the same instrument: the loop's
per-step wall time (samples_per_step / train/samples_per_s, from MLflow), which includes waiting for the batch.
The local path decodes its batches in the training process; the Ray worker gets them from Ray Data tasks running
ahead of it (on a 2-core machine those tasks compete with training for the same cores). Steady state = the median
step of each stage, excluding the first 3 steps of the run and the first 2 of Stage B (pipeline start-up).
Each side is the command a user types (`launcher local` / `launcher ray`), run in a fresh process, so its imports
count, and the Ray side starts its own local cluster as `launcher ray` does without RAY_ADDRESS. Time to first
step = from starting that process to the first optimizer step's metric timestamp (local vs Ray: the same
instrument on both sides). Against the bare baseline, whose worker stamps the wall time right after its first
`optimizer.step()` and logs nothing, the launcher's moment is the same one: rank 0's end of its first optimizer step
(`first_step_wall_time` in its ray_ranks/rank0.json); its first MLflow log call comes after, and opens the tracking
store (~1 s on 2 cores; printed as `first_log` in the phases, and the ratio to the metric timestamp is printed
too). A second Ray run joins a cluster that is already up (RAY_ADDRESS, as under `ray job submit`) with the base
model from a directory, as in production: "on a running cluster". Both Ray numbers are broken down by phase
(process start, driver, Ray Train start, the worker's own set-up), and the CPU-seconds each process on the machine
used until the first one's first step are listed: on a small machine the start-up is bound by the Python processes
Ray starts at once, not by waiting.
The baseline is what any Ray Train job pays before it can step: a fresh Python process that starts its own local
Ray on 127.0.0.1 as `launcher ray` does (same logical CPUs, dashboard on), a bare `TorchTrainer` (Train V2) with the
same number of workers and CPUs per worker, a Ray Data dataset with as many rows as the launcher's training file,
each a pixel_values (3, S, S) float32 array and max_seq_len input ids (S and max_seq_len from configs/tiny.yaml),
and a Linear on the flattened input; time = from starting that process to the wall time its worker writes after
its first `optimizer.step()`. It runs after the launcher's own-cluster run, so both find their imports in the
page cache.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def overrides(data: Path, out: Path, args: argparse.Namespace, **extra) -> list[str]:
    sets = {
        "data.root": str(data),
        "data.synth_if_missing": "false",
        "output.dir": str(out),
        "train.max_steps": args.steps,
        "train.micro_batch_size": args.micro_batch,
        "train.grad_accum": 1,
        "train.warmup_steps": 3,
        "train.log_every": 1,
        "train.eval_every": 0,
        "train.save_every": 0,
        "train.val_batches": 0,
        "deepspeed.zero_stage": args.zero_stage,
        "ray.num_workers": 1,
        "ray.cpus_per_worker": float(args.threads),
        "ray.name": "bench",
        # the tiny tower's pre-training is model work done once per base (the stand-in for a downloaded pretrained
        # tower), not start-up overhead: off on both sides, as the previous figures had none
        "model.tiny.vision_pretrain_steps": 0,
        **extra,
    }
    return [arg for k, v in sets.items() for arg in ("--set", f"{k}={v}")]


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


TRANSIENT = ("ray::IDLE", "setup_worker.py", "default_worker.py")  # a Ray worker process before it takes a role


class CpuSampler:
    """CPU-seconds per process, machine-wide, sampled every `every` s on a thread (psutil): where the cores went
    before the first step. A process is named by its title (Ray sets `ray::<Actor>.<method>`)."""

    def __init__(self, every: float = 0.5):
        import threading

        self.every, self.samples, self.names, self.driver_pid = every, [], {}, -1
        self.base = self._snapshot()
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _snapshot(self) -> dict[int, float]:
        import psutil

        cpu = {}
        for proc in psutil.process_iter(["pid", "cmdline", "name", "cpu_times"]):
            info = proc.info
            if info["cpu_times"] is None or info["pid"] == os.getpid():
                continue
            cpu[info["pid"]] = info["cpu_times"].user + info["cpu_times"].system
            name = "driver (launcher ray)" if info["pid"] == self.driver_pid else process_name(info)
            if name not in TRANSIENT or info["pid"] not in self.names:
                self.names[info["pid"]] = name
        return cpu

    def _run(self) -> None:
        while not self.stop_event.wait(self.every):
            self.samples.append((time.time(), self._snapshot()))

    def used_until(self, t_wall: float) -> dict[str, float]:
        """CPU-seconds per process name from the sampler's start to `t_wall` (the last sample before it)."""
        self.stop_event.set()
        self.thread.join()
        last = [cpu for t, cpu in self.samples if t <= t_wall][-1:] or [self.base]
        names = set(self.names.values())
        full = {n: max((m for m in names if m.startswith(n)), key=len) for n in names}  # a title read mid-write
        used: dict[str, float] = {}
        for pid, c in last[0].items():
            name = full.get(self.names.get(pid, "?"), "?")
            used[name] = used.get(name, 0.0) + c - self.base.get(pid, 0.0)
        return {k: v for k, v in sorted(used.items(), key=lambda kv: -kv[1]) if v >= 0.05}


def process_name(info: dict) -> str:
    cmd = info["cmdline"] or [info["name"] or "?"]
    if cmd[0].startswith("ray::"):
        return cmd[0].split(".")[0].split("(")[0].strip()  # ray::TrainController.run -> ray::TrainController
    script = next((Path(c).name for c in cmd[1:3] if c.endswith(".py")), None)
    return script or Path(cmd[0]).name


def run_cli(
    runtime: str,
    data: Path,
    work: Path,
    args,
    sampler: CpuSampler | None = None,
    env_extra: dict | None = None,
    name: str | None = None,
    sets: dict | None = None,
) -> tuple[dict, float]:
    """`launcher <runtime> --config configs/tiny.yaml --set ...` in a fresh process, as a user runs it (its imports,
    and for Ray the local cluster it starts, are part of the time). Returns (run summary, start wall time)."""
    out = work / (name or runtime)
    cmd = [
        sys.executable,
        "-m",
        "launcher.cli",
        runtime,
        "--config",
        str(REPO / "configs" / "tiny.yaml"),
        *overrides(data, out, args, **(sets or {})),
    ]
    env = {**os.environ, **(env_extra or {})}
    if runtime == "local":
        cmd += ["--device", "cpu", "--no-progress"]
        env["OMP_NUM_THREADS"] = str(args.threads)  # torch's intra-op threads; the Ray worker sets its own
    log = work / f"{name or runtime}.log"
    t0 = time.time()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
        if sampler:
            sampler.driver_pid = proc.pid
        rc = proc.wait()
    if rc != 0:
        sys.exit(f"launcher {runtime} failed (exit {rc}); its log:\n" + "".join(log.read_text().splitlines(True)[-40:]))
    return json.loads((out / "run_summary.json").read_text()), t0


def run_local_side(data: Path, work: Path, args) -> dict:
    summary, t0 = run_cli("local", data, work, args)
    return step_metrics(summary, t0, args.micro_batch)


def step_done_s(out: Path, t0_wall: float) -> float:
    """Seconds from t0 to the end of rank 0's first optimizer step (its report), the moment the bare baseline
    stamps."""
    from launcher.ray_worker import RANKS_DIR

    return json.loads((out / RANKS_DIR / "rank0.json").read_text())["first_step_wall_time"] - t0_wall


def run_ray_side(data: Path, work: Path, args) -> dict:
    """`launcher ray` starting its own cluster, with the CPU sampler on."""
    sampler = CpuSampler()
    summary, t0 = run_cli("ray", data, work, args, sampler)
    m = step_metrics(summary, t0, args.micro_batch)
    m["step_done_s"] = step_done_s(work / "ray", t0)
    m["startup"] = {
        "process_start": round(m["step_done_s"] - summary["time_to_first_step_s"], 1),
        **(summary.get("startup_s") or {}),
        "first_log": round(m["first_step_s"] - m["step_done_s"], 1),  # rank 0 opens the MLflow store
    }
    m["cpu"] = sampler.used_until(t0 + m["first_step_s"])
    return m


def run_ray_on_running_cluster(data: Path, work: Path, args) -> dict:
    """`launcher ray` joining a cluster that is already up (RAY_ADDRESS), as under `ray job submit`, with the base
    model from a directory as in production (the first Ray run's tiny base: no build on the driver)."""
    import ray

    temp = tempfile.mkdtemp(prefix="rb", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    ray.init(
        address="local",
        num_cpus=args.threads + 2,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        _node_ip_address="127.0.0.1",
        _temp_dir=temp,
    )  # the dashboard serves Ray Train's state queries
    try:
        address = ray.get_runtime_context().gcs_address
        summary, t0 = run_cli(
            "ray",
            data,
            work,
            args,
            env_extra={"RAY_ADDRESS": address},
            name="ray_running",
            sets={"model.name_or_path": str(work / "ray" / "base_model")},
        )
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
    return {**step_metrics(summary, t0, args.micro_batch), "startup": summary.get("startup_s") or {}}


BARE_RAY_TRAIN = """
import math, os, sys, time
from pathlib import Path

import ray
import ray.train
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

rows, size, seq_len, batch, workers, cpus, out = sys.argv[1:8]
rows, size, seq_len, batch, workers, cpus = int(rows), int(size), int(seq_len), int(batch), int(workers), float(cpus)


def arrays(b):
    import numpy as np

    n = len(b["id"])
    return {"pixel_values": np.random.rand(n, 3, size, size).astype(np.float32),
            "input_ids": np.random.randint(0, 1024, (n, seq_len), dtype=np.int64)}


def loop(config):
    import torch

    shard = ray.train.get_dataset_shard("train")
    model = ray.train.torch.prepare_model(torch.nn.Linear(3 * size * size + seq_len, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for b in shard.iter_torch_batches(batch_size=batch):
        x = torch.cat([b["pixel_values"].flatten(1), b["input_ids"].float()], dim=1)
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        if ray.train.get_context().get_world_rank() == 0:
            Path(out).write_text(repr(time.time()))
        break
    ray.train.report({"done": 1.0})


num_cpus = max(os.cpu_count() or 1, math.ceil(workers * cpus) + 2)  # as launcher/ray_train.py's connect_ray
ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
         _node_ip_address="127.0.0.1", log_to_driver=True)
try:
    data = ray.data.range(rows).map_batches(arrays)
    TorchTrainer(loop, scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": cpus}),
                 run_config=RunConfig(name="bare", storage_path=str(Path(out).parent / "bare_storage")),
                 datasets={"train": data}).fit()
finally:
    ray.shutdown()
"""


def run_bare_ray_train(data: Path, work: Path, args, tag: str = "bare") -> float:
    """The baseline (BARE_RAY_TRAIN, see the module docstring) in a fresh process: seconds to its first step."""
    from datasets_io.config import load_config

    cfg = load_config(REPO / "configs" / "tiny.yaml")
    with open(data / cfg.data.train_file) as f:
        rows = sum(1 for line in f if line.strip())
    (work / tag).mkdir()
    script, stamp, log = work / tag / "bare_ray_train.py", work / tag / "first_step.txt", work / f"{tag}.log"
    script.write_text(BARE_RAY_TRAIN)
    cmd = [
        sys.executable,
        str(script),
        str(rows),
        str(cfg.model.tiny.image_size),
        str(cfg.data.max_seq_len),
        str(args.micro_batch),
        "1",
        str(float(args.threads)),
        str(stamp),
    ]
    t0 = time.time()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, cwd=work, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0 or not stamp.exists():
        sys.exit(f"bare Ray Train failed (exit {rc}); its log:\n" + "".join(log.read_text().splitlines(True)[-40:]))
    return float(stamp.read_text()) - t0


def first_step_pairs(data: Path, work: Path, args, ray_m: dict) -> list[tuple[float, float, float]]:
    """(launcher ray's end of its first step, bare Ray Train's, launcher ray's first metric timestamp) in seconds,
    `--startup-rounds` rounds run back to back: on a machine shared with other jobs the load changes between runs,
    so one pair alone can be off either way."""
    pairs = [(ray_m["step_done_s"], run_bare_ray_train(data, work, args), ray_m["first_step_s"])]
    for i in range(1, args.startup_rounds):
        summary, t0 = run_cli("ray", data, work, args, name=f"ray_round{i}")
        pairs.append(
            (
                step_done_s(work / f"ray_round{i}", t0),
                run_bare_ray_train(data, work, args, tag=f"bare_round{i}"),
                step_metrics(summary, t0, args.micro_batch)["first_step_s"],
            )
        )
    return pairs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--micro-batch", type=int, default=16, help="default: configs/tiny.yaml's")
    p.add_argument("--studies", type=int, default=200)
    p.add_argument("--zero-stage", type=int, default=2, choices=[2, 3])
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads on both sides (= ray.cpus_per_worker); more threads than idle cores makes "
        "OpenMP spin: on a busy 2-core machine 2 threads run ~7x slower than 1",
    )
    p.add_argument(
        "--skip-running-cluster",
        action="store_true",
        help="skip the run that joins an already running cluster (faster; the ratio does not use it)",
    )
    p.add_argument(
        "--startup-rounds",
        type=int,
        default=1,
        help="pairs of (launcher ray, bare Ray Train) first-step runs; the last line is their median ratio",
    )
    args = p.parse_args()
    from datasets_io.synth import write_synthetic

    work = Path(tempfile.mkdtemp(prefix="ray_overhead_"))
    data = work / "data"
    write_synthetic(data, args.studies, seed=0, image_size=(256, 256), progress=False)
    print(
        f"[bench] {args.steps} steps, micro-batch {args.micro_batch}, {args.threads} torch thread(s), "
        f"{os.cpu_count()} CPUs, work dir {work}"
    )
    try:
        local = run_local_side(data, work, args)
        ray_m = run_ray_side(data, work, args)
        pairs = first_step_pairs(data, work, args, ray_m)
        running = None if args.skip_running_cluster else run_ray_on_running_cluster(data, work, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("\n                          local        ray (1 worker, DeepSpeed ZeRO-%d)   ratio" % args.zero_stage)
    for stage in ("A", "B"):
        lo, ra = local[stage], ray_m[stage]
        print(
            f"step time, stage {stage} (s)   {lo:8.3f}     {ra:8.3f}                            {ra / lo:5.2f}x"
            f"   (target <= 1.15x)"
        )
    print(
        f"time to first step (s)     {local['first_step_s']:8.1f}     {ray_m['first_step_s']:8.1f} "
        f"(cluster start included)   {ray_m['first_step_s'] / local['first_step_s']:5.2f}x"
    )
    if running:
        print(f"                                        {running['first_step_s']:8.1f} (on a running cluster)")
    print(f"                                        {pairs[0][1]:8.1f} (bare Ray Train: own cluster, trivial model)")
    for label, m in (("own cluster", ray_m), ("running cluster", running)):
        if m is None:
            continue
        print(
            f"Ray time to first step by phase, {label} (s): " + ", ".join(f"{k} {v}" for k, v in m["startup"].items())
        )
    cpu, cores = ray_m["cpu"], os.cpu_count() or 1
    total = sum(cpu.values())
    print(
        f"CPU-seconds used machine-wide until Ray's first step: {total:.1f} on {cores} cores "
        f"(busy {total / (cores * ray_m['first_step_s']):.0%} of the time; {total / cores:.1f} s if perfectly "
        f"parallel); by process:\n  " + ", ".join(f"{k} {v:.1f}" for k, v in cpu.items())
    )
    print(
        "to the first metric's timestamp (rank 0's first MLflow log included), launcher ray / bare Ray Train, per "
        "round (s): "
        + ", ".join(f"{m:.1f} / {b:.1f} = {m / b:.2f}x" for _, b, m in pairs)
        + f"; median {statistics.median(m / b for _, b, m in pairs):.2f}x"
    )
    print(
        "end of the first optimizer step, launcher ray / bare Ray Train, per round (s): "
        + ", ".join(f"{r:.1f} / {b:.1f} = {r / b:.2f}x" for r, b, _ in pairs)
        + "   (target <= 1.3x)"
    )
    print(f"first step vs bare Ray Train: {statistics.median(r / b for r, b, _ in pairs):.2f}x")


if __name__ == "__main__":
    main()
