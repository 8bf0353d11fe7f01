"""The curriculum as pure functions of the optimizer step (table-tested in tests/test_curriculum.py).

    plan = plan_steps(cfg, n_stage_a_rows, n_stage_b_rows, world_size)   # grad_accum_for(...) when the config
                                                                          # states train.global_batch_size
    stage_at(step, plan)   # "A" for steps [0, plan.stage_a_steps), "B" after
    lr_at(step, plan, base_lr)

Steps are OPTIMIZER steps (after gradient accumulation). Stage A is the first `stage_split` fraction; the switch
happens between step `stage_a_steps - 1` and `stage_a_steps` on every rank, because every rank computes the same plan
from the same counts (a Ray Dataset shard has no length, so counts are taken up front).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class StepPlan:
    total_steps: int
    stage_a_steps: int
    warmup_steps: int
    min_lr_ratio: float
    samples_per_step: int  # micro_batch x grad_accum x world_size

    @property
    def stage_b_steps(self) -> int:
        return self.total_steps - self.stage_a_steps


def samples_per_step(micro_batch_size: int, grad_accum: int, world_size: int) -> int:
    return micro_batch_size * grad_accum * world_size


def total_steps_for(max_steps: int, epochs: float, n_train_rows: int, per_step: int) -> int:
    """Explicit `max_steps`, else enough steps to see every training row `epochs` times."""
    if max_steps > 0:
        return max_steps
    return max(1, math.ceil(epochs * n_train_rows / per_step))


def make_plan(
    *,
    max_steps: int,
    epochs: float,
    n_rows_a: int,
    n_rows_b: int,
    micro_batch_size: int,
    grad_accum: int,
    world_size: int,
    stage_split: float,
    warmup_steps: int,
    min_lr_ratio: float,
) -> StepPlan:
    per_step = samples_per_step(micro_batch_size, grad_accum, world_size)
    total = total_steps_for(max_steps, epochs, n_rows_a + n_rows_b, per_step)
    stage_a = min(total, round(stage_split * total))
    return StepPlan(total, stage_a, min(warmup_steps, total), min_lr_ratio, per_step)


def grad_accum_for(micro_batch_size: int, grad_accum: int, global_batch_size: int, world_size: int) -> int:
    """Micro-batches per optimizer step on each rank. `global_batch_size` 0 keeps `grad_accum`; otherwise it is
    derived, as DeepSpeed's `train_batch_size` does, so a config states its samples per step whatever runs it."""
    if global_batch_size <= 0:
        return grad_accum
    per_round = micro_batch_size * world_size
    if global_batch_size % per_round:
        raise ValueError(
            f"train.global_batch_size: {global_batch_size} is not a multiple of micro_batch_size x "
            f"workers = {micro_batch_size} x {world_size} = {per_round}"
        )
    return global_batch_size // per_round


def with_derived_grad_accum(cfg, world_size: int):
    """A copy of `cfg` whose `train.grad_accum` is the one `grad_accum_for` derives for `world_size` (the loop, the
    plan and the DeepSpeed JSON all read it from there)."""
    t = cfg.train
    accum = grad_accum_for(t.micro_batch_size, t.grad_accum, t.global_batch_size, world_size)
    return cfg.model_copy(update={"train": t.model_copy(update={"grad_accum": accum})})


def plan_steps(cfg, n_rows_a: int, n_rows_b: int, world_size: int = 1) -> StepPlan:
    t = cfg.train
    accum = grad_accum_for(t.micro_batch_size, t.grad_accum, t.global_batch_size, world_size)
    return make_plan(
        max_steps=t.max_steps,
        epochs=t.epochs,
        n_rows_a=n_rows_a,
        n_rows_b=n_rows_b,
        micro_batch_size=t.micro_batch_size,
        grad_accum=accum,
        world_size=world_size,
        stage_split=cfg.curriculum.stage_split,
        warmup_steps=t.warmup_steps,
        min_lr_ratio=t.min_lr_ratio,
    )


def stage_at(step: int, plan: StepPlan) -> str:
    """The stage that optimizer step `step` (0-based) trains on."""
    if not 0 <= step < plan.total_steps:
        raise ValueError(f"step {step} outside [0, {plan.total_steps})")
    return "A" if step < plan.stage_a_steps else "B"


def lr_factor(step: int, plan: StepPlan) -> float:
    """Linear warmup then one cosine over BOTH stages (no restart at the switch), to `min_lr_ratio`."""
    if plan.warmup_steps and step < plan.warmup_steps:
        return (step + 1) / plan.warmup_steps
    span = max(1, plan.total_steps - plan.warmup_steps)
    progress = min(1.0, (step - plan.warmup_steps) / span)
    return plan.min_lr_ratio + (1 - plan.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def lr_at(step: int, plan: StepPlan, base_lr: float) -> float:
    return base_lr * lr_factor(step, plan)
