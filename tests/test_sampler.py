"""The sampler's contract (datasets_io/sampler.py), the batch layout over ranks, the derived accumulation, and
`launcher data plan`: pure and fast."""

from __future__ import annotations

import json

import numpy as np
import pytest

from datasets_io.sampler import BatchLayout, SamplerSpec, draw, draws
from training.curriculum import grad_accum_for


def test_each_epoch_is_a_fresh_full_permutation():
    spec = SamplerSpec(seed=3, n_rows={"A": 10, "B": 7})
    rows = [draw(spec, "A", p).row for p in range(30)]
    epochs = [rows[i : i + 10] for i in (0, 10, 20)]
    assert all(sorted(e) == list(range(10)) for e in epochs)  # every row once per epoch
    assert epochs[0] != epochs[1] != epochs[2]  # a new order each epoch
    assert draws(spec, "A", range(30)) == draws(spec, "A", range(30))  # pure
    assert [draw(SamplerSpec(4, {"A": 10}), "A", p).row for p in range(10)] != epochs[0]  # the seed matters


def test_replay_and_ehr_dropout_in_stage_b_only_at_their_rates():
    spec = SamplerSpec(seed=0, n_rows={"A": 50, "B": 40}, replay_fraction=0.2, ehr_dropout=0.3)
    b = draws(spec, "B", range(4000))
    replay = np.mean([d.replay for d in b])
    dropped = np.mean([d.ehr_dropped for d in b if not d.replay])
    assert 0.17 < replay < 0.23 and 0.27 < dropped < 0.33
    assert not any(d.replay and d.ehr_dropped for d in b)  # a replayed Stage A row has no EHR to drop
    assert all(d.row < 50 for d in b if d.replay) and all(d.row < 40 for d in b if not d.replay)
    a = draws(spec, "A", range(500))
    assert not any(d.replay or d.ehr_dropped for d in a)


@pytest.mark.parametrize("layouts", [[(1, 4), (2, 2), (4, 1)], [(1, 2), (2, 1)]])
def test_global_batches_do_not_depend_on_the_worker_count(layouts):
    """Same samples per step: (world, accum) pairs give the same positions per optimizer step, in rank order."""
    per_layout = []
    for world, accum in layouts:
        layout = BatchLayout(micro_batch_size=3, grad_accum=accum, world_size=world)
        steps = []
        for k in range(5):
            got = [p for r in range(world) for j in range(accum) for p in layout.micro_positions(k, r, j)]
            assert got == [p for r in range(world) for p in layout.rank_positions(k, r)]
            steps.append(got)
        per_layout.append(steps)
    assert all(s == per_layout[0] for s in per_layout)
    assert per_layout[0][2] == list(range(2 * len(per_layout[0][0]), 3 * len(per_layout[0][0])))


def test_a_rank_resumes_at_the_global_cursor():
    layout = BatchLayout(micro_batch_size=2, grad_accum=2, world_size=2)  # G = 8
    assert [list(r) for r in layout.rank_micro_batches(1, 8, 3)] == [[12, 13], [14, 15], [20, 21], [22, 23]]
    with pytest.raises(ValueError, match="not a multiple of the global batch 8"):
        list(layout.rank_micro_batches(0, 4, 3))


@pytest.mark.parametrize(
    "micro, accum, global_, world, want",
    [
        (4, 3, 0, 2, 3),  # no global batch stated: the config's accumulation
        (4, 1, 32, 1, 8),
        (4, 1, 32, 2, 4),
        (4, 1, 32, 8, 1),
    ],
)
def test_grad_accum_is_derived_from_the_global_batch(micro, accum, global_, world, want):
    assert grad_accum_for(micro, accum, global_, world) == want


def test_an_indivisible_global_batch_is_an_error():
    with pytest.raises(ValueError, match="train.global_batch_size: 32 is not a multiple of .* 4 x 3 = 12"):
        grad_accum_for(4, 1, 32, 3)


def test_subject_sorted_curriculum_gets_patient_diverse_batches():
    """`launcher data build` writes rows sorted by subject; the sampler's global batches must mix patients about as
    well as a random permutation does (>= 90% of its distinct subjects per batch)."""
    subjects = np.repeat(np.arange(150), 4)  # 600 rows, 4 per patient, sorted by patient
    n, g = len(subjects), 32
    spec = SamplerSpec(seed=0, n_rows={"A": n})
    rows = [d.row for d in draws(spec, "A", range(3 * n))]  # three epochs
    ours = np.mean([len(set(subjects[rows[i : i + g]])) for i in range(0, len(rows) - g + 1, g)])
    rand = np.random.default_rng(123).permutation(n)
    reference = np.mean([len(set(subjects[rand[i : i + g]])) for i in range(0, n - g + 1, g)])
    assert ours >= 0.9 * reference, (ours, reference)
    file_order = np.mean([len(set(subjects[i : i + g])) for i in range(0, n - g + 1, g)])
    assert file_order < 0.5 * reference  # what reading the file in order would give


def test_data_plan_gives_the_same_global_batches_for_1_2_4_workers(synth_dir, tmp_path, capsys):
    from conftest import REPO, tiny_overrides
    from launcher.cli import main

    sets = tiny_overrides(
        synth_dir,
        tmp_path / "plan",
        **{
            "train.global_batch_size": 8,
            "train.micro_batch_size": 2,
            "train.max_steps": 12,
            "curriculum.replay_fraction": 0.2,
            "curriculum.ehr_dropout": 0.3,
        },
    )
    plans = {}
    for workers in (1, 2, 4):
        argv = [
            "data",
            "plan",
            "--config",
            str(REPO / "configs" / "tiny.yaml"),
            "--num-workers",
            str(workers),
            "--format",
            "json",
        ]
        assert main(argv + [a for s in sets for a in ("--set", s)]) == 0
        plans[workers] = json.loads(capsys.readouterr().out)
    assert [plans[w]["grad_accum"] for w in (1, 2, 4)] == [4, 2, 1]
    strip = [[{k: v for k, v in st.items() if k != "ranks"} for st in plans[w]["steps"]] for w in (1, 2, 4)]
    assert strip[0] == strip[1] == strip[2] and len(strip[0]) == 12
    assert plans[4]["steps"][5]["ranks"] == [[8, 10], [10, 12], [12, 14], [14, 16]]  # Stage B (from step 4), step 1
    flat = [st for st in strip[0] if st["stage"] == "B"]
    assert any(any(st["replay"]) for st in flat) and any(any(st["ehr_dropped"]) for st in flat)
    assert (
        main(
            ["data", "plan", "--config", str(REPO / "configs" / "tiny.yaml"), "--num-workers", "3"]
            + [a for s in sets for a in ("--set", s)]
        )
        == 2
    )
    assert "not a multiple of micro_batch_size x workers" in capsys.readouterr().err
