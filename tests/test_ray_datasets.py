"""The Ray path's per-worker datasets (datasets_io/ray_datasets.py): items from the sampler, decoded in map_batches,
collated into exactly the local micro-batches of the same positions; resuming at a cursor reads nothing before it.

    python -m pytest tests/test_ray_datasets.py -q

The first tests need no cluster; the `ray_local` ones use one Ray instance (127.0.0.1, 4 logical CPUs, its own temp
dir) shared with tests/test_ray_train.py and shut down at the end of the session.
"""

from __future__ import annotations


import numpy as np
import pytest

from conftest import REPO, tiny_overrides
from datasets_io.ray_datasets import collate, decode_items, stage_batches, stage_dataset, worker_items
from datasets_io.sampler import BatchLayout, SamplerSpec, row_table


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def prepared(synth_dir, tmp_path_factory):
    """(cfg, Preprocessor, run data) on the session's synthetic data, with the tiny base (tokenizer) built once."""
    from datasets_io.config import load_config
    from launcher.local import corpus_texts, load_run_data
    from launcher.ray_worker import make_preprocessor
    from training.model import resolve_base_path

    out = tmp_path_factory.mktemp("ray_data_run")
    cfg = load_config(REPO / "configs" / "tiny.yaml", tiny_overrides(synth_dir, out))
    data = load_run_data(cfg)
    base = resolve_base_path(cfg, corpus_texts(data))
    return cfg, make_preprocessor(cfg, base), data


def setup(data, replay=0.3, dropout=0.4):
    tables = {s: row_table(data.train[s]) for s in ("A", "B")}
    spec = SamplerSpec(0, {s: len(data.train[s]) for s in ("A", "B")}, replay, dropout)
    return tables, spec


def as_columns(items: list[dict]) -> dict[str, np.ndarray]:
    return {k: np.asarray([it[k] for it in items]) for k in items[0]}


# ------------------------------------------------------------------------------------------------ no cluster
def test_worker_items_are_the_ranks_positions_from_the_cursor_on(prepared):
    _, _, data = prepared
    _, spec = setup(data)
    layout = BatchLayout(micro_batch_size=2, grad_accum=2, world_size=2)  # G = 8
    items = worker_items(spec, layout, rank=1, stage="B", cursor=16, end_step=4)
    assert [it["position"] for it in items] == [20, 21, 22, 23, 28, 29, 30, 31]  # steps 2, 3; rank 1's half
    assert worker_items(spec, layout, rank=0, stage="B", cursor=32, end_step=4) == []


@pytest.mark.parametrize("packing", [True, False], ids=["packed", "padded"])
def test_decoded_items_collate_to_the_local_micro_batch(prepared, packing):
    """decode_items -> fixed-shape columns; collate -> exactly training.data.micro_batch of the same positions,
    replayed Stage A rows and emptied Patient Data included, in both layouts."""
    import dataclasses

    from training.data import micro_batch

    cfg, pre, data = prepared
    assert pre.packing  # the default layout
    pre = dataclasses.replace(pre, packing=packing)
    tables, spec = setup(data)
    layout = BatchLayout(micro_batch_size=6, grad_accum=1, world_size=1)
    items = worker_items(spec, layout, 0, "B", cursor=0, end_step=4)
    cols = decode_items(as_columns(items), rows=tables, stage="B", pre=pre)
    s, width = pre.image_spec.size, cfg.data.max_seq_len
    assert cols["pixel_values"].shape == (24, 3, s, s) and cols["input_ids"].shape == (24, width)
    assert cols["replay"].any() and cols["ehr_dropped"].any()
    assert pre.prompt_loss  # tiny.yaml's prompt loss: the prompt's labels travel through the columns too
    for k in range(4):
        got = collate({c: v[6 * k : 6 * (k + 1)] for c, v in cols.items()}, pre)
        want = micro_batch(pre, tables, spec, "B", range(6 * k, 6 * (k + 1)))
        layout_keys = ("position_ids", "segment_ids") if packing else ("attention_mask",)
        assert set(got) == set(want) and set(layout_keys) <= set(want)
        for key in ("pixel_values", "input_ids", "labels", "prompt_labels", "ehr_dropped", "replay", *layout_keys):
            np.testing.assert_array_equal(got[key], want[key])
        assert list(got["study_id"]) == list(want["study_id"])


def test_data_tasks_decode_without_importing_torch(prepared, tmp_path):
    """Ray Data's task processes unpickle the Preprocessor and run decode_items; a torch import there costs each of
    them seconds of CPU at start-up."""
    import subprocess
    import sys

    import ray.cloudpickle as cloudpickle

    _, pre, data = prepared
    tables, spec = setup(data)
    items = worker_items(spec, BatchLayout(4, 1, 1), 0, "B", cursor=0, end_step=2)
    job = tmp_path / "job.pkl"
    job.write_bytes(cloudpickle.dumps((pre, tables, as_columns(items))))
    code = (
        "import pickle, sys\n"
        "from datasets_io.ray_datasets import decode_items\n"
        f"pre, tables, cols = pickle.loads(open({str(job)!r}, 'rb').read())\n"
        "out = decode_items(cols, rows=tables, stage='B', pre=pre)\n"
        "print(len(out['study_id']), out['pixel_values'].shape[1], 'torch' in sys.modules)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    n_rows, channels, torch_imported = run.stdout.split()
    assert int(n_rows) == 8 and channels == "3"  # it really decoded something
    assert torch_imported == "False"


# ------------------------------------------------------------------------------------------------ real Ray
@pytest.mark.slow
def test_a_workers_dataset_streams_its_micro_batches_in_order_from_the_rows_put_once(ray_local, prepared):
    from training.data import micro_batch

    _, pre, data = prepared
    tables, spec = setup(data)
    rows = ray_local.put(tables)
    layout = BatchLayout(micro_batch_size=3, grad_accum=2, world_size=2)  # G = 12
    items = worker_items(spec, layout, rank=1, stage="B", cursor=24, end_step=5)  # resume at step 2 of the stage
    got = list(stage_batches(stage_dataset(items, rows, "B", pre, rows_per_block=4), pre, 3))
    want = [micro_batch(pre, tables, spec, "B", r) for r in layout.rank_micro_batches(1, 24, 5)]
    assert len(got) == len(want) == 6
    for g, w in zip(got, want):
        assert list(g["study_id"]) == list(w["study_id"])
        np.testing.assert_array_equal(g["input_ids"], w["input_ids"])
        np.testing.assert_array_equal(g["pixel_values"], w["pixel_values"])
