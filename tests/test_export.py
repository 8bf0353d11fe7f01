"""`launcher export`: the merged HF model computes what base + adapter computes, loads with plain transformers
(model, tokenizer, processor and chat template), and a registered model exports by URI; the GGUF files read back
with gguf's reader hold the merged weights under the names llama.cpp expects.

One tiny training run per session (test_evaluate.tiny_trained_run, shared with the evaluate and registry tests), one
merge per module."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from datasets_io.errors import LauncherError
from test_evaluate import REGISTERED_ALIAS, REGISTERED_NAME, tiny_trained_run

# fp32 merge vs the unmerged LoRA forward: x @ (W + s B A)^T and x @ W^T + s (x @ A^T) @ B^T differ only by float
# rounding. Measured on the tiny run: max |logit difference| ~1e-6; the bound leaves room for other BLAS kernels.
LOGIT_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def trained(synth_dir, tmp_path_factory) -> Path:
    return tiny_trained_run(synth_dir, tmp_path_factory)


@pytest.fixture(scope="module")
def final(trained) -> Path:
    return trained / "checkpoints" / "final"


@pytest.fixture(scope="module")
def hf_export(final, tmp_path_factory) -> Path:
    from launcher.cli import main

    out = tmp_path_factory.mktemp("export") / "hf"
    assert main(["export", "--checkpoint", str(final), "--format", "hf", "--out", str(out), "--dtype", "fp32"]) == 0
    return out


def _requests(synth_dir: Path, n: int = 2) -> list[tuple[str, bytes]]:
    """(prompt, image bytes): a Stage A and a Stage B prompt of validation studies."""
    from datasets_io.records import prompt_a

    rows = [json.loads(line) for line in (synth_dir / "curriculum_val.jsonl").read_text().splitlines()[:n]]
    prompts = [prompt_a(), *[r["prompt"] for r in rows[1:]]]
    return [(p, (synth_dir / r["image"]).read_bytes()) for p, r in zip(prompts, rows)]


def _exported_bundle(out: Path):
    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    from training.model import bundle_for

    model = LlavaForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    return bundle_for(model, AutoTokenizer.from_pretrained(out), str(out))


@pytest.mark.slow
def test_merged_export_gives_the_same_logits_and_greedy_text(final, hf_export, synth_dir):
    from datasets_io.images import preprocess_image
    from training.generate import encode_batch, generate_reports
    from training.model import load_trained

    reference = load_trained(str(final))  # PeftModel: base + LoRA + trained projector, unmerged, fp32
    exported = _exported_bundle(hf_export)
    assert type(exported.model).__name__ == "LlavaForConditionalGeneration"
    requests = _requests(synth_dir)
    prompts = [p for p, _ in requests]
    pixels = [preprocess_image(im, reference.image_spec) for _, im in requests]

    batch_ref = encode_batch(reference, prompts, pixels)
    batch_exp = encode_batch(exported, prompts, pixels)  # the exported tokenizer, through its chat template
    assert torch.equal(batch_ref["input_ids"], batch_exp["input_ids"])
    with torch.inference_mode():
        ref_logits = reference.model(**batch_ref).logits
        exp_logits = exported.model(**batch_exp).logits
    diff = (ref_logits - exp_logits).abs().max().item()
    assert diff <= LOGIT_TOLERANCE, f"max |logit difference| {diff:.3g}"
    assert ref_logits.abs().max() > 1.0  # not a trivially zero output

    ref_text = generate_reports(reference, requests, batch_size=2, max_new_tokens=24)
    exp_text = generate_reports(exported, requests, batch_size=2, max_new_tokens=24)
    assert exp_text == ref_text and all(ref_text)


@pytest.mark.slow
def test_export_holds_the_trained_projector_and_merged_lora(final, hf_export, trained):
    from safetensors.torch import load_file

    weights = load_file(str(hf_export / "model.safetensors"))
    base = load_file(str(trained / "base_model" / "model.safetensors"))
    adapter = load_file(str(final / "adapter_model.safetensors"))
    assert not any("lora" in k or "modules_to_save" in k or "base_layer" in k for k in weights)
    assert set(weights) == set(base)  # the base's layout: a plain LlavaForConditionalGeneration
    # on disk: the llava-hf layout vLLM reads (transformers 5 maps it to model.language_model... when loading)
    proj = "multi_modal_projector.linear_1.weight"
    trained_proj = next(v for k, v in adapter.items() if k.endswith("multi_modal_projector.linear_1.weight"))
    assert torch.equal(weights[proj], trained_proj) and not torch.equal(weights[proj], base[proj])
    q = "language_model.model.layers.0.self_attn.q_proj.weight"
    a = next(v for k, v in adapter.items() if "layers.0.self_attn.q_proj.lora_A" in k)  # (r, in)
    b = next(v for k, v in adapter.items() if "layers.0.self_attn.q_proj.lora_B" in k)  # (out, r)
    cfg = json.loads((final / "adapter_config.json").read_text())
    expected = base[q] + (cfg["lora_alpha"] / cfg["r"]) * (b @ a)
    assert torch.allclose(weights[q], expected, atol=1e-6) and not torch.allclose(weights[q], base[q])
    info = json.loads((hf_export / "export.json").read_text())
    assert info["dtype"] == "fp32" and info["checkpoint"] == str(final.resolve()) and info["global_step"] == 6


@pytest.mark.slow
def test_processor_and_chat_template_render_the_training_prompt(hf_export, synth_dir):
    """What a server does with the directory: AutoProcessor + apply_chat_template + processor(images, text)."""
    from PIL import Image
    from transformers import AutoProcessor, AutoTokenizer

    from datasets_io.records import prompt_a
    from datasets_io.tokens import encode_prompt

    processor = AutoProcessor.from_pretrained(hf_export)
    tok = AutoTokenizer.from_pretrained(hf_export)
    before, after = prompt_a().split("<image>")
    messages = [
        {
            "role": "user",
            "content": [{"type": "text", "text": before}, {"type": "image"}, {"type": "text", "text": after}],
        }
    ]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == f"{tok.bos_token}{prompt_a()}\n"
    assert (
        tok.apply_chat_template([{"role": "user", "content": prompt_a()}], add_generation_prompt=True, tokenize=False)
        == text
    )
    image_path = synth_dir / json.loads((synth_dir / "curriculum_val.jsonl").read_text().splitlines()[0])["image"]
    enc = processor(images=Image.open(image_path), text=text, return_tensors="pt", add_special_tokens=False)
    exported = _exported_bundle(hf_export)
    expected = encode_prompt(tok, prompt_a(), exported.image_token_id, exported.num_image_tokens)
    assert enc["input_ids"][0].tolist() == expected
    assert tuple(enc["pixel_values"].shape) == (1, 3, exported.image_spec.size, exported.image_spec.size)


@pytest.mark.slow
def test_registered_model_exports_by_uri_to_the_same_weights(trained, hf_export, tmp_path):
    from safetensors.torch import load_file

    from launcher.cli import main

    out = tmp_path / "from-registry"
    uri = f"models:/{REGISTERED_NAME}@{REGISTERED_ALIAS}"
    assert (
        main(
            [
                "export",
                "--model",
                uri,
                "--tracking-uri",
                f"sqlite:///{trained / 'mlflow.db'}",
                "--format",
                "hf",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert not out.with_name(out.name + ".partial").exists()
    a, b = load_file(str(out / "model.safetensors")), load_file(str(hf_export / "model.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    info = json.loads((out / "export.json").read_text())
    assert info["model_uri"] == uri and info["dtype"] == "fp32" and info["run_id"]


@pytest.mark.slow
def test_bf16_export_stores_bf16_and_loads(final, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from training.export import export_hf, load_merged

    merged = load_merged(final)
    summary = export_hf(merged, tmp_path / "bf16", dtype="bf16")
    weights = load_file(str(tmp_path / "bf16" / "model.safetensors"))
    assert summary["dtype"] == "bf16" and all(v.dtype == torch.bfloat16 for v in weights.values())
    assert AutoConfig.from_pretrained(tmp_path / "bf16").dtype == torch.bfloat16
    assert next(merged.model.parameters()).dtype == torch.float32  # the in-memory merge is untouched


def test_export_refuses_an_existing_out_and_ambiguous_sources(tmp_path):
    from launcher.cli import build_parser
    from training.export import finish, load_merged, partial_dir

    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(LauncherError, match="exists"):
        partial_dir(out, overwrite=False)
    partial = partial_dir(out, overwrite=True)
    assert partial.name == "out.partial" and out.exists()  # OUT is replaced only when the new one is complete
    (partial / "x").write_text("1")
    finish(partial, out)
    assert (out / "x").is_file() and not partial.exists()
    with pytest.raises(LauncherError, match="exactly one"):
        load_merged(None, None)
    with pytest.raises(SystemExit):  # argparse: --checkpoint and --model are exclusive, one is required
        build_parser().parse_args(["export", "--checkpoint", "c", "--model", "m", "--format", "hf", "--out", "o"])


# --------------------------------------------------------------------------------------------- GGUF
@pytest.fixture(scope="module")
def merged(final):
    from training.export import load_merged

    return load_merged(final)


@pytest.fixture(scope="module")
def gguf_exports(merged, tmp_path_factory) -> dict[str, Path]:
    pytest.importorskip("gguf")
    from training.export_gguf import export_gguf

    root = tmp_path_factory.mktemp("gguf")
    for dtype in ("fp32", "fp16"):
        summary = export_gguf(merged, root / dtype, dtype=dtype)
        assert summary["dtype"] == dtype
    return {"fp32": root / "fp32", "fp16": root / "fp16"}


def _read(path: Path):
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    return fields, {t.name: t for t in reader.tensors}


def _hf_weights(merged) -> dict[str, np.ndarray]:
    return {k: v.detach().float().numpy() for k, v in merged.model.state_dict().items()}


def _llama_names(n_layers: int) -> set[str]:
    per_block = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"]
    return {"token_embd.weight", "output_norm.weight", "output.weight"} | {
        f"blk.{i}.{n}.weight" for i in range(n_layers) for n in per_block
    }


def _lm_source(name: str, hf: dict) -> np.ndarray:
    """The merged HF tensor a llama.cpp tensor holds (q/k still in HF row order)."""
    fixed = {
        "token_embd.weight": "model.language_model.embed_tokens.weight",
        "output_norm.weight": "model.language_model.norm.weight",
        "output.weight": "lm_head.weight",
    }
    if name in fixed:
        return hf[fixed[name]]
    _, i, part, _ = name.split(".")
    hf_part = {
        "attn_norm": "input_layernorm",
        "attn_q": "self_attn.q_proj",
        "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj",
        "ffn_norm": "post_attention_layernorm",
        "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
    }[part]
    return hf[f"model.language_model.layers.{i}.{hf_part}.weight"]


def _interleaved(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's rotary pairs: within each head, row 2j is HF row j and row 2j+1 is HF row j + head_dim/2."""
    head_dim = w.shape[0] // n_head
    out = np.empty_like(w)
    for h in range(n_head):
        for j in range(head_dim // 2):
            out[h * head_dim + 2 * j] = w[h * head_dim + j]
            out[h * head_dim + 2 * j + 1] = w[h * head_dim + head_dim // 2 + j]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_gguf_language_model_reads_back_as_llama_with_the_merged_weights(gguf_exports, merged, dtype):
    ftype = {"fp32": "f32", "fp16": "f16"}[dtype]
    fields, tensors = _read(gguf_exports[dtype] / f"model-{ftype}.gguf")
    text = merged.model.config.text_config
    assert fields["general.architecture"] == "llama"
    assert fields["general.file_type"] == (0 if ftype == "f32" else 1)
    assert (fields["llama.block_count"], fields["llama.embedding_length"], fields["llama.feed_forward_length"]) == (
        text.num_hidden_layers,
        text.hidden_size,
        text.intermediate_size,
    )
    assert (fields["llama.attention.head_count"], fields["llama.attention.head_count_kv"]) == (
        text.num_attention_heads,
        text.num_key_value_heads,
    )
    assert fields["llama.rope.dimension_count"] == text.hidden_size // text.num_attention_heads
    assert set(tensors) == _llama_names(text.num_hidden_layers)

    hf = _hf_weights(merged)
    heads = {"attn_q": text.num_attention_heads, "attn_k": text.num_key_value_heads}
    for name, t in tensors.items():
        want = _lm_source(name, hf)
        part = name.split(".")[2] if name.startswith("blk.") else ""
        if part in heads:
            want = _interleaved(want, heads[part])
        got = np.asarray(t.data)
        assert got.shape == want.shape and [int(d) for d in t.shape] == list(reversed(want.shape)), name
        if ftype == "f32" or want.ndim == 1:  # f16 files keep 1-D tensors in f32
            assert got.dtype == np.float32 and np.array_equal(got, want), name
        else:
            assert got.dtype == np.float16 and np.array_equal(got, want.astype(np.float16)), name
            assert np.abs(got.astype(np.float32) - want).max() <= np.abs(want).max() * 2**-11, name  # f16 rounding


@pytest.mark.slow
def test_gguf_carries_the_tokenizer_and_chat_template(gguf_exports, merged, hf_export):
    from training.export import PLAIN_CHAT_TEMPLATE

    fields, _ = _read(gguf_exports["fp32"] / "model-f32.gguf")
    tok = merged.tokenizer
    tokens = fields["tokenizer.ggml.tokens"]
    assert fields["tokenizer.ggml.model"] == "gpt2" and len(tokens) == merged.model.config.text_config.vocab_size
    assert tokens[: len(tok)] == tok.convert_ids_to_tokens(list(range(len(tok))))
    assert tokens[fields["tokenizer.ggml.bos_token_id"]] == "<s>"
    assert tokens[fields["tokenizer.ggml.eos_token_id"]] == "</s>"
    types = fields["tokenizer.ggml.token_type"]
    assert types[tok.convert_tokens_to_ids("<image>")] == 3  # CONTROL
    assert len(fields["tokenizer.ggml.merges"]) > 0 and fields["tokenizer.ggml.add_bos_token"] is True
    assert fields["tokenizer.chat_template"] == PLAIN_CHAT_TEMPLATE == (hf_export / "chat_template.jinja").read_text()
    modelfile = (gguf_exports["fp32"] / "Modelfile").read_text()
    assert "FROM ./model-f32.gguf\nFROM ./mmproj-model-f32.gguf\n" in modelfile
    assert 'TEMPLATE """{{ .Prompt }}\n"""' in modelfile and 'PARAMETER stop "</s>"' in modelfile


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_gguf_mmproj_holds_the_tower_and_the_trained_projector(gguf_exports, merged, dtype):
    ftype = {"fp32": "f32", "fp16": "f16"}[dtype]
    fields, tensors = _read(gguf_exports[dtype] / f"mmproj-model-{ftype}.gguf")
    config, vision = merged.model.config, merged.model.config.vision_config
    assert fields["general.architecture"] == "clip" and fields["clip.projector_type"] == "mlp"
    assert fields["clip.has_llava_projector"] is True and fields["clip.has_vision_encoder"] is True
    assert (fields["clip.vision.image_size"], fields["clip.vision.patch_size"], fields["clip.vision.block_count"]) == (
        vision.image_size,
        vision.patch_size,
        vision.num_hidden_layers,
    )  # vision_feature_layer -1: every block
    assert list(fields["clip.vision.feature_layer"]) == [vision.num_hidden_layers]  # the last block's output
    assert fields["clip.vision.projection_dim"] == config.text_config.hidden_size
    assert fields["clip.use_gelu"] is (vision.hidden_act == "gelu")
    per_block = [
        f"{n}.{p}"
        for n in ("attn_q", "attn_k", "attn_v", "attn_out", "ln1", "ln2", "ffn_up", "ffn_down")
        for p in ("weight", "bias")
    ]
    assert set(tensors) == {
        "v.class_embd",
        "v.patch_embd.weight",
        "v.position_embd.weight",
        "v.pre_ln.weight",
        "v.pre_ln.bias",
        "mm.0.weight",
        "mm.0.bias",
        "mm.2.weight",
        "mm.2.bias",
    } | {f"v.blk.{i}.{n}" for i in range(vision.num_hidden_layers) for n in per_block}

    hf = _hf_weights(merged)
    tower = "model.vision_tower.vision_model." if any(".vision_model." in k for k in hf) else "model.vision_tower."
    pairs = {
        "mm.0.weight": "model.multi_modal_projector.linear_1.weight",  # the TRAINED projector
        "mm.2.bias": "model.multi_modal_projector.linear_2.bias",
        "v.patch_embd.weight": tower + "embeddings.patch_embedding.weight",
        "v.class_embd": tower + "embeddings.class_embedding",
        "v.blk.1.ffn_up.weight": tower + "encoder.layers.1.mlp.fc1.weight",
        "v.blk.0.attn_out.bias": tower + "encoder.layers.0.self_attn.out_proj.bias",
    }
    for name, key in pairs.items():
        got, want = np.asarray(tensors[name].data), hf[key]
        assert got.shape == want.shape, name
        expected = want.astype(np.float16) if ftype == "f16" and want.ndim >= 2 else want
        assert got.dtype == expected.dtype and np.array_equal(got, expected), name


def test_tower_layers_used_follows_vision_feature_layer():
    from types import SimpleNamespace

    from training.export_gguf import tower_layers_used

    def cfg(layer):
        return SimpleNamespace(vision_feature_layer=layer, vision_config=SimpleNamespace(num_hidden_layers=24))

    assert [tower_layers_used(cfg(x)) for x in (-1, -2, 23)] == [24, 23, 23]
    with pytest.raises(LauncherError, match="several layers"):
        tower_layers_used(cfg([-2, -5]))


# --------------------------------------------------------------------------------------------- llama.cpp itself
def _llama_bin(name: str) -> Path | None:
    """A llama.cpp tool from $LLAMA_CPP_BIN or PATH. llama.cpp has no wheel on PyPI (llama-cpp-python is a source
    distribution that compiles it: many minutes on 2 cores), so CI skips these; README "Export" has a measured run."""
    import os
    import shutil

    where = os.environ.get("LLAMA_CPP_BIN")
    path = Path(where) / name if where else (Path(shutil.which(name)) if shutil.which(name) else None)
    return path if path and path.is_file() else None


def _run(args: list, timeout: float = 300) -> str:
    import subprocess

    done = subprocess.run([str(a) for a in args], capture_output=True, timeout=timeout)
    out, err = (b.decode("utf-8", "replace") for b in (done.stdout, done.stderr))  # partial UTF-8 as HF decodes it
    assert done.returncode == 0, (out + err)[-3000:]
    return out


TEXT_PROMPT, TEXT_TOKENS, IMAGE_TOKENS, AGREE_TOKENS = "Impression:", 16, 24, 8


def _greedy_text_ids(model, tok, prompt: str, n: int) -> list[int]:
    ids = [tok.bos_token_id] + tok(prompt, add_special_tokens=False)["input_ids"]
    with torch.inference_mode():
        out = model.generate(
            input_ids=torch.tensor([ids]),
            max_new_tokens=n,
            do_sample=False,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
    return out[0, len(ids) :].tolist()


@pytest.fixture(scope="module")
def perturbed(merged, synth_dir, tmp_path_factory):
    """(MergedModel, its f32 GGUF dir, a PNG): the merged model with seeded noise (0.7 x each tensor's std) on the
    language model's and projector's matrices. The 6-step model answers every prompt with spaces, which a layout error
    would not change; the first seed whose greedy outputs are varied makes a wrong name, permutation or projector show
    up in the tokens. The PNG is at the model's size, so neither side resizes or decodes a JPEG differently."""
    import copy

    from PIL import Image

    from datasets_io.records import prompt_a
    from training.export_gguf import export_gguf
    from training.generate import generate_reports
    from training.model import bundle_for

    size = merged.bundle.image_spec.size
    first = json.loads((synth_dir / "curriculum_val.jsonl").read_text().splitlines()[0])
    root = tmp_path_factory.mktemp("gguf-perturbed")
    png = root / "x.png"
    Image.open(synth_dir / first["image"]).convert("RGB").resize((size, size)).save(png)
    for seed in range(20):
        model = copy.deepcopy(merged.model)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.ndim == 2 and ("language_model" in name or "lm_head" in name or "projector" in name):
                    p.add_(torch.randn(p.shape, generator=g) * p.std() * 0.7)
        noisy = type(merged)(
            model, merged.tokenizer, bundle_for(model, merged.tokenizer, merged.bundle.base_model_path), merged.source
        )
        text_ids = _greedy_text_ids(model, merged.tokenizer, TEXT_PROMPT, TEXT_TOKENS)
        report = generate_reports(noisy.bundle, [(prompt_a(), png.read_bytes())], max_new_tokens=IMAGE_TOKENS)[0]
        if len(set(text_ids)) > 3 and len(set(report.split())) > 1:
            export_gguf(noisy, root / "fp32", dtype="fp32")
            return noisy, root / "fp32", png
    pytest.fail("no seed in 20 gave varied greedy outputs")


@pytest.mark.slow
@pytest.mark.skipif(_llama_bin("llama-completion") is None, reason="llama.cpp is not built here (no PyPI wheel)")
def test_llama_cpp_continues_a_text_prompt_as_transformers_does(perturbed):
    """The language-model GGUF under llama.cpp: the same prompt ids and the same greedy continuation (f32)."""
    noisy, out_dir, _ = perturbed
    model, tok = out_dir / "model-f32.gguf", noisy.tokenizer
    out = _run([_llama_bin("llama-tokenize"), "-m", model, "-p", TEXT_PROMPT, "--ids", "--log-disable"])
    assert (
        json.loads(out.strip().splitlines()[-1])
        == [tok.bos_token_id] + tok(TEXT_PROMPT, add_special_tokens=False)["input_ids"]
    )
    text = _run(
        [
            _llama_bin("llama-completion"),
            "-m",
            model,
            "-p",
            TEXT_PROMPT,
            "-n",
            TEXT_TOKENS,
            "--temp",
            "0",
            "--top-k",
            "1",
            "-no-cnv",
            "--no-display-prompt",
            "--no-warmup",
            "-s",
            "0",
            "-t",
            "2",
        ]
    )
    expected = tok.decode(_greedy_text_ids(noisy.model, tok, TEXT_PROMPT, TEXT_TOKENS), skip_special_tokens=True)
    assert text.strip() == expected.strip()


@pytest.mark.slow
@pytest.mark.skipif(_llama_bin("llama-mtmd-cli") is None, reason="llama.cpp is not built here (no PyPI wheel)")
def test_llama_cpp_reports_on_an_image_as_transformers_does(perturbed):
    """Both GGUF files under llama.cpp's multimodal CLI: the training prompt, the image where it was in training."""
    from datasets_io.records import prompt_a
    from training.generate import generate_reports

    noisy, out_dir, png = perturbed
    out = _run(
        [
            _llama_bin("llama-mtmd-cli"),
            "-m",
            out_dir / "model-f32.gguf",
            "--mmproj",
            out_dir / "mmproj-model-f32.gguf",
            "--image",
            png,
            "-p",
            prompt_a().replace("<image>", "<__media__>"),
            "-n",
            IMAGE_TOKENS,
            "--temp",
            "0",
            "--top-k",
            "1",
            "-s",
            "0",
            "-t",
            "2",
            "--no-warmup",
            "--jinja",
        ]
    )  # --jinja: the GGUF's chat template
    expected = generate_reports(noisy.bundle, [(prompt_a(), png.read_bytes())], max_new_tokens=IMAGE_TOKENS)[0]
    # Not all 24: llama.cpp's projector GELU is the tanh approximation (and ggml's CPU GELU goes through an f16
    # table) where transformers' is exact; on this noisy, repetitive output a near tie flips after 10-13 tokens
    # (measured). A wrong layout (names, feature layer, projector order) differs from the first token.
    tok = noisy.tokenizer
    got, want = (tok(t.strip(), add_special_tokens=False)["input_ids"] for t in (out, expected))
    assert len(set(want[:AGREE_TOKENS])) > 1 and got[:AGREE_TOKENS] == want[:AGREE_TOKENS], (out, expected)
