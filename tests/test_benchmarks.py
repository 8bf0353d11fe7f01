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
