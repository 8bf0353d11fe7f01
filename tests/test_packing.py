"""Exact multimodal packing: the layout (datasets_io/packing.py) and its equivalence to the padded batch on the tiny
LLaVA (image tokens included): the same per-sample losses, the same loss and the same gradients, in fp32.

Tolerances (fp32, CPU): per-sample losses and the micro-batch loss to rtol 1e-5 / atol 1e-5; gradients to
rtol 1e-4 / atol 1e-6 (the two layouts sum the same terms in a different order and attention softmaxes over a
different number of exactly-masked entries)."""

import numpy as np
import pytest
import torch

from datasets_io.packing import pack_samples, plan_rows
from datasets_io.tokens import IGNORE_INDEX, TokenizedSample


def sample(n: int, prompt: int, tag: int) -> TokenizedSample:
    ids = [tag * 100 + k for k in range(n)]
    return TokenizedSample(ids, [IGNORE_INDEX] * prompt + ids[prompt:])


def test_rows_are_first_fit_decreasing_within_the_budget():
    assert plan_rows([5, 3, 8, 2, 6], 10) == [[2, 3], [4, 1], [0]]  # 8+2, 6+3, 5
    assert plan_rows([4, 4], 8) == [[0, 1]]  # ties keep sample order
    with pytest.raises(ValueError, match="sample 1: 11 tokens > packing budget 10"):
        plan_rows([3, 11], 10)


def test_packed_layout_restarts_positions_and_masks_each_sample():
    samples = [sample(4, 2, 1), sample(6, 0, 2), sample(3, 1, 3)]  # sample 1 has no prompt: its first label is set
    p = pack_samples(samples, budget=8, pad_id=0)
    assert p.order == [1, 0, 2]  # rows [[1], [0, 2]]
    assert p.input_ids.shape == (2, 7)  # the fullest row (4 + 3), not the budget
    assert p.position_ids.tolist() == [[0, 1, 2, 3, 4, 5, 0], [0, 1, 2, 3, 0, 1, 2]]
    assert p.segment_ids.tolist() == [[1, 1, 1, 1, 1, 1, -1], [0, 0, 0, 0, 2, 2, 2]]
    assert p.input_ids[1].tolist() == [100, 101, 102, 103, 300, 301, 302]
    assert p.labels.tolist() == [[-100, 201, 202, 203, 204, 205, -100], [-100, -100, 102, 103, -100, 301, 302]]


def tiny_batches(cfg, rows: int, budget: int):
    """The tiny model and one Stage B micro-batch (EHR dropped on half: short and long prompts), padded and packed."""
    from launcher.local import corpus_texts, load_run_data
    from training.data import Preprocessor, StageStream, StreamSpec, to_torch
    from training.model import build_model

    data = load_run_data(cfg)
    bundle = build_model(cfg, corpus_texts(data))
    pre = Preprocessor(bundle.tokenizer, bundle.image_spec, bundle.image_token_id, bundle.num_image_tokens, budget,
                       "truncate", cfg.data.root)
    stream = StageStream("B", data.train["B"], StreamSpec(0, ehr_dropout=0.5))
    out = [pre.sample(*stream.item(i)) for i in range(rows)]
    pixels, toks = [p for p, _ in out], [t for _, t in out]
    padded = to_torch(pre.collate(pixels, toks))
    pre.packing = True
    packed = to_torch(pre.collate(pixels, toks))
    return bundle, padded, packed, toks


def grads(model, loss):
    params = [p for p in model.parameters() if p.requires_grad]
    return [g for g in torch.autograd.grad(loss, params, allow_unused=True) if g is not None]


def test_packed_and_padded_batches_give_the_same_losses_and_gradients(tiny_cfg):
    from training.model import label_loss
    from training.packing import per_sample_losses

    cfg = tiny_cfg(**{"model.train_vision_tower": "true"})  # gradients through the image path too
    bundle, padded, packed, toks = tiny_batches(cfg, rows=8, budget=512)
    lengths = sorted(len(t.input_ids) for t in toks)
    assert lengths[0] < 0.8 * lengths[-1]  # short and long prompts: the padded batch computes on padding
    assert packed["input_ids"].shape[0] < len(toks)  # rows hold several samples (image tokens of each inside)
    assert packed["input_ids"].numel() < padded["input_ids"].numel()
    image_id = bundle.image_token_id
    assert int((packed["input_ids"] == image_id).sum()) == int((padded["input_ids"] == image_id).sum())

    model = bundle.model.train()
    per_padded, per_packed = per_sample_losses(model, padded), per_sample_losses(model, packed)
    assert torch.isfinite(per_padded).all()
    assert torch.allclose(per_padded, per_packed, rtol=1e-5, atol=1e-5), (per_padded, per_packed)
    loss_padded, loss_packed = label_loss(model, padded), label_loss(model, packed)
    assert torch.allclose(loss_padded, loss_packed, rtol=1e-5, atol=1e-5)
    g_padded, g_packed = grads(model, loss_padded), grads(model, loss_packed)
    assert len(g_padded) == len(g_packed) and any("vision_tower" in n for n, p in model.named_parameters()
                                                   if p.requires_grad)
    worst = max(float(((a - b).abs() - 1e-4 * b.abs()).max()) for a, b in zip(g_padded, g_packed))
    assert worst <= 1e-6, worst

    # The test can fail: attention across samples (no position restart) or images in the wrong segments change it.
    leaky = dict(packed, position_ids=torch.arange(packed["input_ids"].shape[1]).expand_as(packed["input_ids"]))
    assert float((per_sample_losses(model, leaky) - per_padded).abs().max()) > 1e-3  # 100x the tolerance above
    swapped = dict(packed, pixel_values=packed["pixel_values"].flip(0))
    assert float((per_sample_losses(model, swapped) - per_padded).abs().max()) > 1e-3


@pytest.mark.slow
def test_packed_run_matches_padded_run_and_resumes_exactly(tiny_cfg, tmp_path):
    from launcher.local import run_local

    steps = {"train.max_steps": "4", "train.micro_batch_size": "6", "curriculum.ehr_dropout": "0.5",
             "curriculum.stage_split": "0.25"}
    padded = run_local(tiny_cfg(**steps, **{"output.dir": str(tmp_path / "padded")}), device="cpu",
                       show_progress=False)
    packed_cfg = tiny_cfg(**steps, **{"train.packing": "true", "output.dir": str(tmp_path / "packed")})
    packed = run_local(packed_cfg, device="cpu", show_progress=False)
    np.testing.assert_allclose(packed["losses"], padded["losses"], rtol=1e-4)  # same samples, same steps
    split_cfg = tiny_cfg(**steps, **{"train.packing": "true", "output.dir": str(tmp_path / "split")})
    first = run_local(split_cfg, device="cpu", stop_after=2, show_progress=False)
    assert first["global_step"] == 2
    resumed = run_local(split_cfg, device="cpu", resume="auto", show_progress=False)
    assert resumed["losses"] == packed["losses"]  # bit-exact: the same micro-batches, laid out the same way
