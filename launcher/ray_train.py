"""The Ray runtime: Ray Train schedules DeepSpeed ZeRO LoRA workers, each streaming its own slice of the data.

    launcher ray --config configs/tiny.yaml --num-workers 2                 # here: starts a local Ray on 127.0.0.1
    ray job submit --address http://HEAD:8265 --working-dir . -- launcher ray --config configs/tiny.yaml
    launcher submit --address http://HEAD:8265 --config configs/tiny.yaml   # the same, through the Jobs API

The driver (`run_ray`) counts the rows of each stage up front (a Ray Dataset shard has no length), builds the
tiny base model if the config asks for one, derives the step plan and the DeepSpeed JSON (pure functions), pins one
MLflow run to the Ray run, `ray.put`s the validated rows once and hands everything to a `TorchTrainer`.

Each worker (`train_worker`) rebuilds the typed config on its first line, builds the model (inside ZeRO-3's init
context when stage 3) and a `DeepSpeedEngine`, builds per stage a Ray Dataset of ITS positions from the checkpoint's
global data cursor on (datasets_io/ray_datasets.py: the sampler's draws, decoded in Ray Data tasks), and runs THE
loop, `training.loop.train`, the same function the local runtime runs. Checkpoints are reported to Ray Train from
every rank (`ray.train.report` is a barrier), so after a worker dies the restarted group resumes from the
latest one at the right stage, step and data position; running the same command again with the same
`ray.storage_path` + `ray.name` resumes the run, and reuses its MLflow run.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasets_io.config import Config, ConfigError, from_dict
from datasets_io.errors import LauncherError
from training.curriculum import grad_accum_for, with_derived_grad_accum

RUN_MARKER = "launcher_run.json"  # <storage>/<name>/launcher_run.json pins the MLflow run id to the Ray run
RANKS_DIR = "ray_ranks"  # <output.dir>/ray_ranks/rank<R>.json (+ .events.jsonl): what each rank saw and when


def say(message: str) -> None:
    """One log line from a worker. Ray Train patches `print` to log AND echo (every line twice in the job log)."""
    sys.__stdout__.write(message + "\n")
    sys.__stdout__.flush()


class Laps:
    """Wall seconds per start-up phase: `mark(name)` books the time since the previous mark (or since creation)."""

    def __init__(self) -> None:
        self.phases: dict[str, float] = {}
        self._t = time.perf_counter()

    def mark(self, name: str) -> None:
        now = time.perf_counter()
        self.phases[name] = self.phases.get(name, 0.0) + now - self._t
        self._t = now

    def rounded(self) -> dict[str, float]:
        return {k: round(v, 1) for k, v in self.phases.items()}


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


def make_preprocessor(cfg: Config, base_path: str) -> Any:
    """The Preprocessor (data tasks and workers), from the base model's tokenizer and config only: no weights."""
    from types import SimpleNamespace

    from transformers import AutoTokenizer, LlavaConfig

    from training.data import Preprocessor
    from training.model import image_spec_for, num_image_tokens

    config = LlavaConfig.from_pretrained(base_path)
    spec = SimpleNamespace(
        tokenizer=AutoTokenizer.from_pretrained(base_path),
        image_spec=image_spec_for(base_path, config),
        image_token_id=config.image_token_index,
        num_image_tokens=num_image_tokens(config),
    )
    return Preprocessor.for_run(cfg, spec)  # checks the image cache directory on this node


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
    prep = prepare_run_data(cfg, world)  # every record validated, stages counted, tiny base built once, here
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
            f"samples/step={plan.samples_per_step}, run {cfg.ray.storage_path}/{cfg.ray.name}"
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
    # process (~3 CPU-s of imports) starting next to the worker's. fit() passes this to the Train controller.
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


# ------------------------------------------------------------------------------------------------ worker side
def run_where(cfg: Config) -> str:
    return f"run {cfg.ray.storage_path}/{cfg.ray.name}"


def echo_metrics(metrics: dict[str, float], step: int) -> None:
    """Rank 0's training lines in the job log (`ray job logs` shows progress)."""
    if "train/loss" in metrics:
        say(
            f"[train] step {step} stage {'AB'[int(metrics.get('train/stage', 0))]} loss {metrics['train/loss']:.4f}"
            f" lr {metrics.get('train/lr', 0):.2e} samples/s {metrics.get('train/samples_per_s', 0):.1f}"
        )
    elif any(k.startswith("val/") for k in metrics):
        say(f"[val] step {step} " + " ".join(f"{k} {v:.4f}" for k, v in metrics.items()))


class PrimedIterator:
    """Pulls the first item of `it` on a background thread, so the data pipeline's start-up (task processes,
    first decodes: seconds) overlaps the model and DeepSpeed set-up on the main thread."""

    def __init__(self, it: Any):
        import threading

        self.it, self.first, self.error = it, None, None
        self.thread: Any = threading.Thread(target=self._pull, daemon=True, name="prime-data")
        self.thread.start()

    def _pull(self) -> None:
        try:
            self.first = next(self.it)
        except BaseException as e:  # noqa: BLE001 - re-raised on the consuming thread
            self.error = e

    def __iter__(self) -> "PrimedIterator":
        return self

    def __next__(self) -> Any:
        if self.thread is not None:
            self.thread.join()
            self.thread = None
            if self.error is not None:
                raise self.error
            return self.first
        return next(self.it)


@dataclass
class WorkerRun:
    """What each step of a worker reads: the driver's hand-over (`config`), the typed config, the plan, this rank."""

    config: dict
    cfg: Config
    plan: Any  # training.curriculum.StepPlan
    rank: int
    world: int

    @property
    def ranks_dir(self) -> Path:
        return Path(self.cfg.output.dir) / RANKS_DIR


def train_worker(config: dict) -> None:
    """Per-worker entry (every rank): config in, model + DeepSpeed engine + this rank's data built, THE loop run,
    checkpoints reported. A restarted worker group lands here again and resumes from `ray.train.get_checkpoint()`."""
    t0, entry_wall = time.perf_counter(), time.time()
    laps = Laps()
    import ray.train

    from training import data as data_module
    from training import loop as loop_module
    from training.curriculum import StepPlan

    cfg = from_dict(config["cfg"], "config (worker)")  # the typed config, rebuilt on the worker's first line
    ctx = ray.train.get_context()
    w = WorkerRun(config, cfg, StepPlan(**config["plan"]), ctx.get_world_rank(), ctx.get_world_size())
    loop_module.STEP_HOOKS[:] = config["test_hooks"]["step"]  # empty in production (see training/loop.py)
    data_module.DECODE_HOOKS[:] = config["test_hooks"]["decode"]
    held, ckpt_dir, saved = open_latest_checkpoint(w)
    resumed_from = (
        {"global_step": saved["global_step"], "stage": saved["stage"], "cursor": dict(saved["cursor"])}
        if saved
        else None
    )

    # Data first, before the heavy imports: this rank's samples of the stage it starts in stream (decode, tokenize in
    # Ray Data tasks) while this process imports torch/DeepSpeed and builds the model.
    data = RankData(w, resumed_from)
    data.prime(*((saved["global_step"], saved["cursor"]) if saved else (0, {"A": 0, "B": 0})))
    laps.mark("data")
    import peft  # noqa: F401 - training.model imports peft and the modeling classes lazily; here they count as imports
    import torch  # noqa: F401
    from transformers import LlavaForConditionalGeneration  # noqa: F401

    from training.loop import LoopState, train

    bundle, engine = build_worker_engine(w, laps)
    state = LoopState.from_json(saved) if saved else LoopState()
    if saved:
        engine.load_training_state(ckpt_dir, saved["engine"])
        held.close()
        say(
            f"[resume] rank {w.rank}: step {state.global_step}/{w.plan.total_steps}, stage {saved['stage']}, "
            f"cursor {state.cursor}"
        )
    setup_s = time.perf_counter() - t0

    w.ranks_dir.mkdir(parents=True, exist_ok=True)
    io = worker_loop_io(w, engine, bundle, data, state)
    say(
        f"[ray] rank {w.rank}/{w.world}: set up in {setup_s:.1f}s ("
        + ", ".join(f"{k} {v:.1f}s" for k, v in laps.phases.items())
        + f"; DeepSpeed ZeRO-{w.config['deepspeed']['zero_optimization']['stage']}{', resumed' if saved else ''})"
    )
    if state.global_step >= w.plan.total_steps:
        say(f"[ray] rank {w.rank}: the run is already complete ({state.global_step} steps); nothing to train")
    else:
        state = train(io, state)

    (w.ranks_dir / f"rank{w.rank}.json").write_text(
        json.dumps(
            {
                "rank": w.rank,
                "world_size": w.world,
                "global_step": state.global_step,
                "cursor": state.cursor,
                "stage_switch_step": state.stage_switch_step,
                "first_step_of_stage": data.first_step_of_stage,
                "resumed_from": resumed_from,
                "losses": state.losses,
                "setup_s": round(setup_s, 2),
                "setup_phases": laps.rounded(),
                "entry_wall_time": entry_wall,
                "first_step_wall_time": (
                    time.time() - (time.perf_counter() - state.first_step_done_at) if state.first_step_done_at else None
                ),
            },
            indent=2,
        )
    )


def open_latest_checkpoint(w: WorkerRun) -> tuple[contextlib.ExitStack, Path | None, dict | None]:
    """(what holds the checkpoint's local copy, its directory, its trainer state) of the latest reported checkpoint:
    set after a restart or a re-run. A resume the run's plan no longer matches is refused here."""
    import ray.train

    from training.checkpoint import read_state
    from training.recipe import check_resumable

    checkpoint = ray.train.get_checkpoint()
    held = contextlib.ExitStack()  # remote storage: downloaded once, deleted once the engine has loaded it
    ckpt_dir = Path(held.enter_context(checkpoint.as_directory())) if checkpoint else None
    saved = read_state(ckpt_dir) if ckpt_dir else None
    check_resumable(saved, w.config["resume_key"], run_where(w.cfg))
    return held, ckpt_dir, saved


class RankData:
    """This rank's samples: per stage, a Ray Dataset of its positions from a cursor on (the sampler's draws, decoded
    and tokenized in Ray Data tasks: datasets_io/ray_datasets.py). Where the rank enters each stage is logged to
    <output.dir>/ray_ranks/rank<R>.events.jsonl."""

    def __init__(self, w: WorkerRun, resumed_from: dict | None):
        from datasets_io.sampler import BatchLayout
        from training import data as data_module

        self.w, self.resumed_from = w, resumed_from
        self.pre = make_preprocessor(w.cfg, w.config["base_model"])
        self.spec = data_module.sampler_spec(w.cfg, w.config["counts"])
        self.layout = BatchLayout(w.cfg.train.micro_batch_size, w.cfg.train.grad_accum, w.world)
        self.stage_steps = {"A": w.plan.stage_a_steps, "B": w.plan.stage_b_steps}
        self.primed: dict[tuple[str, int], Any] = {}
        self.first_step_of_stage: dict[str, int] = {}  # where this rank entered each stage, in this attempt

    def batches(self, stage: str, cursor: int) -> Any:
        """This rank's micro-batches of `stage` from global position `cursor` to the stage's end."""
        from datasets_io.ray_datasets import stage_batches, stage_dataset, worker_items

        items = worker_items(self.spec, self.layout, self.w.rank, stage, cursor, self.stage_steps[stage])
        return stage_batches(
            stage_dataset(items, self.w.config["rows"], stage, self.pre), self.pre, self.w.cfg.train.micro_batch_size
        )

    def prime(self, step0: int, cursor0: dict[str, int]) -> None:
        """Start the stage the run resumes in on a background thread (nothing when the run is complete)."""
        from training.curriculum import stage_at

        if step0 < self.w.plan.total_steps:
            first = stage_at(step0, self.w.plan)
            self.primed[(first, cursor0[first])] = PrimedIterator(self.batches(first, cursor0[first]))

    def source(self, state: Any) -> Any:
        """THE loop's `source(stage, cursor)`: this rank's batches as tensors (the primed ones when they match)."""
        from training.data import to_torch

        plan, rank = self.w.plan, self.w.rank

        def stage_source(stage: str, cursor: int):
            step = (plan.stage_a_steps if stage == "B" else 0) + cursor // plan.samples_per_step
            self.first_step_of_stage[stage] = step
            with open(self.w.ranks_dir / f"rank{rank}.events.jsonl", "a") as f:
                f.write(
                    json.dumps(
                        {
                            "event": "first_batch",
                            "stage": stage,
                            "step": step,
                            "cursor": dict(state.cursor),
                            "resumed_from": self.resumed_from,
                        }
                    )
                    + "\n"
                )
            rows = self.primed.pop((stage, cursor), None) or self.batches(stage, cursor)
            return (to_torch(b) for b in rows)

        return stage_source


def build_worker_engine(w: WorkerRun, laps: Laps) -> tuple[Any, Any]:
    """(the LoRA model bundle, its DeepSpeedEngine): built inside ZeRO-3's init context when stage 3, so the base is
    loaded already partitioned across ranks. The phases go to `laps`: imports, model, deepspeed."""
    import torch

    from training.deepspeed_engine import DeepSpeedEngine, init_deepspeed_comm, prepare_deepspeed_cpu, zero3_init
    from training.model import resolve_base_path
    from training.recipe import build_lora_model

    cfg, ds_config = w.cfg, w.config["deepspeed"]
    if not cfg.ray.use_gpu:
        prepare_deepspeed_cpu()
        torch.set_num_threads(max(1, math.floor(cfg.ray.cpus_per_worker)))
    init_deepspeed_comm()
    laps.mark("imports")
    zero3_init(ds_config)  # ZeRO-3: from_pretrained below builds the base already partitioned across ranks
    dtype = "bf16" if ds_config["bf16"]["enabled"] else "fp16" if ds_config["fp16"]["enabled"] else "fp32"
    bundle = build_lora_model(cfg, resolve_base_path(cfg, None), dtype=dtype)
    laps.mark("model")
    engine = DeepSpeedEngine(bundle.model, cfg.train, ds_config)
    laps.mark("deepspeed")
    return bundle, engine


def worker_loop_io(w: WorkerRun, engine: Any, bundle: Any, data: RankData, state: Any) -> Any:
    """THE loop's inputs on this rank: the engine, this rank's data and validation slice, the checkpointer
    (reported to Ray Train), MLflow on rank 0 (the null tracker elsewhere) and, when asked, the data-order log."""
    from training.checkpoint import Checkpointer
    from training.data import DataOrderLog
    from training.loop import LoopIO
    from training.recipe import validation_source
    from training.tracking import MlflowTracker, NullTracker, ResumeSafeTracker

    cfg, config, out = w.cfg, w.config, Path(w.cfg.output.dir)
    tracker = (
        ResumeSafeTracker(
            MlflowTracker.from_config(cfg, run_id=config["mlflow_run_id"]), echo=echo_metrics, close_run=False
        )  # the driver owns the run's status
        if w.rank == 0
        else NullTracker()
    )
    order_log = (
        DataOrderLog(out / "data_order.jsonl", w.rank, w.world, state.global_step)
        if cfg.train.record_data_order
        else None
    )  # every rank: the gather is a collective
    return LoopIO(
        engine=engine,
        plan=w.plan,
        source=data.source(state),
        tracker=tracker,
        val_source=validation_source(data.pre, config["val"], cfg, w.rank, w.world),
        checkpointer=Checkpointer(out / "checkpoints", cfg, bundle.tokenizer, cfg.train.keep_last),
        grad_accum=cfg.train.grad_accum,
        log_every=cfg.train.log_every,
        eval_every=cfg.train.eval_every,
        save_every=cfg.train.save_every,
        world_size=w.world,
        show_progress=False,
        on_checkpoint=checkpoint_reporter(engine, w.rank),
        log_checkpoint_artifacts=cfg.mlflow.log_checkpoints,
        on_step_data=order_log,
        rank=w.rank,
        extra_state={
            "mlflow_run_id": config["mlflow_run_id"],
            "base_model": config["base_model"],
            "runtime": "ray",
            "world_size": w.world,
            "resume_key": config["resume_key"],
        },
    )


def checkpoint_reporter(engine: Any, rank: int) -> Any:
    """THE loop's `on_checkpoint`: every rank reports the checkpoint to Ray Train (a barrier), then waits until the
    controller has committed it."""
    import ray.train
    from ray.train import Checkpoint, CheckpointConsistencyMode

    def on_checkpoint(path: Path, loop_state: Any) -> None:
        engine.barrier()  # the writer has renamed <name>.tmp -> <name>
        mine = path if rank == 0 else None
        staged = path.with_name(path.name + ".tmp")
        if rank != 0 and staged.is_dir():  # a node that does not share rank 0's disk: its ZeRO partitions are here
            mine = staged
        metrics = {
            "global_step": loop_state.global_step,
            "loss": loop_state.losses[-1],
            "stage_switch_step": loop_state.stage_switch_step or -1,
            "checkpoint_name": path.name,
            "cursor_A": loop_state.cursor["A"],
            "cursor_B": loop_state.cursor["B"],
        }
        # Every rank reports at every checkpoint (report is a barrier); Ray merges reported directories in storage.
        ray.train.report(
            metrics,
            checkpoint=Checkpoint.from_directory(str(mine)) if mine else None,
            checkpoint_dir_name=path.name,
            delete_local_checkpoint_after_upload=False,
        )
        # The controller registers reports asynchronously (it polls the workers every ~2 s); wait for it, so a
        # checkpoint the loop has passed is the one a restart resumes from, not the one before.
        ray.train.get_all_reported_checkpoints(consistency_mode=CheckpointConsistencyMode.COMMITTED)

    return on_checkpoint
