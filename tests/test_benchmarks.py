"""The GPU throughput benchmark runs end to end on CPU with the tiny shape (so it is known to work before a GPU is
lent), and its FLOP count rests on the real model's layer shapes."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def test_flop_formula_counts_the_real_7b_language_models_weights():
    import torch
    from transformers import MistralConfig, MistralModel

    import gpu_throughput as bench

    text = MistralConfig(**bench.SHAPES["7b"]["text"])
    with torch.device("meta"):  # shapes only: no memory, no init
        model = MistralModel(text)
    real = sum(p.numel() for n, p in model.named_parameters() if n.startswith("layers.") and p.ndim == 2)
    ours = text.num_hidden_layers * sum(i * o for i, o in bench.projection_dims(text).values())
    assert ours == real and 6.9e9 < real < 7.1e9  # Mistral-7B: 7.24 B with embeddings and head


@pytest.mark.slow
def test_gpu_throughput_runs_on_cpu_with_the_tiny_shape():
    import gpu_throughput as bench

    rows = bench.main(
        [
            "--shape",
            "tiny",
            "--device",
            "cpu",
            "--dtype",
            "fp32",
            "--steps",
            "3",
            "--batch",
            "2",
            "--seq",
            "384",
            "--packing",
        ]
    )
    assert [r["runtime"] for r in rows] == ["local"]
    r = rows[0]
    assert r["samples_per_s"] > 0 and r["tokens_per_s"] > r["samples_per_s"] * 16  # 16 image tokens at least
    assert 0 < r["mfu"] < 1 and r["tflop_per_sample"] > 0


def test_padding_benchmarks_best_layout_is_the_exhaustive_optimum_and_no_row_plan_beats_it():
    """benchmarks/padding.py reports how close the row plan is to the best layout possible (rows of one width): that
    search is checked against brute force over every assignment of samples to rows, on random small micro-batches."""
    import random

    import padding as bench

    from datasets_io.packing import plan_rows

    def brute_force(lengths: list[int], budget: int) -> int:  # every set partition of the samples into rows
        def partitions(items: list[int]):
            if not items:
                yield []
                return
            for rest in partitions(items[1:]):
                yield [[items[0]], *rest]
                for i in range(len(rest)):
                    yield [*rest[:i], [items[0], *rest[i]], *rest[i + 1 :]]

        loads = ([sum(row) for row in rows] for rows in partitions(lengths))
        return min(len(load) * max(load) for load in loads if max(load) <= budget)

    assert bench.best_layout_tokens([5, 3, 8, 2, 6], 10) == (24, True)  # 8 | 6+2 | 5+3: no padding at all
    rng = random.Random(0)
    for _ in range(150):
        lengths = [rng.randint(1, 40) for _ in range(rng.randint(1, 9))]
        budget = rng.randint(max(lengths), max(lengths) + 25)  # tight: the budget decides the row count
        best, exact = bench.best_layout_tokens(lengths, budget)
        assert exact and best == brute_force(lengths, budget), (lengths, budget)
        rows = plan_rows(lengths, budget)
        assert len(rows) * max(sum(lengths[i] for i in row) for row in rows) >= best
    # past the search's node cap: the trivial lower bound max(longest, total / rows) per row count, flagged
    many = [rng.randint(100, 900) for _ in range(40)]
    trivial = min(r * max(max(many), -(-sum(many) // r)) for r in range(-(-sum(many) // 2048), len(many) + 1))
    assert bench.best_layout_tokens(many, 2048, node_cap=0) == (trivial, False)


def test_tower_probe_auc_is_the_rank_probability_with_ties_halved():
    import numpy as np

    from tower_probe import auc

    scores, truth = np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])
    assert auc(scores, truth) == 0.75  # 3 of the 4 positive-negative pairs ordered right
    assert auc(np.array([0.5, 0.5, 0.2]), np.array([1, 0, 0])) == 0.75  # one tie (half) + one right
    assert auc(scores, np.zeros(4)) is None  # no positive: no AUC, never a division by zero


def test_tower_probe_scores_what_the_pretraining_taught(synth_dir, tmp_path):
    """benchmarks/tower_probe.py on the tiny synthetic set: the pre-trained tower ranks a large finding on held-out
    patients far better than the same tower untrained, and reports every label the style draws."""
    from datasets_io.synth import DRAWN_FINDINGS, write_synthetic
    from tower_probe import probe

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "default").symlink_to(synth_dir)
    write_synthetic(
        tmp_path / "data" / "default-eval40", 40, seed=1, image_size=(128, 128), val_fraction=1.0, progress=False
    )
    runs = {
        steps: probe("default", 0, tmp_path, [f"model.tiny.vision_pretrain_steps={steps}"], 40) for steps in (0, 200)
    }
    assert set(runs[200]["labels"]) == set(DRAWN_FINDINGS)
    before, after = (runs[s]["labels"]["Cardiomegaly"] for s in (0, 200))
    print(f"[measured] cardiomegaly eval AUC untrained {before['auc']:.3f} -> pre-trained {after['auc']:.3f}")
    assert after["positives"] > 0 and after["auc"] >= 0.85 and after["auc"] > before["auc"] + 0.15
    assert after["train_auc"] >= 0.9
