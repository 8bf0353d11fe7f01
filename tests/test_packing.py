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


def sample(n: int, prompt: int, tag: int, prompt_labels: bool = False) -> TokenizedSample:
    ids = [tag * 100 + k for k in range(n)]
    own = ([IGNORE_INDEX] + ids[1:prompt] + [IGNORE_INDEX] * (n - prompt))[:n] if prompt_labels else None
    return TokenizedSample(ids, [IGNORE_INDEX] * prompt + ids[prompt:], prompt_labels=own)


def test_rows_are_the_fewest_and_balanced_within_the_budget():
    assert plan_rows([5, 3, 8, 2, 6], 10) == [[2], [4, 3], [0, 1]]  # 8 | 6+2 | 5+3: three full rows of 8, no padding
    assert plan_rows([9, 9, 2], 10) == [[0], [1], [2]]  # 20 tokens, but 9+9+2 needs three rows of 10
    assert plan_rows([4, 4], 8) == [[0], [1]]  # as few tokens as one row of 8, and narrower (attention ~ width^2)
    assert plan_rows([2, 7, 3], 100) == [[1, 2, 0]]  # longest first
    with pytest.raises(ValueError, match="sample 1: 11 tokens > packing budget 10"):
        plan_rows([3, 11], 10)


def test_rows_weigh_attention_by_the_models_span():
    """SDPA computes every (query, key) pair of a row: eight samples in one 1,850-token row cost the tiny model
    (span ~1,589) more than eight padded rows of 250 (measured on CPU, 8 MIMIC-detail samples: 255 vs 188 ms padded,
    170 ms at the span's plan); for Mistral-7B (span 26,624) the full row is still the cheapest."""
    from transformers import MistralConfig

    from datasets_io.packing import attention_span

    all_targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    mistral = MistralConfig()  # 4096 wide, 14336 MLP, 32 heads, 8 KV heads of 128
    assert attention_span(mistral) == 218_103_808 / (2 * 32 * 128)  # 26,624
    assert attention_span(mistral, 16, all_targets) == (218_103_808 + 16 * 81_920) / 8192  # r x (in + out), 7 targets
    tiny = MistralConfig(hidden_size=192, intermediate_size=512, num_attention_heads=6, num_key_value_heads=2)
    assert attention_span(tiny, 64, all_targets) == pytest.approx(1589.33, abs=0.01)  # configs/tiny.yaml's model
    lengths = [250] * 7 + [100]
    assert plan_rows(lengths, 2048) == [list(range(8))]  # tokens alone: one row of 1,850 beats 8 x 250
    assert plan_rows(lengths, 2048, attention_span(mistral)) == [list(range(8))]
    assert plan_rows(lengths, 2048, attention_span(tiny, 64, all_targets)) == [[i] for i in range(8)]
    mixed = [60, 222, 229, 239, 246, 259, 273, 274]  # a measured micro-batch (EHR dropped on the first)
    rows = plan_rows(mixed, 2048, attention_span(tiny, 64, all_targets))
    assert 1 < len(rows) < 8 and max(sum(mixed[i] for i in r) for r in rows) <= 2 * 274


def test_packed_layout_restarts_positions_and_masks_each_sample():
    samples = [sample(4, 2, 1), sample(6, 0, 2), sample(3, 1, 3)]  # sample 1 has no prompt: its first label is set
    p = pack_samples(samples, budget=8, pad_id=0)
    assert p.order == [0, 2, 1]  # rows [[0, 2], [1]], the widest first
    assert p.input_ids.shape == (2, 7)  # the fullest row (4 + 3), not the budget
    assert p.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 2], [0, 1, 2, 3, 4, 5, 0]]
    assert p.segment_ids.tolist() == [[0, 0, 0, 0, 2, 2, 2], [1, 1, 1, 1, 1, 1, -1]]
    assert p.input_ids[0].tolist() == [100, 101, 102, 103, 300, 301, 302]
    assert p.labels.tolist() == [[-100, -100, 102, 103, -100, 301, 302], [-100, 201, 202, 203, 204, 205, -100]]
    assert p.prompt_labels is None
    assert p.forwards.tolist() == [[2, 7, 3]]  # one pass: 2 rows of 7, 3 samples
    with_prompt = pack_samples([sample(4, 2, 1, True), sample(6, 0, 2, True), sample(3, 1, 3, True)], 8, 0)
    assert with_prompt.labels.tolist() == p.labels.tolist()
    assert with_prompt.prompt_labels.tolist() == [[-100, 101, -100, -100, -100, -100, -100], [-100] * 7]
    two = pack_samples(samples, budget=8, pad_id=0, forwards=2)  # 7 + 6 computed tokens instead of 2 x 7
    assert two.forwards.tolist() == [[1, 7, 2], [1, 6, 1]] and two.order == p.order
    assert two.input_ids.tolist() == p.input_ids.tolist()  # the same rows: the passes only cut them
    from training.packing import forward_passes, to_device, token_counts

    batch = {k: torch.from_numpy(v) for k, v in vars(two).items() if isinstance(v, np.ndarray)}
    batch["pixel_values"] = torch.arange(3.0)[:, None]  # one "image" per sample, in layout order
    moved = to_device(batch, "cpu")
    assert moved["forwards"] is batch["forwards"]  # the plan stays on the host: reading it never waits on a GPU
    first, second = forward_passes(moved)
    assert first["input_ids"].tolist() == [[100, 101, 102, 103, 300, 301, 302]] and "forwards" not in first
    assert second["input_ids"].tolist() == [[200, 201, 202, 203, 204, 205]]  # its own width: 6, not 7
    assert first["pixel_values"].tolist() == [[0.0], [1.0]] and second["pixel_values"].tolist() == [[2.0]]
    assert second["segment_ids"].tolist() == [[1] * 6]  # sample indices of the micro-batch, not of the pass
    assert token_counts(moved) == (13, 7 + 6)  # computed: each pass's rows x its width, not 2 x 7


def test_forward_passes_are_added_only_where_they_save_compute():
    from datasets_io.packing import split_forwards

    assert split_forwards([10, 10, 10], 3) == (30, [3])  # one width already: one pass
    assert split_forwards([10, 9, 2, 2], 1) == (40, [4])
    assert split_forwards([10, 9, 2, 2], 2) == (24, [2, 2])  # 2 x 10 + 2 x 2
    assert split_forwards([10, 9, 2, 2], 3) == (23, [1, 1, 2])  # 10 + 9 + 2 x 2
    assert split_forwards([10, 9, 2, 2], 8) == (23, [1, 1, 2])  # never more passes than save something
    cost, sizes = split_forwards([100, 50], 2, attention_span=100.0)  # 100 x 2 + 50 x 1.5
    assert (cost, sizes) == (275.0, [1, 1])
    assert split_forwards([7], 4) == (7, [1])
    # plan_rows weighs the passes: in one width the least is 30 tokens (6 rows of 5; 3 rows of 10 tie, wider);
    # in two passes 26: the 4 + 2 row of 6 alone, then 4 rows of 5 (2 rows of 10 + the row of 6 tie, wider)
    assert plan_rows([5, 5, 5, 5, 4, 2], 10) == [[0], [1], [2], [3], [4], [5]]
    assert plan_rows([5, 5, 5, 5, 4, 2], 10, forwards=2) == [[4, 5], [0], [1], [2], [3]]


def tiny_batches(cfg, rows: int, budget: int, prompt_loss: bool = False):
    """The tiny model and one Stage B micro-batch (EHR dropped on half: short and long prompts), padded and packed;
    with `prompt_loss` the prompts' text tokens are `prompt_labels` too."""
    from launcher.local import corpus_texts, load_run_data
    from training.data import Preprocessor, StageStream, StreamSpec, to_torch
    from training.model import build_model

    data = load_run_data(cfg)
    bundle = build_model(cfg, corpus_texts(data))
    pre = Preprocessor(
        bundle.tokenizer,
        bundle.image_spec,
        bundle.image_token_id,
        bundle.num_image_tokens,
        budget,
        "shorten_ehr",
        cfg.data.root,
        prompt_loss=prompt_loss,
    )
    stream = StageStream("B", data.train["B"], StreamSpec(0, ehr_dropout=0.5))
    out = [pre.sample(*stream.item(i)) for i in range(rows)]
    pixels, toks = [p for p, _ in out], [t for _, t in out]
    padded = to_torch(pre.collate(pixels, toks))
    pre.packing = True
    packed = to_torch(pre.collate(pixels, toks))
    pre.packing_forwards = 2
    two_passes = to_torch(pre.collate(pixels, toks))
    return bundle, padded, packed, toks, two_passes


def grads(model, loss):
    params = [p for p in model.parameters() if p.requires_grad]
    return [g for g in torch.autograd.grad(loss, params, allow_unused=True) if g is not None]


@pytest.mark.parametrize("attn", ["packed_sdpa", "sdpa"])
@pytest.mark.parametrize("prompt_loss", [False, True], ids=["target-labels", "prompt-labels-too"])
def test_packed_and_padded_batches_give_the_same_losses_and_gradients(tiny_cfg, prompt_loss, attn):
    """sdpa: rows with transformers' block-diagonal mask; packed_sdpa: one padding-free row, SDPA per sample."""
    from training.packing import attn_implementation

    cfg = tiny_cfg(**{"model.train_vision_tower": "true", "model.attn_implementation": attn})  # image path too
    bundle, padded, one_pass, toks, two_passes = tiny_batches(cfg, rows=8, budget=512, prompt_loss=prompt_loss)
    assert attn_implementation(bundle.model) == attn
    assert len(one_pass["forwards"]) == 1 and len(two_passes["forwards"]) == 2  # rows of two widths, two forwards
    (rows_1, width_1, _), (rows_2, width_2, _) = two_passes["forwards"].tolist()
    assert width_2 < width_1 and rows_1 * width_1 + rows_2 * width_2 < one_pass["input_ids"].numel()
    for packed in (one_pass, two_passes):
        check_same_losses_and_gradients(bundle, padded, packed, toks, prompt_loss)


def check_same_losses_and_gradients(bundle, padded, packed, toks, prompt_loss: bool) -> None:
    from training.model import label_loss
    from training.packing import per_sample_losses

    assert all((t.labels[0] == IGNORE_INDEX) for t in toks)
    if prompt_loss:  # the Patient Data block is supervised: most of each sample's tokens are prompt labels
        supervised = lambda t: sum(a != IGNORE_INDEX or b != IGNORE_INDEX for a, b in zip(t.labels, t.prompt_labels))  # noqa: E731
        assert all(supervised(t) > 0.5 * len(t.labels) for t in toks)
        assert "prompt_labels" in padded and "prompt_labels" in packed
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
    if prompt_loss:
        prompt_padded, prompt_packed = (per_sample_losses(model, b, "prompt_labels") for b in (padded, packed))
        assert torch.isfinite(prompt_padded).all()
        assert torch.allclose(prompt_padded, prompt_packed, rtol=1e-5, atol=1e-5), (prompt_padded, prompt_packed)
    weight = 0.5 if prompt_loss else 0.0
    loss_padded, loss_packed = label_loss(model, padded, weight), label_loss(model, packed, weight)
    assert torch.allclose(loss_padded, loss_packed, rtol=1e-5, atol=1e-5)
    g_padded, g_packed = grads(model, loss_padded), grads(model, loss_packed)
    assert len(g_padded) == len(g_packed) and any(
        "vision_tower" in n for n, p in model.named_parameters() if p.requires_grad
    )
    worst = max(float(((a - b).abs() - 1e-4 * b.abs()).max()) for a, b in zip(g_padded, g_packed))
    assert worst <= 1e-6, worst

    # The test can fail: attention across samples (no position restart) or images in the wrong segments change it.
    leaky = dict(packed, position_ids=torch.arange(packed["input_ids"].shape[1]).expand_as(packed["input_ids"]))
    assert float((per_sample_losses(model, leaky) - per_padded).detach().abs().max()) > 1e-3  # 100x the tolerance above
    swapped = dict(packed, pixel_values=packed["pixel_values"].flip(0))
    assert float((per_sample_losses(model, swapped) - per_padded).detach().abs().max()) > 1e-3


@pytest.mark.slow
def test_packed_run_matches_padded_run_and_resumes_exactly(tiny_cfg, tmp_path):
    from launcher.local import run_local

    steps = {
        "train.max_steps": "4",
        "train.micro_batch_size": "6",
        "curriculum.ehr_dropout": "0.5",
        "curriculum.stage_split": "0.25",
    }
    padded_cfg = tiny_cfg(**steps, **{"train.packing": "false", "output.dir": str(tmp_path / "padded")})
    padded = run_local(padded_cfg, device="cpu", show_progress=False)
    packed_cfg = tiny_cfg(**steps, **{"output.dir": str(tmp_path / "packed")})  # packing is the default
    packed = run_local(packed_cfg, device="cpu", show_progress=False)
    np.testing.assert_allclose(packed["losses"], padded["losses"], rtol=1e-4)  # same samples, same steps
    from mlflow import MlflowClient

    def efficiency(run: dict) -> list[float]:  # real / computed tokens per logged interval, logged at steps 1 and 4
        history = MlflowClient(run["tracking_uri"]).get_metric_history(run["mlflow_run_id"], "train/padding_efficiency")
        return [m.value for m in sorted(history, key=lambda m: m.step)]

    eff_padded, eff_packed = efficiency(padded), efficiency(packed)
    assert len(eff_padded) == len(eff_packed) >= 2 and all(0 < e <= 1 for e in eff_padded + eff_packed)
    assert all(a > b for a, b in zip(eff_packed, eff_padded)), (eff_packed, eff_padded)  # EHR dropped on half
    split_cfg = tiny_cfg(**steps, **{"train.packing": "true", "output.dir": str(tmp_path / "split")})
    first = run_local(split_cfg, device="cpu", stop_after=2, show_progress=False)
    assert first["global_step"] == 2
    resumed = run_local(split_cfg, device="cpu", resume="auto", show_progress=False)
    assert resumed["losses"] == packed["losses"]  # bit-exact: the same micro-batches, laid out the same way


def test_flash_attention_gets_one_padding_free_row_with_the_sample_boundaries():
    """FlashAttention does not run on this CPU machine; what it is given does: one row of the real tokens, whose
    restarting position ids transformers turns into the varlen kernel's cu_seqlens (the per-sample boundaries)."""
    from types import SimpleNamespace

    from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

    from training.packing import model_layout

    samples = [sample(4, 2, 1), sample(6, 0, 2), sample(3, 1, 3)]
    p = pack_samples(samples, budget=8, pad_id=0)
    batch = {
        "input_ids": p.input_ids,
        "labels": p.labels,
        "position_ids": p.position_ids,
        "segment_ids": p.segment_ids,
        "pixel_values": np.zeros((3, 1)),
    }
    batch = {k: torch.from_numpy(v) for k, v in batch.items()}
    flash = SimpleNamespace(
        config=SimpleNamespace(text_config=SimpleNamespace(_attn_implementation="flash_attention_2"))
    )
    inputs, tokens = model_layout(flash, batch)
    assert inputs["input_ids"].tolist() == [[100, 101, 102, 103, 300, 301, 302, 200, 201, 202, 203, 204, 205]]
    assert tokens["labels"].tolist() == [[-100, -100, 102, 103, -100, 301, 302, -100, 201, 202, 203, 204, 205]]
    assert tokens["owner"].tolist() == [[0] * 4 + [2] * 3 + [1] * 6] and inputs["use_cache"] is False
    assert "prompt_labels" not in tokens and "labels" not in inputs and "segment_ids" not in inputs
    with_prompt = dict(batch, prompt_labels=torch.from_numpy(np.where(p.labels == -100, p.input_ids, -100)))
    flat = model_layout(flash, with_prompt)[1]["prompt_labels"].tolist()
    assert flat == [[100, 101, -100, -100, 300, -100, -100, 200] + [-100] * 5]  # the same real tokens as labels
    (cu_q, _), (max_q, _) = prepare_fa_kwargs_from_position_ids(inputs["position_ids"])
    assert cu_q.tolist() == [0, 4, 7, 13] and int(max_q) == 6
    sdpa = SimpleNamespace(config=SimpleNamespace(text_config=SimpleNamespace(_attn_implementation="sdpa")))
    assert model_layout(sdpa, batch)[0]["input_ids"].shape == (2, 7)  # SDPA keeps the rows (mask per row)
    deepspeed_like = SimpleNamespace(config={"zero_optimization": {}}, module=flash)  # its `config` is the JSON
    assert model_layout(deepspeed_like, batch)[0]["input_ids"].shape == (1, 13)


def test_packing_needs_an_attention_backend_that_keeps_samples_apart(tiny_cfg):
    from datasets_io.config import ConfigError

    assert tiny_cfg().train.packing is True  # the default: exact, and never more computed tokens than padding
    with pytest.raises(ConfigError, match="train.packing: needs model.attn_implementation in sdpa, eager") as err:
        tiny_cfg(**{"model.attn_implementation": "paged|sdpa"})
    assert "train.packing: false" in str(err.value)  # the way out is named
    assert tiny_cfg(**{"train.packing": "false", "model.attn_implementation": "paged|sdpa"}).train.packing is False


def test_the_runs_preprocessor_weighs_attention_by_its_language_model(tiny_cfg):
    """Preprocessor.for_run's attention span is the LoRA'd language model's, the same from the local bundle and from
    the Ray driver's config-only spec; tokens alone when packing is off or FlashAttention attends within samples."""
    import math

    from datasets_io.packing import attention_span
    from launcher.local import corpus_texts, load_run_data
    from launcher.ray_worker import make_preprocessor
    from training.data import Preprocessor
    from training.model import build_model

    cfg = tiny_cfg(**{"model.attn_implementation": "sdpa"})  # rows with a mask: attention's cost weighs on them
    bundle = build_model(cfg, corpus_texts(load_run_data(cfg)))
    want = attention_span(bundle.text_config, cfg.lora.r, cfg.lora.target_modules)
    assert 100 < want < 5000  # a tiny model: attention weighs on rows of a few hundred tokens
    assert Preprocessor.for_run(cfg, bundle, image_cache=False).attention_span == want
    assert make_preprocessor(cfg, bundle.base_model_path).attention_span == want
    assert Preprocessor.for_run(cfg, bundle, image_cache=False).packing_forwards == cfg.train.packing_forwards == 2
    for off in ({"train.packing": "false"}, {"model.attn_implementation": "flash_attention_2"}, {}):
        pre = Preprocessor.for_run(tiny_cfg(**off), bundle, image_cache=False)
        assert pre.attention_span == math.inf and pre.packing_forwards == 1  # one padding-free row (tiny: packed_sdpa)


DEEPSPEED_CHECK = r"""
import json, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
import torch, torch.distributed as dist
from conftest import tiny_overrides
from datasets_io.config import load_config
from launcher.local import corpus_texts, load_run_data
from training.recipe import build_lora_model
from training.model import resolve_base_path
from training.data import Preprocessor, StageStream, StreamSpec, to_torch
from training.deepspeed_engine import (DeepSpeedEngine, deepspeed_config, init_deepspeed_comm, prepare_deepspeed_cpu,
                                       zero3_init)
from training.packing import attn_implementation

dist.init_process_group("gloo", rank=0, world_size=1)
prepare_deepspeed_cpu(); init_deepspeed_comm()
over = lambda **o: tiny_overrides(Path({data!r}), Path(sys.argv[1]),  # noqa: E731  rows with transformers' mask
                                  **{{"train.packing": "true", "model.attn_implementation": "sdpa", **o}})
cfg = load_config({config!r}, over())
data = load_run_data(cfg)
resolve_base_path(cfg, corpus_texts(data))  # builds the tiny base once
result = {{}}
for stage in (2, 3):  # ZeRO-2 first: zero3_init switches transformers into partitioned loading for good
    ds = deepspeed_config(load_config({config!r}, over(**{{"deepspeed.zero_stage": stage,
                                       "deepspeed.stage3_param_persistence_threshold": 0}})), 1, "fp32")
    zero3_init(ds)
    bundle = build_lora_model(cfg, resolve_base_path(cfg, None))
    if stage == 2:  # the same three layouts of one micro-batch for both stages
        pre = Preprocessor(bundle.tokenizer, bundle.image_spec, bundle.image_token_id, bundle.num_image_tokens,
                           cfg.data.max_seq_len, cfg.data.overlong, cfg.data.root)
        stream = StageStream("B", data.train["B"], StreamSpec(0, ehr_dropout=0.5))
        out = [pre.sample(*stream.item(i)) for i in range(6)]
        padded = to_torch(pre.collate([p for p, _ in out], [t for _, t in out]))
        pre.packing = True
        packed = to_torch(pre.collate([p for p, _ in out], [t for _, t in out]))
        pre.packing_forwards = 2
        two = to_torch(pre.collate([p for p, _ in out], [t for _, t in out]))
    eng = DeepSpeedEngine(bundle.model, cfg.train, ds)
    r = {{"attn": attn_implementation(eng.engine), "rows": packed["input_ids"].shape[0],
          "passes": two["forwards"].tolist(), "padded": float(eng.eval_loss(padded)),
          "packed": float(eng.eval_loss(packed)), "two": float(eng.eval_loss(two))}}
    # a training step's gradient norm on each layout from the same weights (lr 0: the step leaves them as they are)
    for name, batch in (("padded", padded), ("two", two)):
        eng.forward_backward(batch, 1.0 / cfg.train.grad_accum)
        r["norm_" + name] = eng.optimizer_step(0.0)
    result[stage] = r
json.dump(result, open(Path(sys.argv[1]) / "result.json", "w"))
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_packed_batch_under_deepspeed_gives_the_padded_loss(synth_dir, tmp_path):
    """The Ray runtime's engine (DeepSpeed ZeRO-2 and ZeRO-3, gloo, world size 1): a DeepSpeed engine's own `config`
    is its JSON, so the backend must be read from the wrapped model; the packed micro-batch's loss is the padded
    one's, in one forward pass or two of their own widths, and a training step on the two passes (two forwards
    through the engine, one backward; ZeRO-3 gathers the parameters for each) has the padded step's gradient norm."""
    import json
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    script = tmp_path / "check.py"
    script.write_text(
        DEEPSPEED_CHECK.format(
            tests=str(repo / "tests"), config=str(repo / "configs" / "tiny.yaml"), data=str(synth_dir)
        )
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "HF_HUB_OFFLINE": "1",
    }
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], env=env, cwd=repo, capture_output=True, text=True, timeout=400
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    for stage, r in json.loads((tmp_path / "result.json").read_text()).items():
        assert r["attn"] == "sdpa" and r["rows"] < 6, stage
        assert len(r["passes"]) == 2 and r["passes"][1][1] < r["passes"][0][1], r["passes"]  # two widths
        assert r["packed"] == pytest.approx(r["padded"], rel=1e-5) and r["two"] == pytest.approx(r["padded"], rel=1e-5)
        assert r["norm_padded"] > 0 and r["norm_two"] == pytest.approx(r["norm_padded"], rel=1e-4), (stage, r)


def test_packed_sdpa_attends_within_each_sample_and_is_plain_sdpa_otherwise():
    """training.packing.packed_sdpa_attention on its own: a row's samples (position ids restarting at 0) each get
    causal SDPA on their own tokens; a row without restarts, a padding mask or a decoding step is transformers' sdpa."""
    from types import SimpleNamespace

    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from training.packing import packed_sdpa_attention

    torch.manual_seed(0)
    module = SimpleNamespace(num_key_value_groups=3, is_causal=True, training=False)  # 6 query heads, 2 KV heads
    q, k, v = torch.randn(2, 6, 9, 8), torch.randn(2, 2, 9, 8), torch.randn(2, 2, 9, 8)
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1], list(range(9))])
    out, weights = packed_sdpa_attention(module, q, k, v, None, position_ids=pos)
    assert out.shape == (2, 9, 6, 8) and weights is None

    def alone(b: int, s: int, e: int) -> torch.Tensor:  # causal SDPA on one sample's tokens only
        one = (t[b : b + 1, :, s:e] for t in (q, k, v))
        return sdpa_attention_forward(module, *one, None, is_causal=True)[0][0]

    for s, e in ((0, 4), (4, 7), (7, 9)):
        torch.testing.assert_close(out[0, s:e], alone(0, s, e), rtol=1e-5, atol=1e-6)
    whole = sdpa_attention_forward(module, q, k, v, None, is_causal=True)[0]
    torch.testing.assert_close(out[1], whole[1], rtol=1e-5, atol=1e-6)  # one sample: plain causal attention
    assert (out[0, 4:] - whole[0, 4:]).abs().max() > 1e-2  # the later samples do not see the earlier ones
    mask = torch.zeros(2, 1, 9, 9).masked_fill(torch.ones(9, 9).triu(1).bool(), float("-inf"))
    with_mask = packed_sdpa_attention(module, q, k, v, mask, position_ids=pos)[0]
    torch.testing.assert_close(with_mask, sdpa_attention_forward(module, q, k, v, mask)[0])  # batched generation
    step = packed_sdpa_attention(module, q[:, :, -1:], k, v, None, position_ids=pos[:, -1:])[0]  # one new token
    torch.testing.assert_close(step, sdpa_attention_forward(module, q[:, :, -1:], k, v, None)[0])
    with pytest.raises(ValueError, match="sample of 4 tokens is longer than the model's sliding window"):
        packed_sdpa_attention(module, q, k, v, None, position_ids=pos[:1].expand(2, -1), sliding_window=3)
