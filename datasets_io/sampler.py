"""THE sampler: which row trains at which global position, the same for every runtime and worker count.

    spec = SamplerSpec(seed=0, n_rows={"A": 420, "B": 420}, replay_fraction=0.1, ehr_dropout=0.15)
    draw(spec, "B", 1234)                  # Draw(position=1234, row=17, replay=False, ehr_dropped=True)
    layout = BatchLayout(micro_batch_size=4, grad_accum=2, world_size=2)   # 16 samples per optimizer step
    layout.micro_positions(step_in_stage=3, rank=1, micro=0)               # range(56, 60)

Contract (pure: no state, no I/O):
- A stage's positions 0, 1, 2, ... walk a fresh full permutation of the stage's rows per epoch, seeded by
  (seed, stage, epoch): position p is row perm_epoch(p // n)[p % n]. Every row appears once per epoch.
- In Stage B, position p is a REPLAY of a Stage A row with probability `replay_fraction` (the Stage A row at
  position p of Stage A's own replay permutation), and a Stage B row has its Patient Data emptied with probability
  `ehr_dropout`. Both are decided by one draw seeded by (seed, stage, position), so they do not depend on who asks.
- The global batch of the k-th optimizer step of a stage holds positions [k*G, (k+1)*G), G = micro x accum x world.
  Rank r's micro-step j takes positions k*G + (r*accum + j)*micro .. +micro. So local with accumulation 4, Ray with
  2 workers x accumulation 2 and 4 workers x accumulation 1 train the same global batches.
- The data cursor of a checkpoint is, per stage, the number of global positions consumed (a multiple of G): it does
  not depend on the number of workers.

Rows are addressed by index into the stage's validated records (the order `training.recipe.load_run_data` returns).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np

from datasets_io.records import with_empty_ehr

STAGE_CODE = {"A": 1, "B": 2}
ROW_COLUMNS = ("study_id", "prompt", "target", "image", "where")  # what a stage's row table holds


@dataclass(frozen=True)
class SamplerSpec:
    seed: int
    n_rows: dict  # stage -> number of rows
    replay_fraction: float = 0.0
    ehr_dropout: float = 0.0


@dataclass(frozen=True)
class Draw:
    position: int  # global position within the stage
    row: int  # index into the rows of `source_stage`
    replay: bool  # a Stage A row replayed in Stage B
    ehr_dropped: bool  # trained with its Patient Data block emptied


@functools.lru_cache(maxsize=16)
def _permutation(seed: int, code: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, code, epoch]).permutation(n)


def _row(seed: int, stage: str, replay: bool, position: int, n: int) -> int:
    code = STAGE_CODE[stage] * 10 + int(replay)
    return int(_permutation(seed, code, position // n, n)[position % n])


def draw(spec: SamplerSpec, stage: str, position: int) -> Draw:
    """The sample at global `position` of `stage` (see the module's contract)."""
    n = spec.n_rows[stage]
    if n < 1:
        raise ValueError(f"stage {stage} has no rows")
    u_replay, u_drop = np.random.default_rng([spec.seed, 7, STAGE_CODE[stage], position]).random(2)
    if stage == "B" and spec.n_rows.get("A", 0) and u_replay < spec.replay_fraction:
        return Draw(position, _row(spec.seed, "B", True, position, spec.n_rows["A"]), True, False)
    dropped = stage == "B" and u_drop < spec.ehr_dropout
    return Draw(position, _row(spec.seed, stage, False, position, n), False, bool(dropped))


def draws(spec: SamplerSpec, stage: str, positions: Sequence[int]) -> list[Draw]:
    return [draw(spec, stage, p) for p in positions]


@dataclass(frozen=True)
class BatchLayout:
    """Who trains which positions: the global batch of one optimizer step, cut into ranks and micro-steps."""

    micro_batch_size: int
    grad_accum: int
    world_size: int

    @property
    def global_batch(self) -> int:
        return self.micro_batch_size * self.grad_accum * self.world_size

    def micro_positions(self, step_in_stage: int, rank: int, micro: int) -> range:
        first = step_in_stage * self.global_batch + (rank * self.grad_accum + micro) * self.micro_batch_size
        return range(first, first + self.micro_batch_size)

    def rank_positions(self, step_in_stage: int, rank: int) -> range:
        """Rank `rank`'s slice of the step's global batch: its micro-steps, in order."""
        first = self.micro_positions(step_in_stage, rank, 0).start
        return range(first, first + self.micro_batch_size * self.grad_accum)

    def rank_micro_batches(self, rank: int, start: int, end_step: int) -> Iterator[range]:
        """Rank `rank`'s micro-batches (positions) from the global cursor `start` to stage-local step `end_step`."""
        if start % self.global_batch:
            raise ValueError(
                f"cursor {start} is not a multiple of the global batch {self.global_batch}: it was "
                "saved with another batch layout"
            )
        for k in range(start // self.global_batch, end_step):
            for j in range(self.grad_accum):
                yield self.micro_positions(k, rank, j)


def row_table(records: Sequence[Any]) -> dict[str, list[str]]:
    """Validated records (datasets_io.records.Record) -> one stage's column table (plain lists: cheap to ray.put)."""
    return {c: [getattr(r, c) for r in records] for c in ROW_COLUMNS}


def sample_fields(tables: dict[str, dict[str, list]], stage: str, d: Draw) -> dict[str, str]:
    """The record fields a draw trains on: the replayed Stage A row or the stage's row, EHR emptied when dropped."""
    table = tables["A" if d.replay else stage]
    out = {c: table[c][d.row] for c in ROW_COLUMNS}
    if d.ehr_dropped:
        out["prompt"] = with_empty_ehr(out["prompt"])
    return out
