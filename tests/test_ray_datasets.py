"""Stage A / Stage B Ray Datasets: parsing, map_batches output, equal deterministic shards, cursor resume, cycling.

    python -m pytest tests/test_ray_datasets.py -q

The first tests need no cluster; the `ray_local` ones use one Ray instance (127.0.0.1, 4 logical CPUs, its own temp
dir) shared with tests/test_ray_train.py and shut down at the end of the session.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, tiny_overrides
from datasets_io.ray_datasets import (ShardSpec, collate, ehr_dropped, ingest_config, parse_lines, preprocess_rows,
                                      shard_batches, stage_dataset)
from datasets_io.records import RecordError


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def prepared(synth_dir, tmp_path_factory):
    """(cfg, Preprocessor, run data) on the session's synthetic data, with the tiny base (tokenizer) built once."""
    from launcher.config import load_config
    from launcher.local import corpus_texts, load_run_data
    from launcher.ray_train import make_preprocessor
    from training.model import resolve_base_path

    out = tmp_path_factory.mktemp("ray_data_run")
    cfg = load_config(REPO / "configs" / "tiny.yaml", tiny_overrides(synth_dir, out))
    data = load_run_data(cfg)
    base = resolve_base_path(cfg, corpus_texts(data))
    return cfg, make_preprocessor(cfg, base), data


def train_lines(cfg) -> list[str]:
    from launcher.config import data_path

    return [ln for ln in Path(data_path(cfg, "train_file")).read_text().splitlines() if ln.strip()]


def parse(cfg, lines, stage, policy="error"):
    return parse_lines({"text": np.asarray(lines, dtype=object)}, stage=stage, source="train.jsonl",
                       data_root=cfg.data.root, policy=policy, check_images=True)


# ------------------------------------------------------------------------------------------------ no cluster
def test_parse_lines_keeps_one_stage_and_applies_the_bad_record_policy(prepared):
    cfg, _, data = prepared
    lines = train_lines(cfg)
    for stage in ("A", "B"):
        rows = parse(cfg, lines, stage)
        assert list(rows["study_id"]) == [r.study_id for r in data.train[stage]]  # file order, this stage only
    bad = lines[:3] + ['{"study_id": "1", "image": "x.jpg"}', "not json"] + lines[3:6]
    with pytest.raises(RecordError, match="missing required key"):
        parse(cfg, bad, "A")
    kept = parse(cfg, bad, "A", policy="skip")
    assert len(kept["study_id"]) == len(parse(cfg, lines[:6], "A")["study_id"])


def test_map_batches_columns_and_collate_match_the_local_batch(prepared):
    """preprocess_rows -> fixed-shape columns; collate -> exactly Preprocessor.batch of the same rows."""
    cfg, pre, _ = prepared
    rows = parse(cfg, train_lines(cfg)[:12], "B")
    cols = preprocess_rows(rows, pre=pre, no_ehr_variant=True)
    n, s, width = len(rows["study_id"]), pre.image_spec.size, cfg.data.max_seq_len
    assert cols["pixel_values"].shape == (n, 3, s, s) and cols["pixel_values"].dtype == np.float32
    for k in ("input_ids", "labels", "input_ids_no_ehr", "labels_no_ehr"):
        assert cols[k].shape == (n, width)
    assert (cols["length_no_ehr"] < cols["length"]).all()  # the emptied Patient Data block is shorter

    spec = ShardSpec("B", n, seed=0, rank=0, ehr_dropout=0.0)
    got = collate(cols, pre, spec, epoch=0)
    want = pre.batch(list(zip(rows["prompt"], rows["target"], rows["image"], rows["where"])))
    for k in ("pixel_values", "input_ids", "attention_mask", "labels"):
        np.testing.assert_array_equal(got[k], want[k])

    from datasets_io.records import with_empty_ehr

    all_dropped = collate(cols, pre, ShardSpec("B", n, seed=0, rank=0, ehr_dropout=0.999999), epoch=0)
    want0 = pre.batch([(with_empty_ehr(p), t, i, w) for p, t, i, w in
                       zip(rows["prompt"], rows["target"], rows["image"], rows["where"])])
    np.testing.assert_array_equal(all_dropped["input_ids"], want0["input_ids"])


def test_data_tasks_decode_without_importing_torch(prepared, tmp_path):
    """Ray Data's processes (read/decode tasks, split coordinators, dataset manager) unpickle the Preprocessor and
    run parse_lines/preprocess_rows; a torch import there costs each of them seconds of CPU at start-up."""
    import subprocess
    import sys

    import ray.cloudpickle as cloudpickle

    cfg, pre, _ = prepared
    job = tmp_path / "job.pkl"
    job.write_bytes(cloudpickle.dumps((pre, train_lines(cfg)[:40], cfg.data.root)))
    code = (
        "import pickle, sys\n"
        "import numpy as np\n"
        "from datasets_io.ray_datasets import parse_lines, preprocess_rows\n"
        f"pre, lines, root = pickle.loads(open({str(job)!r}, 'rb').read())\n"
        "rows = parse_lines({'text': np.asarray(lines, dtype=object)}, stage='B', source='t', data_root=root,\n"
        "                   policy='error', check_images=True)\n"
        "out = preprocess_rows(rows, pre=pre, no_ehr_variant=True)\n"
        "print(len(out['study_id']), out['pixel_values'].shape[1], 'torch' in sys.modules)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    n_rows, channels, torch_imported = run.stdout.split()
    assert int(n_rows) > 0 and channels == "3"  # it really decoded something
    assert torch_imported == "False"


def test_ehr_dropout_is_a_deterministic_draw_per_row_and_epoch():
    ids = [str(50_000_000 + i) for i in range(4000)]
    first = [ehr_dropped(0, sid, 0, 0.15) for sid in ids]
    assert first == [ehr_dropped(0, sid, 0, 0.15) for sid in ids]  # the same on every call / machine
    assert 0.12 < np.mean(first) < 0.18
    assert first != [ehr_dropped(0, sid, 1, 0.15) for sid in ids]  # a new draw each epoch
    assert first != [ehr_dropped(1, sid, 0, 0.15) for sid in ids]  # and per seed
    assert not any(ehr_dropped(0, sid, 0, 0.0) for sid in ids)


# ------------------------------------------------------------------------------------------------ real Ray
def split_for_workers(ds, world: int) -> list:
    """Exactly what Ray Train does with ingest_config(): one DataIterator per rank."""
    return [it["B"] for it in ingest_config().configure({"B": ds}, world_size=world, worker_handles=None,
                                                         worker_node_ids=None)]


def in_threads(fns) -> list:
    """Consumers of one streaming split must run concurrently (each epoch starts when all of them ask)."""
    out = [None] * len(fns)

    def run(i):
        out[i] = fns[i]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    assert all(o is not None for o in out), "a shard consumer hung"
    return out


@pytest.mark.slow
def test_stage_shards_are_equal_and_deterministic(ray_local, prepared):
    cfg, pre, data = prepared
    from launcher.config import data_path

    n_b = len(data.train["B"])
    ds = stage_dataset([data_path(cfg, "train_file")], "B", pre, n_rows=n_b, source_rows=2 * n_b,
                       no_ehr_variant=True)
    batch = ds.take_batch(5, batch_format="numpy")  # the map_batches output
    s = pre.image_spec.size
    assert batch["pixel_values"].shape == (5, 3, s, s)
    assert batch["input_ids"].shape == (5, cfg.data.max_seq_len) and batch["labels"].shape == (5, cfg.data.max_seq_len)
    assert batch["length"].shape == (5,) and batch["input_ids_no_ehr"].shape == (5, cfg.data.max_seq_len)

    def ids_per_rank():
        shards = split_for_workers(ds, 2)
        return in_threads([lambda it=it: [sid for b in it.iter_batches(batch_size=7, batch_format="numpy")
                                          for sid in b["study_id"]] for it in shards])

    first, again = ids_per_rank(), ids_per_rank()
    assert len(first[0]) == len(first[1]) and len(first[0]) >= (n_b - 1) // 2  # equal shards, <= world-1 rows dropped
    assert not set(first[0]) & set(first[1])
    assert set(first[0]) | set(first[1]) <= {r.study_id for r in data.train["B"]}
    assert first == again  # the same rows on the same rank in every run: what the data cursor relies on


@pytest.mark.slow
def test_shard_stream_resumes_at_a_cursor_and_cycles(ray_local, prepared):
    cfg, pre, data = prepared
    from launcher.config import data_path

    n_a = len(data.train["A"])
    ds = stage_dataset([data_path(cfg, "train_file")], "A", pre, n_rows=n_a, source_rows=2 * n_a)
    per_epoch = (n_a // 2) // 4  # micro-batches of 4 per rank per epoch (full batches only)
    total = per_epoch + 3  # runs past the end of the shard: the stream starts a new epoch

    def draw(start: int, count: int):
        shards = split_for_workers(ds, 2)

        def consume(rank, it):
            stream = shard_batches(it, pre, ShardSpec("A", 4, seed=0, rank=rank), start=start)
            return [next(stream) for _ in range(count)]

        return in_threads([lambda r=r, it=it: consume(r, it) for r, it in enumerate(shards)])

    full = draw(0, total)
    resumed = draw(2, total - 2)
    for rank in (0, 1):
        assert len(full[rank]) == total
        for a, b in zip(full[rank][2:], resumed[rank]):
            np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
            np.testing.assert_array_equal(a["pixel_values"], b["pixel_values"])
    # the second epoch is a new (seeded) order of the same shard
    fingerprint = lambda b: tuple(np.round(b["pixel_values"].sum(axis=(1, 2, 3)), 3))  # noqa: E731 - one per row
    epoch0 = [fingerprint(b) for b in full[0][:per_epoch]]
    epoch1 = [fingerprint(b) for b in full[0][per_epoch:]]
    assert epoch1 != epoch0[: len(epoch1)]
