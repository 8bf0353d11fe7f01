"""From records to model-ready micro-batches: the preprocessing both runtimes share, and the local per-stage streams.

A stage's STREAM is an endless, deterministic sequence of samples: position i of stage S maps to a row through a
per-epoch permutation seeded by (seed, S, epoch), so the data cursor of a checkpoint is one integer per stage, and
resuming at position p reproduces exactly the batches an uninterrupted run would have drawn. In Stage B a position
may be a replay of a Stage A row (`curriculum.replay_fraction`) or have its Patient Data emptied
(`curriculum.ehr_dropout`); both are decided by the same position-seeded draw.

torch is imported only where a tensor is made: Ray Data's processes unpickle `Preprocessor` (read/decode tasks, the
split coordinators, the dataset manager), and each torch import there costs seconds of CPU at start-up.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from datasets_io.images import ImageSpec, preprocess_image
from datasets_io.jsonl import join, read_bytes
from datasets_io.packing import packed_batch
from datasets_io.records import Record, with_empty_ehr
from datasets_io.tokens import IGNORE_INDEX, build_sample, pad_batch

if TYPE_CHECKING:
    import torch


@dataclass
class Preprocessor:
    """rows -> one padded batch of numpy arrays. Picklable (shipped to Ray Data's map_batches workers)."""

    tokenizer: Any
    image_spec: ImageSpec
    image_token_id: int
    num_image_tokens: int
    max_len: int
    overlong: str
    data_root: str
    packing: bool = False
    """train.packing: lay a micro-batch out in rows of `max_len` tokens (datasets_io/packing.py) instead of padding
    every sample to the longest; the same samples, in the same order of positions."""

    def sample(self, prompt: str, target: str, image: str, where: str = ""):
        pixels = preprocess_image(read_bytes(join(self.data_root, image)), self.image_spec)  # (3, S, S)
        tok = build_sample(
            self.tokenizer, prompt, target, image_token_id=self.image_token_id,
            num_image_tokens=self.num_image_tokens, max_len=self.max_len, overlong=self.overlong, where=where,
        )
        return pixels, tok

    def collate(self, pixels: list[np.ndarray], toks: list) -> dict[str, np.ndarray]:
        if self.packing:
            return packed_batch(pixels, toks, self.max_len, self.tokenizer.pad_token_id)
        padded = pad_batch(toks, self.tokenizer.pad_token_id, side="right")
        return {
            "pixel_values": np.stack(pixels).astype(np.float32),  # (B, 3, S, S)
            "input_ids": np.asarray(padded["input_ids"], dtype=np.int64),  # (B, T)
            "attention_mask": np.asarray(padded["attention_mask"], dtype=np.int64),
            "labels": np.asarray(padded["labels"], dtype=np.int64),
            "truncated": np.asarray([t.truncated for t in toks], dtype=bool),
        }

    def batch(self, items: list[tuple[str, str, str, str]]) -> dict[str, np.ndarray]:
        """items: (prompt, target, image, where) tuples."""
        out = [self.sample(*it) for it in items]
        return self.collate([p for p, _ in out], [t for _, t in out])


def to_torch(batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    import torch

    return {k: torch.from_numpy(v) for k, v in batch.items() if k != "truncated"}


@dataclass(frozen=True)
class StreamSpec:
    seed: int
    replay_fraction: float = 0.0
    ehr_dropout: float = 0.0


class StageStream:
    """Position -> (prompt, target, image, where) for one stage; pure apart from a small permutation cache."""

    STAGE_CODE = {"A": 1, "B": 2, "val": 3}

    def __init__(self, stage: str, rows: list[Record], spec: StreamSpec, replay_rows: list[Record] | None = None):
        if not rows:
            raise ValueError(f"stage {stage} has no rows")
        self.stage, self.rows, self.spec, self.replay_rows = stage, rows, spec, replay_rows or []

    @functools.lru_cache(maxsize=4)
    def _perm(self, which: str, epoch: int) -> np.ndarray:
        n = len(self.rows if which == "main" else self.replay_rows)
        code = self.STAGE_CODE[self.stage] * 10 + (which == "replay")
        return np.random.default_rng([self.spec.seed, code, epoch]).permutation(n)

    def _pick(self, which: str, index: int) -> Record:
        rows = self.rows if which == "main" else self.replay_rows
        return rows[int(self._perm(which, index // len(rows))[index % len(rows)])]

    def item(self, position: int) -> tuple[str, str, str, str]:
        u_replay, u_drop = np.random.default_rng([self.spec.seed, 7, self.STAGE_CODE[self.stage], position]).random(2)
        if self.replay_rows and u_replay < self.spec.replay_fraction:
            r = self._pick("replay", position)
            return r.prompt, r.target, r.image, r.where
        r = self._pick("main", position)
        prompt = r.prompt
        if r.stage == "B" and u_drop < self.spec.ehr_dropout:
            prompt = with_empty_ehr(prompt)
        return prompt, r.target, r.image, r.where


class _PositionBatches:
    """Map-style dataset (what torch's DataLoader indexes): item k is the micro-batch at positions
    [start + k*B, start + (k+1)*B)."""

    def __init__(self, stream: StageStream, pre: Preprocessor, start: int, batch_size: int, count: int):
        self.stream, self.pre, self.start, self.batch_size, self.count = stream, pre, start, batch_size, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, k: int) -> dict[str, np.ndarray]:
        first = self.start + k * self.batch_size
        return self.pre.batch([self.stream.item(p) for p in range(first, first + self.batch_size)])


def local_batches(
    stream: StageStream, pre: Preprocessor, start: int, batch_size: int, count: int, num_workers: int = 0
) -> Iterator[dict[str, torch.Tensor]]:
    """`count` micro-batches from position `start`, decoded by `num_workers` DataLoader processes."""
    import torch

    loader = torch.utils.data.DataLoader(
        _PositionBatches(stream, pre, start, batch_size, count),
        batch_size=None, shuffle=False, num_workers=num_workers, collate_fn=lambda b: b,
        persistent_workers=False, prefetch_factor=2 if num_workers else None,
    )
    for batch in loader:
        yield to_torch(batch)


def count_label_tokens(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"] != IGNORE_INDEX).sum())
