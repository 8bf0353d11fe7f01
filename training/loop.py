"""THE training loop. The local runtime (launcher/local.py) and the Ray runtime (launcher/ray_train.py) both call
`train(...)`; they differ only in the engine, the batch sources and the tracker they pass in.

Per optimizer step:  stage = stage_at(step)  ->  grad_accum micro-batches from that stage's source  ->
engine.optimizer_step(lr_factor(step))  ->  metrics by global step  ->  events (stage switch, eval, checkpoint).

The data cursor is counted here, per stage, in GLOBAL positions consumed (samples of all ranks: it grows by the
global batch G = micro x accum x world per optimizer step, whatever the number of workers) and saved in every
checkpoint under `cursor`; a source opened at cursor c yields this rank's micro-batches of the steps from c / G on
(datasets_io/sampler.py says which positions those are).

Test-only hooks: `STEP_HOOKS` holds callables `hook(step, stage, state, io)` run after every optimizer step on every
rank (fault injection, counters, logits of the live model: `io` has the engine, the rank and the validation source). Production code never adds to it; tests do (through a fixture that clears it again),
and the Ray runtime ships the registered hooks to its workers.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from tqdm import tqdm

from datasets_io.errors import LauncherError
from training.checkpoint import Checkpointer, step_dir_name
from training.curriculum import StepPlan, lr_factor, stage_at
from training.data import META_KEYS
from training.packing import padding_free_backend, token_counts

log = logging.getLogger(__name__)

BatchSource = Callable[[str, int], Iterator[dict[str, Any]]]  # (stage, global cursor) -> this rank's micro-batches
STEP_HOOKS: list[Callable[[int, str, "LoopState", "LoopIO"], None]] = []  # test-only (see the module docstring)
CURSOR_UNIT = "global_positions"  # saved next to `cursor`; checkpoints from before had micro-batches of one rank


def check_cursor_unit(saved: dict, where: str) -> None:
    """A checkpoint whose cursor counts something else would resume at the wrong samples: refused, loudly."""
    if saved.get("cursor_unit") != CURSOR_UNIT:
        raise LauncherError(
            f"{where}: its data cursor {saved.get('cursor')} counts micro-batches of one rank (written "
            f"before the cursor became global); it cannot be resumed at the same samples. Start a "
            "new run (a new output.dir / ray.name), or load its adapter for evaluation only"
        )


@dataclass
class LoopState:
    global_step: int = 0  # optimizer steps done
    cursor: dict[str, int] = field(default_factory=lambda: {"A": 0, "B": 0})
    losses: list[float] = field(default_factory=list)  # per optimizer step, this run and the ones it resumed
    checkpoints: dict[str, str] = field(default_factory=dict)
    stage_switch_step: int | None = None
    val_history: list[dict] = field(default_factory=list)
    first_step_done_at: float | None = None  # perf_counter() when this process finished its first step (not saved)

    def to_json(self, plan: StepPlan, **extra: Any) -> dict:
        stage = stage_at(self.global_step, plan) if self.global_step < plan.total_steps else "done"
        return {
            "global_step": self.global_step,
            "stage": stage,
            "cursor": dict(self.cursor),
            "cursor_unit": CURSOR_UNIT,
            "losses": self.losses,
            "checkpoints": self.checkpoints,
            "stage_switch_step": self.stage_switch_step,
            "val_history": self.val_history,
            "plan": plan.__dict__,
            **extra,
        }

    @classmethod
    def from_json(cls, d: dict) -> "LoopState":
        return cls(
            d["global_step"],
            dict(d["cursor"]),
            list(d["losses"]),
            dict(d.get("checkpoints", {})),
            d.get("stage_switch_step"),
            list(d.get("val_history", [])),
        )


@dataclass
class LoopIO:
    engine: Any
    plan: StepPlan
    source: BatchSource
    val_source: Callable[[str], list[dict[str, torch.Tensor]]]  # stage -> fixed validation batches
    tracker: Any
    checkpointer: Checkpointer
    grad_accum: int
    log_every: int = 10
    eval_every: int = 0
    save_every: int = 0
    world_size: int = 1
    show_progress: bool = True
    on_checkpoint: Callable[[Path, LoopState], None] | None = None  # Ray reports checkpoints through this
    extra_state: dict = field(default_factory=dict)  # e.g. the MLflow run id, stored in every checkpoint
    log_checkpoint_artifacts: bool = False  # mlflow.log_checkpoints: copy each checkpoint into the run's artifacts
    on_step_data: Callable[[int, str, dict], None] | None = None  # (step, stage, this rank's META_KEYS): data order
    rank: int = 0
    step_hooks: list = field(default_factory=lambda: list(STEP_HOOKS))


def validate(io: LoopIO, step: int, state: LoopState) -> dict[str, float]:
    out = {}
    for stage in ("A", "B"):
        batches = io.val_source(stage)
        if batches:
            losses = torch.stack([io.engine.eval_loss(b) for b in batches])
            out[f"val/loss_{stage}"] = float(io.engine.reduce_mean(losses.mean()))
    if out:
        io.tracker.log_metrics(out, step=step)
        state.val_history.append({"step": step, **out})
    return out


def save(io: LoopIO, name: str, state: LoopState) -> Path:
    path = io.checkpointer.save(name, io.engine, state.to_json(io.plan, **io.extra_state))
    state.checkpoints[name] = str(path)
    if io.engine.is_writer:  # checkpoints in MLflow: a reference always, the files when asked (they can be large)
        io.tracker.set_tags({f"checkpoint.{name}": str(path)})
        if io.log_checkpoint_artifacts:
            io.tracker.log_artifacts(str(path), f"checkpoints/{name}")
    if io.on_checkpoint:
        io.on_checkpoint(path, state)
    return path


def train(io: LoopIO, state: LoopState | None = None, stop_after: int | None = None) -> LoopState:
    """Run optimizer steps from `state.global_step` to the plan's end (or to `stop_after`, with a checkpoint)."""
    state = state or LoopState()
    plan, engine = io.plan, io.engine
    iters: dict[str, Iterator] = {}

    def next_batch(stage: str, meta: dict[str, list]) -> dict[str, torch.Tensor]:
        if stage not in iters:
            iters[stage] = io.source(stage, state.cursor[stage])
        batch = dict(next(iters[stage]))
        for k in META_KEYS:
            meta.setdefault(k, []).extend(batch.pop(k, []))
        return batch

    end = plan.total_steps if stop_after is None else min(stop_after, plan.total_steps)
    padding_free = padding_free_backend(engine.trainable_model())
    tokens = [0, 0]  # this rank's real / computed tokens since the last logged step: train/padding_efficiency
    bar = tqdm(
        total=plan.total_steps,
        initial=state.global_step,
        disable=not io.show_progress,
        unit="step",
        dynamic_ncols=True,
        desc="train",
    )
    while state.global_step < end:
        step = state.global_step
        stage = stage_at(step, plan)
        t0 = time.perf_counter()
        loss_sum, samples, meta = 0.0, 0, {}
        for _ in range(io.grad_accum):
            batch = next_batch(stage, meta)
            tokens = [a + b for a, b in zip(tokens, token_counts(batch, padding_free))]
            loss_sum = loss_sum + engine.forward_backward(batch, 1.0 / io.grad_accum).float()  # stays on device
            samples += batch["pixel_values"].shape[0]  # one image per sample; packed rows hold several samples
        factor = lr_factor(step, plan)
        grad_norm = engine.optimizer_step(factor)
        loss = float(engine.reduce_mean(loss_sum / io.grad_accum))  # host sync, once per step
        dt = time.perf_counter() - t0
        state.global_step = step + 1
        state.cursor[stage] += plan.samples_per_step  # global positions: every rank consumed its slice of them
        state.losses.append(loss)
        if io.on_step_data:
            io.on_step_data(step, stage, meta)
        for hook in io.step_hooks:
            hook(step, stage, state, io)
        if state.first_step_done_at is None:
            state.first_step_done_at = time.perf_counter()
        gs = state.global_step
        lr = engine.current_lr()
        throughput = samples * io.world_size / dt
        bar.set_postfix(stage=stage, loss=f"{loss:.4f}", lr=f"{lr:.2e}", sps=f"{throughput:.1f}", refresh=False)
        bar.update(1)
        if gs % io.log_every == 0 or gs in (1, plan.stage_a_steps, plan.total_steps):
            io.tracker.log_metrics(
                {
                    "train/loss": loss,
                    "train/lr": lr,
                    "train/stage": 0.0 if stage == "A" else 1.0,
                    "train/grad_norm": grad_norm,
                    "train/samples_per_s": throughput,
                    "train/padding_efficiency": tokens[0] / max(tokens[1], 1),
                },
                step=gs,
            )
            tokens = [0, 0]
        if gs == plan.stage_a_steps and 0 < gs < plan.total_steps:  # the stage switch is an event
            state.stage_switch_step = gs
            io.tracker.log_metrics({"curriculum/stage_switch": 1.0}, step=gs)
            io.tracker.set_tags({"stage_switch_step": str(gs)})
            validate(io, gs, state)
            save(io, "stage_A_end", state)
        elif io.eval_every and gs % io.eval_every == 0 and gs != plan.total_steps:
            validate(io, gs, state)
        if io.save_every and gs % io.save_every == 0 and gs != plan.total_steps:
            save(io, step_dir_name(gs), state)
    bar.close()
    if state.global_step == plan.total_steps:
        validate(io, state.global_step, state)
        save(io, "final", state)
    elif stop_after is not None and step_dir_name(state.global_step) not in state.checkpoints:
        save(io, step_dir_name(state.global_step), state)
    return state


def write_run_summary(path: Path, state: LoopState, plan: StepPlan, **extra: Any) -> dict:
    summary = {
        "global_step": state.global_step,
        "total_steps": plan.total_steps,
        "stage_switch_step": state.stage_switch_step if state.stage_switch_step is not None else plan.stage_a_steps,
        "final_loss": state.losses[-1] if state.losses else None,
        "losses": state.losses,
        "val": state.val_history,
        "checkpoints": state.checkpoints,
        **extra,
    }
    path.write_text(json.dumps(summary, indent=2))
    return summary
