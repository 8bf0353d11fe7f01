"""The curriculum's pure functions, table-driven: step plans, stage boundaries with accumulation, one LR schedule."""

import math

import pytest

from training.curriculum import lr_at, make_plan, stage_at


def plan(**kw):
    base = dict(
        max_steps=0,
        epochs=1.0,
        n_rows_a=50,
        n_rows_b=50,
        micro_batch_size=4,
        grad_accum=1,
        world_size=1,
        stage_split=0.35,
        warmup_steps=5,
        min_lr_ratio=0.1,
    )
    base.update(kw)
    return make_plan(**base)


@pytest.mark.parametrize(
    "kw, total, stage_a",
    [
        (dict(max_steps=100), 100, 35),
        (dict(), 25, 9),  # 100 rows / 4 per step; round(0.35 * 25) = 9
        (dict(grad_accum=5), 5, 2),  # OPTIMIZER steps: 100 rows / (4 x 5)
        (dict(grad_accum=2, world_size=2), 7, 2),  # ceil(100 / 16)
        (dict(epochs=3.0, grad_accum=4), 19, 7),
        (dict(max_steps=10, stage_split=0.0), 10, 0),
        (dict(max_steps=10, stage_split=1.0), 10, 10),
    ],
)
def test_plan_table(kw, total, stage_a):
    p = plan(**kw)
    assert (p.total_steps, p.stage_a_steps, p.stage_b_steps) == (total, stage_a, total - stage_a)


def test_stage_at_switches_once_at_the_split():
    p = plan(max_steps=20)
    stages = [stage_at(s, p) for s in range(20)]
    assert stages == ["A"] * 7 + ["B"] * 13
    with pytest.raises(ValueError):
        stage_at(20, p)


def test_lr_warmup_then_one_cosine_continuous_across_the_switch():
    p = plan(max_steps=100, warmup_steps=10)
    lrs = [lr_at(s, p, 1.0) for s in range(100)]
    assert lrs[:10] == pytest.approx([(i + 1) / 10 for i in range(10)])
    assert lrs[10] == pytest.approx(1.0) and lrs[-1] == pytest.approx(0.1, abs=0.01)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # monotone after warmup: no restart at the switch
    switch = p.stage_a_steps  # 35: the cosine goes on through it (a restart would put lr back to 1.0 there)
    cosine = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (switch - 10) / 90))
    assert lrs[switch] == pytest.approx(cosine) and lrs[switch] < lrs[switch - 1] < 1.0
