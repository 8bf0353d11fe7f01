"""The Ray runtime's worker side: what every rank runs inside Ray Train (`train_worker`), and the pieces the driver
shares with it (the rank report directory, log lines, start-up laps, where a run lives).

Each worker rebuilds the typed config on its first line, builds the model (inside ZeRO-3's init context when stage
3) and a `DeepSpeedEngine`, builds per stage a Ray Dataset of ITS positions from the checkpoint's global data cursor
on (datasets_io/ray_datasets.py: the sampler's draws, decoded in Ray Data tasks), and runs THE loop,
`training.loop.train`, the same function the local runtime runs. Checkpoints are reported to Ray Train from every
rank (`ray.train.report` is a barrier), so after a worker dies the restarted group resumes from the latest one at
the right stage, step and data position. The driver is launcher/ray_train.py.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasets_io.config import Config, from_dict


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
        text_config=config.text_config,
    )
    return Preprocessor.for_run(cfg, spec)  # checks the image cache directory on this node


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
    import ray
    import torch

    from training.deepspeed_engine import DeepSpeedEngine, init_deepspeed_comm, prepare_deepspeed_cpu, zero3_init
    from training.model import ensure_tiny_weights, resolve_base_path
    from training.recipe import build_lora_model

    cfg, ds_config = w.cfg, w.config["deepspeed"]
    if not cfg.ray.use_gpu:
        prepare_deepspeed_cpu()
        torch.set_num_threads(max(1, math.floor(cfg.ray.cpus_per_worker)))
    init_deepspeed_comm()
    laps.mark("imports")
    base_path = resolve_base_path(cfg, None, weights=False)
    if not cfg.model.name_or_path:  # the tiny base: the driver wrote its tokenizer + config, rank 0 draws the weights
        if w.rank == 0:  # from the Stage A rows the driver validated: the local runtime's weights, bit for bit
            ensure_tiny_weights(base_path, cfg, ray.get(w.config["rows"])["A"])
        torch.distributed.barrier()
    zero3_init(ds_config)  # ZeRO-3: from_pretrained below builds the base already partitioned across ranks
    dtype = "bf16" if ds_config["bf16"]["enabled"] else "fp16" if ds_config["fp16"]["enabled"] else "fp32"
    bundle = build_lora_model(cfg, base_path, dtype=dtype)
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
