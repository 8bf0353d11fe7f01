"""The Ray runtime: Ray Train schedules DeepSpeed ZeRO LoRA workers, each streaming its own slice of the data.

    launcher ray --config configs/tiny.yaml --num-workers 2                 # here: starts a local Ray on 127.0.0.1
    ray job submit --address http://HEAD:8265 --working-dir . -- launcher ray --config configs/tiny.yaml
    launcher submit --address http://HEAD:8265 --config configs/tiny.yaml   # the same, through the Jobs API

The driver (`run_ray`) counts the rows of each stage up front (a Ray Dataset shard has no length), builds the
tiny base model if the config asks for one, derives the step plan and the DeepSpeed JSON (pure functions), pins one
MLflow run to the Ray run, `ray.put`s the validated rows once and hands everything to a `TorchTrainer`.

Each worker runs `launcher/ray_worker.py`'s `train_worker`: its slice of the data from the checkpoint's global
cursor on, a DeepSpeed engine, THE loop (`training.loop.train`), checkpoints reported to Ray Train from every rank,
so a restarted group resumes at the right stage, step and data position. Running the same command again with the
same `ray.storage_path` + `ray.name` resumes the run, and reuses its MLflow run.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasets_io.config import Config, ConfigError, from_dict
from datasets_io.errors import LauncherError
from launcher.ray_worker import RANKS_DIR, run_where, train_worker
from training.curriculum import grad_accum_for, with_derived_grad_accum

RUN_MARKER = "launcher_run.json"  # <storage>/<name>/launcher_run.json pins the MLflow run id to the Ray run


# ------------------------------------------------------------------------------------------------ driver side
def is_uri(path: str) -> bool:
    return "://" in path


def resolve_for_cluster(cfg: Config, num_workers: int | None = None, use_gpu: bool | None = None) -> Config:
    """A copy of `cfg` whose paths mean the same thing on every worker: absolute output/data/storage paths and an
    explicit MLflow tracking URI (a sqlite path relative to the driver's cwd would be another file on a worker)."""
    from training.tracking import resolve_tracking_uri

    d = copy.deepcopy(cfg.model_dump())
    if num_workers is not None:
        d["ray"]["num_workers"] = num_workers
    if use_gpu is not None:
        d["ray"]["use_gpu"] = use_gpu
    out = Path(d["output"]["dir"]).expanduser().resolve()
    d["output"]["dir"] = str(out)
    if not is_uri(d["data"]["root"]):
        d["data"]["root"] = str(Path(d["data"]["root"]).expanduser().resolve())
    name_or_path = d["model"]["name_or_path"]
    if name_or_path and Path(name_or_path).expanduser().is_dir():
        d["model"]["name_or_path"] = str(Path(name_or_path).expanduser().resolve())
    storage = d["ray"]["storage_path"] or str(out / "ray")
    d["ray"]["storage_path"] = storage if is_uri(storage) else str(Path(storage).expanduser().resolve())
    resolved = from_dict(d, "config")
    resolved.mlflow.tracking_uri = resolve_tracking_uri(resolved)
    return resolved


def check_supported(cfg: Config) -> None:
    """The checks that need the worker count (the static ones ran at load, datasets_io/config.py)."""
    t = cfg.train
    try:
        grad_accum_for(t.micro_batch_size, t.grad_accum, t.global_batch_size, cfg.ray.num_workers)
    except ValueError as e:
        raise ConfigError([str(e)], "config (ray)") from None


def _storage_fs(path: str):
    import pyarrow.fs as pafs

    if is_uri(path):
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), path


def read_run_marker(cfg: Config) -> dict | None:
    import pyarrow.fs as pafs

    fs, root = _storage_fs(cfg.ray.storage_path)
    path = f"{root.rstrip('/')}/{cfg.ray.name}/{RUN_MARKER}"
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        return json.loads(f.read().decode())


def write_run_marker(cfg: Config, marker: dict) -> None:
    fs, root = _storage_fs(cfg.ray.storage_path)
    run_dir = f"{root.rstrip('/')}/{cfg.ray.name}"
    fs.create_dir(run_dir, recursive=True)
    with fs.open_output_stream(f"{run_dir}/{RUN_MARKER}") as f:
        f.write(json.dumps(marker, indent=2).encode())


def pinned_tracker(cfg: Config, tags: dict[str, str]) -> tuple[Any, bool]:
    """The MLflow run of this Ray run: created on the first launch (and its id stored next to Ray's run state),
    reopened on every later launch with the same storage_path + name. Returns (tracker, reopened)."""
    from training.tracking import MlflowTracker, config_params

    marker = read_run_marker(cfg)
    if marker and marker.get("mlflow_run_id"):
        tracker = MlflowTracker.from_config(cfg, run_id=marker["mlflow_run_id"])
        tracker.reopen()
        return tracker, True
    tracker = MlflowTracker.from_config(cfg, run_name=cfg.mlflow.run_name or cfg.ray.name)
    tracker.log_params(config_params(cfg))
    tracker.set_tags(tags)
    write_run_marker(
        cfg,
        {
            "mlflow_run_id": tracker.run_id,
            "tracking_uri": tracker.tracking_uri,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        },
    )
    return tracker, False


def connect_ray(cfg: Config) -> bool:
    """Join the running cluster (RAY_ADDRESS, which `ray job submit` sets for its entrypoint), else start a local
    one bound to 127.0.0.1. Returns True when the cluster was started here (and should be shut down here)."""
    import ray

    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
        return False
    train_cpus = math.ceil(cfg.ray.num_workers * cfg.ray.cpus_per_worker)
    # Logical CPUs: room for the workers AND Ray Data's read/decode tasks (a full machine of 1-CPU workers
    # starves the reads: a silent deadlock).
    num_cpus = max(os.cpu_count() or 1, train_cpus + 2)
    # The dashboard also serves the state API Ray Train's placement-group cleaner polls (without it: a warning
    # every few seconds), and `ray job submit` against this cluster.
    ray.init(
        address="local",
        num_cpus=num_cpus,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        _node_ip_address="127.0.0.1",
        log_to_driver=True,
    )
    return True


@contextlib.contextmanager
def env_defaults(values: dict[str, str]):
    """Set the environment variables of `values` that are not set yet, for the block only."""
    added = {k: v for k, v in values.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


@dataclass
class DriverSetup:
    """What the driver prepares before any worker starts (see `prepare_run`)."""

    prep: Any  # training.recipe.RunPrep: records, counts, base model, step plan (the recipe both runtimes share)
    dtype: str
    ds_config: dict
    tracker: Any
    reopened: bool
    seconds: float
    complete_at: int | None = None  # the run's latest checkpoint already ends the plan: nothing to train


def prepare_run(cfg: Config) -> DriverSetup:
    """The driver's own work: the heavy imports, the data check (every record validated, stages counted: a shard
    has no length), the tiny base model (built once, here), the step plan, the DeepSpeed JSON and the pinned MLflow
    run. Single-threaded Python: `run_ray` runs it on a thread while the cluster starts."""
    t0 = time.perf_counter()
    from ray.train.torch import TorchTrainer  # noqa: F401 - imported here, on the set-up thread

    from training.deepspeed_engine import deepspeed_config, resolve_ds_dtype
    from training.recipe import check_resumable, prepare_run_data, run_tags

    out = Path(cfg.output.dir)
    world = cfg.ray.num_workers
    # every record validated, stages counted, the tiny base's tokenizer + config written once, here (its weights are
    # drawn by rank 0: the modeling imports are the workers' anyway)
    prep = prepare_run_data(cfg, world, tiny_weights=False)
    dtype = resolve_ds_dtype(cfg.model.dtype, cfg.ray.use_gpu)
    ds_config = deepspeed_config(prep.cfg, world, dtype)
    (out / "deepspeed_config.json").write_text(json.dumps(ds_config, indent=2))
    tags = run_tags(
        prep,
        "ray",
        **{
            "ray.name": cfg.ray.name,
            "ray.storage_path": cfg.ray.storage_path,
            "ray.num_workers": str(world),
            "deepspeed.zero_stage": str(cfg.deepspeed.zero_stage),
        },
    )
    tracker, reopened = pinned_tracker(cfg, tags)  # an unreachable tracking server fails here, before training
    if not reopened:
        from training.data_checks import log_data_checks

        log_data_checks(tracker, prep.data.budgets, prep.data.subject_overlap)  # counts only: no patient data
    complete_at = None
    if reopened:  # a changed plan is refused here, before the cluster does any work (the workers check it again)
        from training.checkpoint import latest_checkpoint, read_state

        latest = latest_checkpoint(out / "checkpoints")
        saved = read_state(latest) if latest else None
        check_resumable(saved, prep.resume_key, run_where(cfg))
        if saved and saved["global_step"] >= prep.plan.total_steps:
            complete_at = saved["global_step"]
    return DriverSetup(prep, dtype, ds_config, tracker, reopened, time.perf_counter() - t0, complete_at)


@dataclass
class DriverClock:
    """The driver's start-up times: perf_counter for durations, wall clock to set beside the workers' reports."""

    start: float
    start_wall: float
    ray_init_s: float = 0.0
    fit_wall: float = 0.0


def run_ray(cfg: Config, num_workers: int | None = None, use_gpu: bool | None = None) -> dict:
    """Train with Ray Train + DeepSpeed; returns the run summary (also written to <output.dir>/run_summary.json).

    Test hooks (fault injection, logits of the live model) are not here: tests register step hooks
    (training.loop.STEP_HOOKS), shipped to the workers."""
    clock = DriverClock(time.perf_counter(), time.time())  # imports are part of the start-up
    import ray

    cfg = resolve_for_cluster(cfg, num_workers, use_gpu)
    check_supported(cfg)
    cfg = with_derived_grad_accum(cfg, cfg.ray.num_workers)
    out = Path(cfg.output.dir)
    out.mkdir(parents=True, exist_ok=True)
    setup, started_here = prepare_beside_cluster_start(cfg, clock)
    if setup.complete_at is not None:  # neither trained, saved nor registered again
        from training.recipe import completed_run_summary

        setup.tracker.close("FINISHED")
        if started_here:
            ray.shutdown()
        return completed_run_summary(out, run_where(cfg), setup.complete_at, setup.prep.plan.total_steps)

    status = "FAILED"
    try:
        trainer = make_trainer(cfg, setup)
        plan = setup.prep.plan
        print(
            f"[ray] {cfg.ray.num_workers} workers x {cfg.ray.cpus_per_worker} CPU"
            f"{' + 1 GPU' if cfg.ray.use_gpu else ''}, ZeRO-{cfg.deepspeed.zero_stage} {setup.dtype}, "
            f"steps={plan.total_steps} (stage A {plan.stage_a_steps}, stage B {plan.stage_b_steps}), "
            f"samples/step={plan.samples_per_step} {'packed' if cfg.train.packing else 'padded'}, "
            f"run {cfg.ray.storage_path}/{cfg.ray.name}"
            f"{' (resuming)' if setup.reopened else ''}, MLflow run {setup.tracker.run_id}",
            flush=True,
        )
        clock.fit_wall = time.time()
        result = fit(trainer, cfg, started_here)
        summary = finish_ray_run(cfg, setup, result, clock)
        status = "FINISHED"
    finally:
        if status != "FINISHED":
            setup.tracker.close(status)
        if started_here:
            ray.shutdown()
    return summary


def prepare_beside_cluster_start(cfg: Config, clock: DriverClock) -> tuple[DriverSetup, bool]:
    """(`prepare_run`'s set-up, whether the cluster was started here). The driver's set-up is single-threaded
    Python; starting (or joining) the cluster is mostly other processes starting. Side by side they take ~the
    longer of the two instead of the sum. On a failure of either, the other's work is undone."""
    from concurrent.futures import ThreadPoolExecutor

    import ray

    started_here = False
    with ThreadPoolExecutor(1, thread_name_prefix="driver-setup") as pool:
        pending = pool.submit(prepare_run, cfg)
        try:
            t_ray = time.perf_counter()
            started_here = connect_ray(cfg)
            clock.ray_init_s = time.perf_counter() - t_ray
            return pending.result(), started_here  # re-raises the set-up's error (bad data, unreachable tracking)
        except BaseException:
            if pending.exception() is None:  # the cluster failed, the set-up did not: close its MLflow run
                pending.result().tracker.close("FAILED")
            if started_here:
                ray.shutdown()
            raise


def make_trainer(cfg: Config, setup: DriverSetup) -> Any:
    """The TorchTrainer of `train_worker`, with everything a worker needs as plain data (the rows `ray.put` once:
    every worker's decode tasks read them)."""
    import ray
    import ray.data
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from datasets_io.sampler import row_table
    from training import data as data_module
    from training import loop as loop_module

    ray.data.DataContext.get_current().enable_progress_bars = False  # progress bars flood job logs
    data, prep = setup.prep.data, setup.prep
    rows = ray.put({s: row_table(data.train[s]) for s in ("A", "B")})  # once: every worker's decode tasks read it
    loop_config = {
        "cfg": cfg.model_dump(),
        "plan": prep.plan.__dict__,
        "deepspeed": setup.ds_config,
        "mlflow_run_id": setup.tracker.run_id,
        "val": data.val,
        "base_model": prep.base_path,
        "rows": rows,
        "counts": prep.counts,
        "resume_key": prep.resume_key,
        "test_hooks": {"step": list(loop_module.STEP_HOOKS), "decode": list(data_module.DECODE_HOOKS)},
    }
    return TorchTrainer(
        train_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=cfg.ray.num_workers,
            use_gpu=cfg.ray.use_gpu,
            resources_per_worker={"CPU": cfg.ray.cpus_per_worker},
        ),
        run_config=RunConfig(
            name=cfg.ray.name,
            storage_path=cfg.ray.storage_path,
            failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.ray.num_to_keep),
        ),
    )


def fit(trainer: Any, cfg: Config, started_here: bool) -> Any:
    """trainer.fit(); a run that failed past ray.max_failures is a LauncherError saying where the logs are."""
    import ray.train

    # Nothing preempts a one-machine cluster started here, and Ray Train's preemption watcher is one more Python
    # process (seconds of CPU in imports) starting next to the worker's. fit() passes this to the Train controller.
    watcher_off = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"} if started_here else {}
    try:
        with env_defaults(watcher_off):
            return trainer.fit()
    except ray.train.TrainingFailedError as e:
        raise LauncherError(
            f"Ray training failed ({cfg.ray.max_failures} restart(s) allowed by ray.max_failures): {e}\n"
            f"Worker logs: the job's logs (`ray job logs`), or /tmp/ray/session_latest/logs on the nodes. "
            f"Fix the cause and run the same command again to resume from the latest checkpoint."
        ) from None


def finish_ray_run(cfg: Config, setup: DriverSetup, result: Any, clock: DriverClock) -> dict:
    """The latest reported checkpoint's state, its MLflow tags, and the recipe's finish (run summary, final bundle,
    register-at-end); returns the run summary."""
    from training.checkpoint import read_state
    from training.loop import LoopState
    from training.recipe import finish_run

    out = Path(cfg.output.dir)
    if result.checkpoint is None:
        raise LauncherError("Ray training finished without reporting a checkpoint")
    with result.checkpoint.as_directory() as ckpt_dir:
        state = LoopState.from_json(read_state(ckpt_dir))
    name = Path(result.checkpoint.path).name  # a bundle's own state was written before it got its name
    state.checkpoints.setdefault(name, str(out / "checkpoints" / name))
    startup, first_step_s = startup_breakdown(out, clock, {"setup": setup.seconds, "ray_init": clock.ray_init_s})
    setup.tracker.set_tags(
        {"ray.checkpoint": result.checkpoint.path, **{f"checkpoint.{k}": v for k, v in state.checkpoints.items()}}
    )
    with result.checkpoint.as_directory() as ckpt_dir:
        return finish_run(
            out,
            state,
            setup.prep,
            setup.tracker,
            ckpt_dir,
            "FINISHED",
            runtime="ray",
            num_workers=cfg.ray.num_workers,
            zero_stage=cfg.deepspeed.zero_stage,
            dtype=setup.dtype,
            ray_run=f"{cfg.ray.storage_path}/{cfg.ray.name}",
            ray_checkpoint=result.checkpoint.path,
            cursor=state.cursor,
            wall_time_s=round(time.perf_counter() - clock.start, 1),
            time_to_first_step_s=first_step_s,
            startup_s=startup,
        )


def startup_breakdown(
    out: Path, clock: DriverClock, driver_phases: dict[str, float]
) -> tuple[dict[str, float] | None, float | None]:
    """(where the time to rank 0's first step went, in seconds; the time to that step) from rank 0's report. Both
    None when that report is not on this node or is a previous run's (this run trained no step)."""
    rank0 = out / RANKS_DIR / "rank0.json"  # on the driver's disk when rank 0 ran on this node
    report0 = json.loads(rank0.read_text()) if rank0.is_file() else {}
    first_step = report0.get("first_step_wall_time")
    if first_step is None or first_step <= clock.start_wall:  # not a fresh report of this run
        return None, None
    startup = {
        "driver": round(clock.fit_wall - clock.start_wall, 1),  # to fit(): the two below side by side, + datasets
        **{f"driver_{k}": round(v, 1) for k, v in driver_phases.items()},
        "ray_train_start": round(report0["entry_wall_time"] - clock.fit_wall, 1),  # controller, workers, gloo
        **{f"worker_{k}": v for k, v in report0["setup_phases"].items()},
        "first_step": round(first_step - report0["entry_wall_time"] - report0["setup_s"], 1),
    }
    return startup, round(first_step - clock.start_wall, 1)
