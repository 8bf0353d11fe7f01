"""Per-stage Ray Datasets for the Ray path: JSONL -> one stage's records -> pixel_values + tokens, streamed.

    ds_a = stage_dataset([train_path], "A", pre, n_rows=counts["A"])
    ds_b = stage_dataset([train_path], "B", pre, n_rows=counts["B"], no_ehr_variant=cfg.curriculum.ehr_dropout > 0)
    TorchTrainer(..., datasets={"A": ds_a, "B": ds_b}, dataset_config=ingest_config())
    # in each worker (the loop asks for a stage's batches from micro-batch `cursor` on):
    batches = shard_batches(ray.train.get_dataset_shard("B"), pre, spec, start=cursor)

Nothing is materialized: the JSONL is read as text (split into blocks of ~`rows_per_block` lines so decoding runs in
parallel tasks), parsed and validated per block, and each block is decoded/resized/tokenized in `map_batches` with
the same per-sample function the local path uses (`training.data.Preprocessor.sample`). Ray Train splits each stage
dataset into equal shards, one per worker (`streaming_split(equal=True)`).

Columns are fixed-shape (Ray Data stores them as tensor columns); per row ~ 4*3*S*S + 8*max_seq_len bytes:
  pixel_values (3, S, S) float32          input_ids, labels (max_seq_len,) int32, right-padded; length int32
  shortened bool                          study_id str
  Stage B with EHR dropout also carries input_ids_no_ehr / labels_no_ehr / length_no_ehr: the same sample with the
  Patient Data block emptied, so dropout is chosen per row AND epoch in the worker without re-tokenizing.
The worker's collate trims to the batch's longest row and pads with `Preprocessor.collate`, so a Ray batch is
exactly what the local path would build from the same rows.

Determinism (the data cursor depends on it): `ingest_config()` sets preserve_order and turns shard locality off, so
the equal split sends the same rows to the same rank in every run; the local shuffle is seeded per
(seed, stage, epoch, rank) and EHR dropout is a hash of (seed, study_id, epoch). Resuming at cursor c re-reads and
drops the shard's first c micro-batches (the split cannot seek).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from datasets_io.jsonl import join, path_exists
from datasets_io.records import RecordError, validate_record, with_empty_ehr
from datasets_io.tokens import IGNORE_INDEX, TokenizedSample, build_sample

ROWS_PER_BLOCK = 16  # lines per read block = rows per decode task; small blocks stream sooner and split finer
SHUFFLE_BUFFER_BATCHES = 8  # the worker's local shuffle buffer, in micro-batches


# ------------------------------------------------------------------------------------------- map_batches steps
def parse_lines(batch: dict[str, np.ndarray], *, stage: str, source: str, data_root: str, policy: str,
                check_images: bool) -> dict[str, np.ndarray]:
    """JSONL lines -> the records of one stage (validated exactly like `datasets_io.jsonl`). Under policy `skip` a bad
    record is dropped (the driver counted and reported it when it read the file up front); under `error` it raises."""
    cols: dict[str, list[str]] = {"study_id": [], "image": [], "prompt": [], "target": [], "where": []}
    for text in batch["text"]:
        where = f"{source} (line starting {str(text)[:40]!r})"
        try:
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise RecordError(where, "<json>", f"invalid JSON ({e.msg} at column {e.colno})") from None
            rec = validate_record(obj, where)
            if check_images and not path_exists(join(data_root, rec.image)):
                raise RecordError(where, "image", f"image not found: {join(data_root, rec.image)}")
        except RecordError:
            if policy == "error":
                raise
            continue
        if rec.stage != stage:
            continue
        where = f"{source} (study {rec.study_id}, stage {rec.stage})"
        for k, v in (("study_id", rec.study_id), ("image", rec.image), ("prompt", rec.prompt),
                     ("target", rec.target), ("where", where)):
            cols[k].append(v)
    return {k: np.asarray(v, dtype=object) for k, v in cols.items()}


def _fixed(tok: TokenizedSample, width: int, pad_id: int) -> tuple[np.ndarray, np.ndarray, int]:
    n = len(tok.input_ids)
    ids = np.full(width, pad_id, dtype=np.int32)
    labels = np.full(width, IGNORE_INDEX, dtype=np.int32)
    ids[:n], labels[:n] = tok.input_ids, tok.labels
    return ids, labels, n


def preprocess_rows(batch: dict[str, np.ndarray], *, pre: Any, no_ehr_variant: bool) -> dict[str, np.ndarray]:
    """Records -> model-ready fixed-shape columns: decode/resize (Preprocessor.sample), tokenize, pad to max_len."""
    width, pad = pre.max_len, pre.tokenizer.pad_token_id
    out: dict[str, list] = {"pixel_values": [], "input_ids": [], "labels": [], "length": [], "shortened": [],
                            "study_id": []}
    if no_ehr_variant:
        out.update({"input_ids_no_ehr": [], "labels_no_ehr": [], "length_no_ehr": []})
    for sid, image, prompt, target, where in zip(batch["study_id"], batch["image"], batch["prompt"],
                                                 batch["target"], batch["where"]):
        pixels, tok = pre.sample(str(prompt), str(target), str(image), str(where))  # (3, S, S), tokens
        ids, labels, n = _fixed(tok, width, pad)
        out["pixel_values"].append(pixels)
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["length"].append(n)
        out["shortened"].append(tok.shortened)
        out["study_id"].append(str(sid))
        if no_ehr_variant:
            tok0 = build_sample(pre.tokenizer, with_empty_ehr(str(prompt)), str(target),
                                image_token_id=pre.image_token_id, num_image_tokens=pre.num_image_tokens,
                                max_len=pre.max_len, overlong=pre.overlong, where=str(where))
            ids0, labels0, n0 = _fixed(tok0, width, pad)
            out["input_ids_no_ehr"].append(ids0)
            out["labels_no_ehr"].append(labels0)
            out["length_no_ehr"].append(n0)
    n_rows = len(out["study_id"])
    s = pre.image_spec.size
    pixels = np.stack(out["pixel_values"]).astype(np.float32) if n_rows else np.zeros((0, 3, s, s), np.float32)
    result = {
        "pixel_values": pixels,  # (B, 3, S, S)
        "shortened": np.asarray(out["shortened"], dtype=bool),
        "study_id": np.asarray(out["study_id"], dtype=object),
    }
    for k in ("input_ids", "labels", "input_ids_no_ehr", "labels_no_ehr"):
        if k in out:
            result[k] = np.stack(out[k]) if n_rows else np.zeros((0, width), np.int32)  # (B, max_len)
    for k in ("length", "length_no_ehr"):
        if k in out:
            result[k] = np.asarray(out[k], dtype=np.int32)
    return result


# ------------------------------------------------------------------------------------------- the datasets
def stage_dataset(paths: list[str] | str, stage: str, pre: Any, *, n_rows: int, policy: str = "error",
                  no_ehr_variant: bool = False, check_images: bool = False, rows_per_block: int = ROWS_PER_BLOCK,
                  source_rows: int | None = None, decoders: int = 2) -> Any:
    """The Stage `stage` Ray Dataset (lazy). `n_rows` = this stage's row count and `source_rows` = all lines of the
    files (both counted up front by the driver): they size the read blocks, the source of decode parallelism.
    `decoders` caps the concurrent parse/decode tasks: each new task process pays the torch + tokenizer import
    (seconds), so a few warm processes beat one per block on a small machine."""
    import ray.data

    paths = [paths] if isinstance(paths, str) else list(paths)
    lines = source_rows if source_rows is not None else n_rows * 2
    # More blocks than files makes the read split its output, and keeps parsing/decoding out of the single read
    # task (Ray does not fuse a split read with the maps after it): one decode task per block.
    n_blocks = max(len(paths), math.ceil(lines / rows_per_block))
    ds = ray.data.read_text(paths, drop_empty_lines=True, override_num_blocks=n_blocks)
    compute = ray.data.TaskPoolStrategy(size=max(1, decoders))  # the same for both maps, so they fuse
    ds = ds.map_batches(parse_lines, batch_size=None, batch_format="numpy", compute=compute,
                        fn_kwargs={"stage": stage, "source": ",".join(paths), "data_root": pre.data_root,
                                   "policy": policy, "check_images": check_images})
    ds = ds.map_batches(preprocess_rows, batch_size=None, batch_format="numpy", compute=compute,
                        fn_kwargs={"pre": pre, "no_ehr_variant": no_ehr_variant})
    return ds


def ingest_config() -> Any:
    """Ray Train's DataConfig for these datasets: split all, in a deterministic order (see module docstring)."""
    from ray.data import ExecutionOptions
    from ray.train import DataConfig

    return DataConfig(datasets_to_split="all", execution_options=ExecutionOptions(preserve_order=True),
                      enable_shard_locality=False)


# ------------------------------------------------------------------------------------------- the worker side
@dataclass(frozen=True)
class ShardSpec:
    stage: str
    batch_size: int
    seed: int
    rank: int
    ehr_dropout: float = 0.0
    shuffle: bool = True


def _unit(*parts: Any) -> float:
    """A uniform number in [0, 1) from a stable hash of `parts` (the same on every machine and Python run)."""
    digest = hashlib.blake2b("|".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def ehr_dropped(seed: int, study_id: str, epoch: int, p: float) -> bool:
    """Is this Stage B row trained with its Patient Data emptied in this epoch? Deterministic per (seed, row, epoch)."""
    return p > 0 and _unit(seed, "ehr_dropout", study_id, epoch) < p


def shuffle_seed(spec: ShardSpec, epoch: int) -> int:
    return int(_unit(spec.seed, "shuffle", spec.stage, epoch, spec.rank) * 2**31)


def collate(rows: dict[str, np.ndarray], pre: Any, spec: ShardSpec, epoch: int) -> dict[str, np.ndarray]:
    """Fixed-width columns of one micro-batch -> the padded batch `Preprocessor.collate` builds on the local path."""
    toks = []
    for i, sid in enumerate(rows["study_id"]):
        dropped = "input_ids_no_ehr" in rows and ehr_dropped(spec.seed, sid, epoch, spec.ehr_dropout)
        suffix = "_no_ehr" if dropped else ""
        n = int(rows["length" + suffix][i])
        toks.append(TokenizedSample(rows["input_ids" + suffix][i][:n].tolist(), rows["labels" + suffix][i][:n].tolist(),
                                    bool(rows["shortened"][i])))
    return pre.collate(list(rows["pixel_values"]), toks)


def shard_rows(shard: Any, spec: ShardSpec, start: int = 0) -> Iterator[tuple[dict[str, np.ndarray], int]]:
    """Endless (rows of one micro-batch, epoch) of one stage's shard from micro-batch `start` on: epoch after epoch
    (a new pass over the shard each time it runs out), full batches only, so every rank draws the same count per
    epoch. Needs no torch and no tokenizer, so a worker can start it first and build its model meanwhile.

    Every rank of a split dataset must iterate it in step (each new epoch is a barrier across the shards); the loop
    guarantees this by drawing the same number of micro-batches per step on every rank."""
    epoch, position = 0, 0
    while True:
        drawn = 0
        kwargs = {}
        if spec.shuffle:
            kwargs = {"local_shuffle_buffer_size": SHUFFLE_BUFFER_BATCHES * spec.batch_size,
                      "local_shuffle_seed": shuffle_seed(spec, epoch)}
        for rows in shard.iter_batches(batch_size=spec.batch_size, batch_format="numpy", drop_last=True,
                                       prefetch_batches=2, **kwargs):
            drawn += 1
            position += 1
            if position <= start:
                continue  # resuming: these were trained on before the checkpoint
            yield rows, epoch
        if drawn == 0:
            raise RuntimeError(f"stage {spec.stage}: rank {spec.rank}'s shard has fewer than {spec.batch_size} rows "
                               "(one micro-batch); use fewer workers, a smaller micro_batch_size or more data")
        epoch += 1


def shard_batches(shard: Any, pre: Any, spec: ShardSpec, start: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """`shard_rows`, collated: padded micro-batches exactly as the local path builds them."""
    for rows, epoch in shard_rows(shard, spec, start):
        yield collate(rows, pre, spec, epoch)
