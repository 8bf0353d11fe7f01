"""From records to model-ready micro-batches: the preprocessing both runtimes share, the local micro-batch source,
the data-order log and the planned order.

Which sample trains where is the sampler's (datasets_io/sampler.py): position p of a stage is a pure function of
(seed, stage, p), and optimizer step k of a stage owns positions [k*G, (k+1)*G), G = micro x accum x world. The loop's
data cursor is the number of positions consumed per stage, so resuming at cursor c reproduces exactly the batches an
uninterrupted run would have drawn, whatever the number of workers.

torch is imported only where a tensor is made: Ray Data's processes unpickle `Preprocessor` (read/decode tasks, the
split coordinators, the dataset manager), and each torch import there costs seconds of CPU at start-up.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from datasets_io.image_cache import ImageCache, load_pixels
from datasets_io.images import ImageSpec
from datasets_io.jsonl import join
from datasets_io.packing import attention_span, packed_batch, padding_free
from datasets_io.records import Record
from datasets_io.sampler import BatchLayout, Draw, SamplerSpec, draw, draws, row_table, sample_fields
from datasets_io.tokens import build_sample, pad_batch
from training.curriculum import stage_at

DECODE_HOOKS: list = []  # test-only: callables hook(stage, position), run before each training sample's decode


@dataclass
class Preprocessor:
    """rows -> one padded batch of numpy arrays. Picklable (shipped to Ray Data's map_batches workers).

    `decode_hooks` (test-only, from DECODE_HOOKS when built) travel with it into Ray Data's task processes, so a test
    can count which positions were decoded on either runtime. Production code registers none."""

    tokenizer: Any
    image_spec: ImageSpec
    image_token_id: int
    num_image_tokens: int
    max_len: int
    overlong: str
    data_root: str
    image_cache: ImageCache | None = None
    """Decoded images on disk (datasets_io.image_cache), shared by both stages and all epochs; None = decode always."""
    prompt_loss: bool = False
    """train.prompt_loss_weight > 0: samples carry the prompt's text tokens as `prompt_labels` too."""
    packing: bool = False
    """train.packing: lay a micro-batch out in rows of `max_len` tokens (datasets_io/packing.py) instead of padding
    every sample to the longest; the same samples, in the same order of positions."""
    attention_span: float = math.inf
    """How packing weighs attention against tokens (datasets_io.packing.plan_rows); inf: tokens alone."""
    packing_forwards: int = 1
    """train.packing_forwards: packed rows in up to this many forward passes of their own widths (1 for FlashAttention,
    whose one padding-free row has no padding to save)."""
    decode_hooks: tuple = field(default_factory=lambda: tuple(DECODE_HOOKS))

    @classmethod
    def for_run(cls, cfg: Any, spec: Any, image_cache: bool = True) -> "Preprocessor":
        """The run's preprocessor: `spec` is anything with tokenizer, image_spec, image_token_id, num_image_tokens
        and text_config (a model bundle, or the Ray driver's namespace from the base's config); the budget, overlong
        rule, data root and packing from `cfg`, packing's attention span from the language model's shape and
        cfg.lora (inf for FlashAttention, which attends within samples whatever the layout); the image cache of
        `data.image_cache` unless `image_cache=False` (an unwritable directory fails here, on the node that builds
        it: node-local paths differ)."""
        from datasets_io.config import image_cache_dir
        from datasets_io.image_cache import open_image_cache

        span, forwards = math.inf, 1
        if cfg.train.packing and not padding_free(cfg.model.attn_implementation):
            span = attention_span(spec.text_config, cfg.lora.r, cfg.lora.target_modules)
            forwards = cfg.train.packing_forwards

        return cls(
            spec.tokenizer,
            spec.image_spec,
            spec.image_token_id,
            spec.num_image_tokens,
            cfg.data.max_seq_len,
            cfg.data.overlong,
            cfg.data.root,
            image_cache=open_image_cache(image_cache_dir(cfg)) if image_cache else None,
            prompt_loss=cfg.train.prompt_loss_weight > 0,
            packing=cfg.train.packing,
            attention_span=span,
            packing_forwards=forwards,
        )

    def sample_at(self, stage: str, position: int, fields: dict[str, str]):
        """The training sample at `position` of `stage` (fields from `datasets_io.sampler.sample_fields`)."""
        for hook in self.decode_hooks:
            hook(stage, position)
        return self.sample(fields["prompt"], fields["target"], fields["image"], fields["where"])

    def sample(self, prompt: str, target: str, image: str, where: str = ""):
        path = join(self.data_root, image)
        pixels = load_pixels(path, self.image_spec, self.image_cache)  # (3, S, S)
        tok = build_sample(
            self.tokenizer,
            prompt,
            target,
            image_token_id=self.image_token_id,
            num_image_tokens=self.num_image_tokens,
            max_len=self.max_len,
            overlong=self.overlong,
            where=where,
            prompt_loss=self.prompt_loss,
        )
        return pixels, tok

    def collate(self, pixels: list[np.ndarray], toks: list) -> dict[str, np.ndarray]:
        if self.packing:
            pad_id = self.tokenizer.pad_token_id
            return packed_batch(pixels, toks, self.max_len, pad_id, self.attention_span, self.packing_forwards)
        padded = pad_batch(toks, self.tokenizer.pad_token_id, side="right")
        return {
            "pixel_values": np.stack(pixels).astype(np.float32),  # (B, 3, S, S)
            # input_ids (B, T), attention_mask, labels and prompt_labels when the samples carry them
            **{k: np.asarray(v, dtype=np.int64) for k, v in padded.items()},
            "shortened": np.asarray([t.shortened for t in toks], dtype=bool),
        }

    def batch(self, items: list[tuple[str, str, str, str]]) -> dict[str, np.ndarray]:
        """items: (prompt, target, image, where) tuples."""
        out = [self.sample(*it) for it in items]
        return self.collate([p for p, _ in out], [t for _, t in out])


META_KEYS = ("study_id", "ehr_dropped", "replay")  # per-sample bookkeeping a batch carries (not model inputs)


def to_torch(batch: dict[str, np.ndarray]) -> dict[str, Any]:
    """Model inputs as tensors; the META_KEYS stay plain lists (the loop records them, the model never sees them)."""
    import torch

    out: dict[str, Any] = {k: torch.from_numpy(v) for k, v in batch.items() if k != "shortened" and k not in META_KEYS}
    out.update({k: list(batch[k]) for k in META_KEYS if k in batch})
    return out


def with_meta(batch: dict[str, np.ndarray], draws: list[Draw], study_ids: list[str]) -> dict[str, np.ndarray]:
    batch["study_id"] = np.asarray(study_ids, dtype=object)
    batch["ehr_dropped"] = np.asarray([d.ehr_dropped for d in draws], dtype=bool)
    batch["replay"] = np.asarray([d.replay for d in draws], dtype=bool)
    return batch


def sampler_spec(cfg: Any, n_rows: dict[str, int]) -> SamplerSpec:
    return SamplerSpec(cfg.train.seed, dict(n_rows), cfg.curriculum.replay_fraction, cfg.curriculum.ehr_dropout)


def micro_batch(
    pre: Preprocessor, tables: dict[str, dict[str, list]], spec: SamplerSpec, stage: str, positions: range
) -> dict[str, np.ndarray]:
    """The micro-batch at global `positions` of `stage` (local path; the Ray path builds the same one in
    datasets_io.ray_datasets)."""
    ds = draws(spec, stage, positions)
    fields = [sample_fields(tables, stage, d) for d in ds]
    out = [pre.sample_at(stage, d.position, f) for d, f in zip(ds, fields)]
    batch = pre.collate([p for p, _ in out], [t for _, t in out])
    return with_meta(batch, ds, [f["study_id"] for f in fields])


class _MicroBatches:
    """Map-style dataset (what torch's DataLoader indexes): item k is this rank's k-th micro-batch."""

    def __init__(self, pre: Preprocessor, tables: dict, spec: SamplerSpec, stage: str, micro: list[range]):
        self.pre, self.tables, self.spec, self.stage, self.micro = pre, tables, spec, stage, micro

    def __len__(self) -> int:
        return len(self.micro)

    def __getitem__(self, k: int) -> dict[str, np.ndarray]:
        return micro_batch(self.pre, self.tables, self.spec, self.stage, self.micro[k])


def local_batches(
    pre: Preprocessor, tables: dict, spec: SamplerSpec, stage: str, micro: list[range], num_workers: int = 0
) -> Iterator[dict[str, Any]]:
    """The micro-batches at the position ranges `micro`, decoded by `num_workers` DataLoader processes."""
    import torch

    loader = torch.utils.data.DataLoader(
        _MicroBatches(pre, tables, spec, stage, micro),
        batch_size=None,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=lambda b: b,
        persistent_workers=False,
        prefetch_factor=2 if num_workers else None,
        generator=torch.Generator(),  # its own: a new iterator must not draw from the global RNG (LoRA dropout's)
    )
    for batch in loader:
        yield to_torch(batch)


@dataclass(frozen=True)
class StreamSpec:
    seed: int
    replay_fraction: float = 0.0
    ehr_dropout: float = 0.0


class StageStream:
    """Position -> (prompt, target, image, where) for one stage: a thin wrapper over the sampler, for scripts and
    tests that want samples without a batch layout."""

    def __init__(self, stage: str, rows: list[Record], spec: StreamSpec, replay_rows: list[Record] | None = None):
        if not rows:
            raise ValueError(f"stage {stage} has no rows")
        self.stage = stage
        self.tables = {stage: row_table(rows), "A": row_table(replay_rows or (rows if stage == "A" else []))}
        n_rows = {stage: len(rows), "A": len(replay_rows or (rows if stage == "A" else []))}
        self.spec = SamplerSpec(spec.seed, n_rows, spec.replay_fraction, spec.ehr_dropout)

    def item(self, position: int) -> tuple[str, str, str, str]:
        f = sample_fields(self.tables, self.stage, draw(self.spec, self.stage, position))
        return f["prompt"], f["target"], f["image"], f["where"]


class DataOrderLog:
    """`train.record_data_order`: one JSON line per optimizer step in <output.dir>/data_order.jsonl with the study
    ids (and flags) every rank really trained on, in rank order, i.e. the global batch in position order.

    Every rank calls it once per step (all_gather_object is a collective: every rank must); rank 0 writes. A restart
    first drops the lines of steps at or after the step it resumes from, so the file has each step once."""

    def __init__(self, path: Path, rank: int, world_size: int, resume_step: int):
        self.path, self.rank, self.world_size = Path(path), rank, world_size
        if rank == 0:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            kept = []
            if self.path.is_file() and resume_step > 0:
                kept = [ln for ln in self.path.read_text().splitlines() if json.loads(ln)["step"] < resume_step]
            self.path.write_text("".join(ln + "\n" for ln in kept))

    def __call__(self, step: int, stage: str, meta: dict[str, list]) -> None:
        mine = {k: [v.item() if hasattr(v, "item") else v for v in meta.get(k, [])] for k in META_KEYS}
        parts = [mine]
        if self.world_size > 1:
            import torch.distributed as dist

            parts = [None] * self.world_size
            dist.all_gather_object(parts, mine)  # a collective on the training process group
        if self.rank == 0:
            line = {"step": step, "stage": stage, **{k: [v for p in parts for v in p[k]] for k in META_KEYS}}
            line["study_ids"] = line.pop("study_id")
            with open(self.path, "a") as f:
                f.write(json.dumps(line) + "\n")


def planned_order(
    spec: SamplerSpec, tables: dict[str, dict[str, list]], plan: Any, layout: BatchLayout, steps: int | None = None
) -> list[dict]:
    """What `data_order.jsonl` should hold: per optimizer step, the stage, the global batch (study ids, flags) and
    each rank's positions. Pure: the `launcher data plan` command prints it, tests compare runs with it."""
    out = []
    for step in range(plan.total_steps if steps is None else min(steps, plan.total_steps)):
        stage = stage_at(step, plan)
        k = step if stage == "A" else step - plan.stage_a_steps
        ranks = [list(layout.rank_positions(k, r)) for r in range(layout.world_size)]
        ds = draws(spec, stage, [p for r in ranks for p in r])
        out.append(
            {
                "step": step,
                "stage": stage,
                "study_ids": [sample_fields(tables, stage, d)["study_id"] for d in ds],
                "ehr_dropped": [d.ehr_dropped for d in ds],
                "replay": [d.replay for d in ds],
                "ranks": [[r[0], r[-1] + 1] for r in ranks],
            }
        )
    return out
