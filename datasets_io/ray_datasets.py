"""The Ray path's data: each worker builds its own Ray Dataset of the positions it trains on, from its cursor on.

    # driver, once:  rows = ray.put({s: row_table(records[s]) for s in ("A", "B")})
    # each worker, per stage (a restarted worker knows its cursor only from the checkpoint):
    items = worker_items(spec, layout, rank, "B", cursor, end_step=plan.stage_b_steps)
    for batch in stage_batches(stage_dataset(items, rows, "B", pre), pre, micro_batch_size): ...

`items` are the sampler's draws for this rank's positions (datasets_io/sampler.py): (position, row, replay,
ehr_dropped), a few ints each, nothing before the cursor. `map_batches` turns them into model-ready rows in Ray Data
tasks with `Preprocessor.sample_at`, the per-sample function the local path uses; the rows' text and image paths come
from the driver's one `ray.put` (fetched once per task process, not per step). `iter_batches(micro_batch_size)` with
preserve_order gives the micro-batches in position order, so a Ray micro-batch is exactly the local one of the same
positions. Resuming seeks: positions before the cursor are never read, decoded or tokenized.

Columns are fixed-shape (Ray Data stores them as tensor columns); per row ~ 4*3*S*S + 12*max_seq_len bytes:
  pixel_values (3, S, S) float32      input_ids, labels, prompt_labels (max_seq_len,) int32, right-padded (prompt_labels
                                      all IGNORE_INDEX without a prompt loss); length int32
  shortened, ehr_dropped, replay bool  study_id str, position int64
The worker's `collate` trims to the batch's longest row and pads with `Preprocessor.collate`.
"""

from __future__ import annotations

import math
from typing import Any, Iterator

import numpy as np

from datasets_io.sampler import BatchLayout, Draw, SamplerSpec, draws, sample_fields
from datasets_io.tokens import IGNORE_INDEX, TokenizedSample

ROWS_PER_BLOCK = 16  # items per block = samples per decode task; small blocks stream sooner and split finer
DECODERS_PER_WORKER = 2  # concurrent decode tasks per worker's dataset (each new task process pays the imports)
DECODE_TASK_CPUS = 0.5  # fractional: the decode tasks of all workers must fit next to the workers (stack-facts)

_fetched: dict[str, Any] = {}  # ObjectRef hex -> the row tables, once per task process


def worker_items(
    spec: SamplerSpec, layout: BatchLayout, rank: int, stage: str, cursor: int, end_step: int
) -> list[dict]:
    """This rank's draws for `stage` from the global `cursor` to stage-local step `end_step`, in training order."""
    return [
        {"position": d.position, "row": d.row, "replay": d.replay, "ehr_dropped": d.ehr_dropped}
        for positions in layout.rank_micro_batches(rank, cursor, end_step)
        for d in draws(spec, stage, positions)
    ]


def _tables(rows: Any) -> dict:
    if isinstance(rows, dict):
        return rows
    import ray

    key = rows.hex()
    if key not in _fetched:
        _fetched.clear()  # one run's tables at a time
        _fetched[key] = ray.get(rows)
    return _fetched[key]


def _fixed(seq: list[int], width: int, fill: int) -> np.ndarray:
    out = np.full(width, fill, dtype=np.int32)
    out[: len(seq)] = seq
    return out


def decode_items(batch: dict[str, np.ndarray], *, rows: Any, stage: str, pre: Any) -> dict[str, np.ndarray]:
    """map_batches step: sampler draws -> model-ready fixed-shape columns (decode/resize, tokenize, pad)."""
    tables, width, pad = _tables(rows), pre.max_len, pre.tokenizer.pad_token_id
    keys = ("pixel_values", "input_ids", "labels", "prompt_labels", "length", "shortened", "study_id")
    out: dict[str, list] = {k: [] for k in keys}
    for pos, row, replay, dropped in zip(batch["position"], batch["row"], batch["replay"], batch["ehr_dropped"]):
        d = Draw(int(pos), int(row), bool(replay), bool(dropped))
        fields = sample_fields(tables, stage, d)
        pixels, tok = pre.sample_at(stage, d.position, fields)  # (3, S, S), tokens
        for k, v in (
            ("pixel_values", pixels),
            ("input_ids", _fixed(tok.input_ids, width, pad)),
            ("labels", _fixed(tok.labels, width, IGNORE_INDEX)),
            ("prompt_labels", _fixed(tok.prompt_labels or [], width, IGNORE_INDEX)),  # all IGNORE without one
            ("length", len(tok.input_ids)),
            ("shortened", tok.shortened),
            ("study_id", fields["study_id"]),
        ):
            out[k].append(v)
    return {
        "pixel_values": np.stack(out["pixel_values"]).astype(np.float32),  # (B, 3, S, S)
        "input_ids": np.stack(out["input_ids"]),
        "labels": np.stack(out["labels"]),  # (B, max_len) int32
        "prompt_labels": np.stack(out["prompt_labels"]),  # (B, max_len) int32
        "length": np.asarray(out["length"], dtype=np.int32),
        "shortened": np.asarray(out["shortened"], dtype=bool),
        "study_id": np.asarray(out["study_id"], dtype=object),
        "position": np.asarray(batch["position"], dtype=np.int64),
        "replay": np.asarray(batch["replay"], dtype=bool),
        "ehr_dropped": np.asarray(batch["ehr_dropped"], dtype=bool),
    }


def stage_dataset(
    items: list[dict],
    rows: Any,
    stage: str,
    pre: Any,
    *,
    rows_per_block: int = ROWS_PER_BLOCK,
    decoders: int = DECODERS_PER_WORKER,
) -> Any:
    """The lazy Ray Dataset of one worker's remaining samples of `stage`, in order. `rows`: the ObjectRef of the
    driver's row tables (or the tables themselves)."""
    import ray.data

    if not items:
        raise ValueError(f"stage {stage}: no samples left to draw")
    ds = ray.data.from_items(items, override_num_blocks=max(1, math.ceil(len(items) / rows_per_block)))
    ds.context.execution_options.preserve_order = True  # micro-batch k is positions k*mb .. of this rank's items
    return ds.map_batches(
        decode_items,
        batch_size=None,
        batch_format="numpy",
        num_cpus=DECODE_TASK_CPUS,
        compute=ray.data.TaskPoolStrategy(size=max(1, decoders)),
        fn_kwargs={"rows": rows, "stage": stage, "pre": pre},
    )


def collate(rows: dict[str, np.ndarray], pre: Any) -> dict[str, np.ndarray]:
    """Fixed-width columns of one micro-batch -> the padded batch `Preprocessor.collate` builds on the local path,
    with the per-sample bookkeeping (study_id, ehr_dropped, replay) the data-order log records."""
    toks = [
        TokenizedSample(
            rows["input_ids"][i][:n].tolist(),
            rows["labels"][i][:n].tolist(),
            bool(rows["shortened"][i]),
            rows["prompt_labels"][i][:n].tolist() if pre.prompt_loss else None,
        )
        for i, n in enumerate(rows["length"].tolist())
    ]
    batch = pre.collate(list(rows["pixel_values"]), toks)
    batch.update({k: rows[k] for k in ("study_id", "ehr_dropped", "replay")})
    return batch


def stage_batches(ds: Any, pre: Any, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """The dataset's micro-batches, collated, in position order."""
    for rows in ds.iter_batches(batch_size=batch_size, batch_format="numpy", drop_last=False, prefetch_batches=2):
        yield collate(rows, pre)
