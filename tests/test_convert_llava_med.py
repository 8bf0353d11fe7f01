"""`launcher model convert-llava-med` on tiny checkpoints written here in LLaVA-Med v1.5's original layout (random
weights; the real key names, config fields, sharding and tokenizer shape). Nothing is downloaded.

    HF_HUB_OFFLINE=1 python -m pytest tests/test_convert_llava_med.py -q           # ~30 s on 2 cores
    HF_HUB_OFFLINE=1 python -m pytest tests/test_convert_llava_med.py -q -m slow   # + a LoRA step via `launcher local`
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from launcher.cli import main as launcher_main
from datasets_io.errors import LauncherError

REPO = Path(__file__).resolve().parents[1]

# A LLaVA-Med v1.5 Mistral-7B config.json, fields as released (mm_* and LLaVA-Med's extras), at toy sizes.
LLAVA_MED_CONFIG = {
    "_name_or_path": "microsoft/llava-med-v1.5-mistral-7b",
    "architectures": ["LlavaMistralForCausalLM"],
    "model_type": "llava_mistral",
    "attention_dropout": 0.0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "feature_outs": "encoder+decoder",
    "freeze_mm_mlp_adapter": False,
    "hidden_act": "silu",
    "hidden_size": 32,
    "image_aspect_ratio": "pad",
    "img_size": 640,
    "initializer_range": 0.1,  # 0.02 in the release; larger here so a wrong weight moves the logits visibly
    "intermediate_size": 64,
    "max_position_embeddings": 32768,
    "mm_hidden_size": 24,
    "mm_patch_merge_type": "flat",
    "mm_projector_lr": None,
    "mm_projector_type": "mlp2x_gelu",
    "mm_resampler_type": None,
    "mm_use_im_patch_token": False,
    "mm_use_im_start_end": False,
    "mm_vision_select_feature": "patch",
    "mm_vision_select_layer": -2,
    "mm_vision_tower": "openai/clip-vit-large-patch14-336",
    "num_attention_heads": 4,
    "num_hidden_layers": 3,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-05,
    "rope_theta": 1000000.0,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "tokenizer_model_max_length": 4096,
    "tokenizer_padding_side": "right",
    "torch_dtype": "float32",
    "transformers_version": "4.36.2",
    "tune_mm_mlp_adapter": False,
    "unfreeze_mm_vision_tower": False,
    "use_cache": False,
    "use_mm_proj": True,
    "vocab_size": None,  # set from the tokenizer
}
TOWER = dict(
    hidden_size=24, intermediate_size=48, num_hidden_layers=3, num_attention_heads=2, image_size=56, patch_size=14
)
IMAGE_TOKENS = (56 // 14) ** 2

CORPUS = [
    "[INST] Describe the findings of this chest X-ray. [/INST]",
    "The lungs are clear. There is no pleural effusion or pneumothorax.",
    "Heart size is normal. Mild cardiomegaly. Small left pleural effusion with basilar atelectasis.",
    "No acute cardiopulmonary process. Patient data: age 64, sex F, indication: dyspnea.",
    "What is the impression? Stable appearance of the chest compared to the prior study.",
]


# ---------------------------------------------------------------------------------------------------------------------
# Writing the original layout
# ---------------------------------------------------------------------------------------------------------------------


def write_tokenizer(directory: Path) -> int:
    """A byte-level BPE saved as PreTrainedTokenizerFast: <unk>=0, <s>=1 (prepended, like Llama's), </s>=2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        show_progress=False,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(directory)
    return len(fast)


def write_vision_tower(directory: Path, *, full_clip: bool = False, seed: int = 1) -> dict[str, torch.Tensor]:
    """A CLIP tower dir: CLIPVisionModel.save_pretrained, or (full_clip) a CLIPModel like openai's download, with a
    336-px-style preprocessor_config.json at the toy size. Returns the vision weights by unprefixed name."""
    from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    torch.manual_seed(seed)
    if full_clip:
        text = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=64,
                    bos_token_id=0, eos_token_id=1, pad_token_id=1)  # fmt: skip
        model = CLIPModel(CLIPConfig(vision_config=TOWER, text_config=text, projection_dim=8))
        vision = {k.removeprefix("vision_model."): v for k, v in model.state_dict().items() if k.startswith("vision_")}
    else:
        model = CLIPVisionModel(CLIPVisionConfig(**TOWER))
        vision = dict(model.state_dict())
    model.save_pretrained(directory)
    size = TOWER["image_size"]
    CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(
        directory
    )
    return {k: v.clone() for k, v in vision.items()}


def write_llava_med_checkpoint(
    directory: Path,
    *,
    n_shards: int = 2,
    fmt: str = "safetensors",
    dtype: torch.dtype = torch.float32,
    config_overrides: dict | None = None,
    extra_tensors: dict[str, torch.Tensor] | None = None,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """An original-layout checkpoint: config.json (llava_mistral), generation_config.json, a tokenizer, and the
    MistralForCausalLM weights + model.mm_projector.{0,2} in `n_shards` shards with an index. Returns the tensors."""
    from transformers import MistralConfig, MistralForCausalLM

    directory.mkdir(parents=True, exist_ok=True)
    vocab = write_tokenizer(directory)
    config = {**LLAVA_MED_CONFIG, "vocab_size": vocab, **(config_overrides or {})}
    torch.manual_seed(seed)
    text = MistralConfig(**{k: config[k] for k in (
        "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
        "rms_norm_eps", "rope_theta", "sliding_window", "vocab_size", "initializer_range")})  # fmt: skip
    tensors = dict(MistralForCausalLM(text).state_dict())
    hidden, mm_hidden = config["hidden_size"], config["mm_hidden_size"]
    tensors |= {
        "model.mm_projector.0.weight": torch.randn(hidden, mm_hidden) * 0.2,
        "model.mm_projector.0.bias": torch.randn(hidden) * 0.1,
        "model.mm_projector.2.weight": torch.randn(hidden, hidden) * 0.2,
        "model.mm_projector.2.bias": torch.randn(hidden) * 0.1,
    }
    tensors |= extra_tensors or {}
    tensors = {k: v.to(dtype).contiguous() for k, v in tensors.items()}

    keys = list(tensors)  # embed first, layers in order, norm, lm_head, projector last: as the release is sharded
    per = -(-len(keys) // n_shards)
    weight_map = {}
    for s in range(n_shards):
        chunk = {k: tensors[k] for k in keys[s * per : (s + 1) * per]}
        if fmt == "safetensors":
            from safetensors.torch import save_file

            name = f"model-{s + 1:05d}-of-{n_shards:05d}.safetensors"
            save_file(chunk, directory / name, metadata={"format": "pt"})
        else:
            name = f"pytorch_model-{s + 1:05d}-of-{n_shards:05d}.bin"
            torch.save(chunk, directory / name)
        weight_map |= {k: name for k in chunk}
    index = "model.safetensors.index.json" if fmt == "safetensors" else "pytorch_model.bin.index.json"
    (directory / index).write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    (directory / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    return tensors


def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = launcher_main(list(argv))
    return rc, out.getvalue(), err.getvalue()


def load_safetensors_dir(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = json.loads((directory / "model.safetensors.index.json").read_text())
    tensors = {}
    for name in sorted(set(index["weight_map"].values())):
        tensors |= load_file(directory / name)
    assert set(tensors) == set(index["weight_map"])
    return tensors


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """One conversion through the CLI, with --verify: (src, tower, out, source tensors, tower tensors, stdout)."""
    root = tmp_path_factory.mktemp("llava_med")
    src, tower, out = root / "llava-med-v1.5-mistral-7b", root / "clip-vit-large-patch14-336", root / "hf"
    source = write_llava_med_checkpoint(src, n_shards=2)
    tower_tensors = write_vision_tower(tower)
    rc, stdout, stderr = run_cli(
        "model", "convert-llava-med", "--src", str(src), "--vision-tower", str(tower), "--out", str(out), "--verify"
    )
    assert rc == 0, stderr
    return src, tower, out, source, tower_tensors, stdout


# ---------------------------------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------------------------------


def test_cli_converts_and_the_logits_match_the_original_layout(converted):
    src, tower, out, *_, stdout = converted
    assert "verify: max |logit difference|" in stdout
    summary = json.loads(next(line for line in stdout.splitlines() if line.startswith("{")))
    report = json.loads((out / "conversion.json").read_text())["verify"]
    print(f"max |logit diff| = {report['max_abs_diff']:.3g}, text positions {report['max_abs_diff_text']:.3g}")
    assert summary["verified_max_abs_logit_diff"] == report["max_abs_diff"] <= 1e-4
    assert report["max_abs_diff_text"] <= 1e-4
    assert report["image_positions"] == IMAGE_TOKENS and report["text_positions"] > 20
    assert report["pixel_max_abs_diff"] == 0.0  # LLaVA's expand2square + CLIP == the converted processor
    assert report["chat_template_matches"] and report["processor_tokens_match"]
    assert not out.with_name(out.name + ".partial").exists()


def test_output_holds_exactly_an_hf_llava_checkpoint(converted):
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    out = converted[2]
    assert sorted(p.name for p in out.iterdir()) == [
        "chat_template.jinja", "config.json", "conversion.json", "generation_config.json",
        "model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors", "model-00003-of-00003.safetensors",
        "model.safetensors.index.json", "preprocessor_config.json", "processor_config.json", "tokenizer.json",
        "tokenizer_config.json",
    ]  # fmt: skip
    tensors = load_safetensors_dir(out)
    config = LlavaConfig.from_pretrained(out)
    with torch.device("meta"):
        expected = LlavaForConditionalGeneration(config).state_dict()
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {k: tuple(v.shape) for k, v in expected.items()}
    assert any(k.startswith("model.language_model.layers.") for k in tensors)  # the transformers-5 module names
    _, info = LlavaForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]


def test_weights_are_renamed_not_changed_and_new_rows_are_the_mean(converted):
    from transformers import AutoTokenizer, LlavaConfig

    src, tower, out, source, tower_tensors, _ = converted
    tensors = load_safetensors_dir(out)
    v0 = source["model.embed_tokens.weight"].shape[0]
    tok = AutoTokenizer.from_pretrained(out)
    image_id, pad_id = tok.convert_tokens_to_ids(["<image>", "<pad>"])
    assert (image_id, pad_id, tok.pad_token_id, len(tok)) == (v0, v0 + 1, v0 + 1, v0 + 2)

    def converted_name(old: str) -> str:  # written out by hand, independently of the converter's table
        if old.startswith("model.mm_projector."):
            index, param = old.split(".")[2:]
            return f"model.multi_modal_projector.linear_{'1' if index == '0' else '2'}.{param}"
        return old if old == "lm_head.weight" else "model.language_model." + old.removeprefix("model.")

    for old, value in source.items():
        if old not in ("model.embed_tokens.weight", "lm_head.weight"):  # resized: checked below
            assert torch.equal(tensors[converted_name(old)], value), old
    for name, value in tower_tensors.items():
        assert torch.equal(tensors[f"model.vision_tower.{name}"], value), name
    for old, new in [("model.embed_tokens.weight", "model.language_model.embed_tokens.weight"),
                     ("lm_head.weight", "lm_head.weight")]:  # fmt: skip
        assert torch.equal(tensors[new][:v0], source[old])
        mean = source[old].double().mean(0).float()
        assert torch.allclose(tensors[new][v0:], mean.expand(2, -1), atol=1e-7)

    config = LlavaConfig.from_pretrained(out)
    assert config.image_token_index == image_id and config.image_seq_length == IMAGE_TOKENS
    assert (config.vision_feature_layer, config.vision_feature_select_strategy) == (-2, "default")
    assert config.projector_hidden_act == "gelu" and not config.tie_word_embeddings
    text = config.text_config
    assert (text.model_type, text.vocab_size, text.pad_token_id) == ("mistral", v0 + 2, pad_id)
    assert text.sliding_window is None
    assert text.rope_parameters["rope_theta"] == 1e6 and text.num_hidden_layers == 3
    assert config.vision_config.hidden_size == TOWER["hidden_size"]


def test_processor_chat_template_matches_llava_mistral_instruct(converted):
    from PIL import Image
    from transformers import AutoImageProcessor, AutoProcessor

    from training.convert_llava_med.verify import original_llava_prompt

    out = converted[2]
    processor = AutoProcessor.from_pretrained(out)
    tok = processor.tokenizer
    conversation = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the findings."}]},
        {"role": "assistant", "content": "The lungs are clear."},
        {"role": "user", "content": "Any effusion?"},
    ]
    expected = original_llava_prompt(
        [("USER", "<image>\nDescribe the findings."), ("ASSISTANT", "The lungs are clear."), ("USER", "Any effusion?")]
    )
    assert expected == (
        "[INST] <image>\nDescribe the findings. [/INST] The lungs are clear. </s>[INST] Any effusion? [/INST]"
    )
    assert tok.apply_chat_template(conversation, tokenize=False) == "<s>" + expected
    with_system = [{"role": "system", "content": "Be brief."}, *conversation[:1]]
    assert tok.apply_chat_template(with_system, tokenize=False) == "<s>" + original_llava_prompt(
        [("USER", "<image>\nDescribe the findings.")], system="Be brief."
    )
    ids = tok.apply_chat_template(conversation, tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert ids[0] == tok.bos_token_id and ids[1] != tok.bos_token_id  # one BOS

    image_processor = AutoImageProcessor.from_pretrained(out)
    assert image_processor.do_pad and image_processor.crop_size["height"] == 56
    batch = processor(text=expected, images=Image.new("RGB", (80, 50), (200, 10, 10)), return_tensors="pt")
    assert batch["pixel_values"].shape == (1, 3, 56, 56)
    assert int((batch["input_ids"] == tok.convert_tokens_to_ids("<image>")).sum()) == IMAGE_TOKENS


def test_verify_fails_loudly_on_a_wrong_conversion(converted, tmp_path):
    from safetensors.torch import load_file, save_file

    from training.convert_llava_med.verify import verify_conversion

    src, tower, out, *_ = converted
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    name = index["weight_map"]["model.multi_modal_projector.linear_2.bias"]
    shard = load_file(broken / name)
    shard["model.multi_modal_projector.linear_2.bias"] = shard["model.multi_modal_projector.linear_2.bias"] + 1e-2
    save_file(shard, broken / name, metadata={"format": "pt"})
    with pytest.raises(LauncherError, match=r"verification FAILED: max \|logit difference\|"):
        verify_conversion(src, tower, broken, log=lambda _: None)


def test_bin_weights_need_allow_pickle(tmp_path):
    from training.convert_llava_med.convert import convert

    src, tower, out = tmp_path / "src", tmp_path / "tower", tmp_path / "out"
    write_llava_med_checkpoint(src, fmt="bin", n_shards=2)
    write_vision_tower(tower)
    argv = ["model", "convert-llava-med", "--src", str(src), "--vision-tower", str(tower), "--out", str(out)]
    rc, _, stderr = run_cli(*argv)
    assert rc == 2
    assert "pickled .bin weights" in stderr and "--allow-pickle" in stderr and len(stderr.strip().splitlines()) == 1
    assert not out.exists() and not (tmp_path / "out.partial").exists()

    result = convert(src, tower, out, allow_pickle=True, verify=True, log=lambda _: None)
    assert result.verify["max_abs_diff"] <= 1e-4 and result.shards == 3


@pytest.mark.parametrize("unfreeze", [False, True])
def test_openai_clip_dir_and_tower_weights_inside_the_source(tmp_path, unfreeze):
    """The real tower download is a full CLIPModel (vision_model.* + the text half). A LLaVA checkpoint may also carry
    model.vision_tower.vision_tower.vision_model.*: LLaVA uses them only with unfreeze_mm_vision_tower=true."""
    from training.convert_llava_med.convert import convert

    src, tower, out = tmp_path / "src", tmp_path / "tower", tmp_path / "out"
    clip = write_vision_tower(tower, full_clip=True, seed=1)
    own = {f"model.vision_tower.vision_tower.vision_model.{k}": torch.randn_like(v) for k, v in clip.items()}
    write_llava_med_checkpoint(src, extra_tensors=own, config_overrides={"unfreeze_mm_vision_tower": unfreeze})
    logs: list[str] = []
    result = convert(src, tower, out, verify=True, log=logs.append)
    assert result.verify["max_abs_diff"] <= 1e-4
    tensors = load_safetensors_dir(out)
    prefix = "model.vision_tower.vision_tower.vision_model."
    expected = {k.removeprefix(prefix): v for k, v in own.items()} if unfreeze else clip
    for name, value in expected.items():
        assert torch.equal(tensors[f"model.vision_tower.{name}"], value), name
    assert not any(k.startswith(("model.vision_tower.text_model", "model.vision_tower.vision_model")) for k in tensors)
    assert any("ignored" in line and "vision-tower tensors" in line for line in logs) == (not unfreeze)


def test_bf16_source_stays_bf16_and_tower_is_cast(tmp_path):
    from training.convert_llava_med.convert import convert

    src, tower, out = tmp_path / "src", tmp_path / "tower", tmp_path / "out"
    source = write_llava_med_checkpoint(src, dtype=torch.bfloat16, n_shards=3)
    write_vision_tower(tower)
    result = convert(src, tower, out, verify=True, log=lambda _: None)
    tensors = load_safetensors_dir(out)
    assert result.dtype == "bfloat16" and {t.dtype for t in tensors.values()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert torch.equal(tensors["lm_head.weight"][: source["lm_head.weight"].shape[0]], source["lm_head.weight"])
    assert result.verify["max_abs_diff"] <= 1e-4


def test_unsupported_or_inconsistent_sources_are_refused(tmp_path):
    from training.convert_llava_med.convert import convert

    tower = tmp_path / "tower"
    write_vision_tower(tower)
    src = tmp_path / "src"
    write_llava_med_checkpoint(src, config_overrides={"mm_projector_type": "linear", "mm_use_im_start_end": True})
    with pytest.raises(LauncherError, match=r"mm_projector_type='linear'.*mm_use_im_start_end=True"):
        convert(src, tower, tmp_path / "out1", log=lambda _: None)

    src2 = tmp_path / "src2"
    write_llava_med_checkpoint(src2, config_overrides={"mm_hidden_size": 48})  # a projector for another tower
    with pytest.raises(LauncherError, match="mm_hidden_size 48"):
        convert(src2, tower, tmp_path / "out2", log=lambda _: None)

    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("")
    with pytest.raises(LauncherError, match="--overwrite"):
        convert(src2, tower, tmp_path / "taken", log=lambda _: None)


def test_streaming_writer_round_trips_through_safetensors(tmp_path):
    from safetensors.torch import load_file

    from training.convert_llava_med.safetensors_stream import SafetensorsFile, StreamingSafetensorsWriter

    a = torch.randn(5, 3).to(torch.bfloat16)
    b, c = torch.arange(6, dtype=torch.int64).reshape(2, 3), torch.randn(4)
    specs = [("a", torch.bfloat16, (7, 3)), ("b", torch.int64, (2, 3)), ("c", torch.float32, (4,))]
    w = StreamingSafetensorsWriter(tmp_path / "x.safetensors", specs)
    w.write("a", a, a[:2])  # written in two parts, read back as one (7, 3)
    w.write("b", b)
    w.write("c", c)
    w.close()
    loaded = load_file(tmp_path / "x.safetensors")
    assert torch.equal(loaded["a"], torch.cat([a, a[:2]]))
    assert torch.equal(loaded["b"], b) and torch.equal(loaded["c"], c)
    reader = SafetensorsFile(tmp_path / "x.safetensors")
    assert torch.equal(reader.read("a"), loaded["a"]) and reader.spec("b") == (torch.int64, (2, 3))
    reader.close()


@pytest.mark.slow
def test_lora_training_step_on_the_converted_model(converted, synth_dir, tmp_path):
    """The converted directory trains through the normal path: `launcher local` with model.name_or_path at it."""
    from safetensors import safe_open

    if importlib.util.find_spec("launcher.commands.local") is None or not (REPO / "configs" / "tiny.yaml").is_file():
        pytest.skip("`launcher local` / configs/tiny.yaml are not in this checkout yet")
    out, run_dir = converted[2], tmp_path / "run"
    overrides = {
        "model.name_or_path": str(out), "model.train_vision_tower": "false", "model.train_token_embeddings": "false",
        "model.dtype": "fp32", "data.root": str(synth_dir), "data.synth_if_missing": "false",
        "data.max_seq_len": "2048",
        "output.dir": str(run_dir), "train.max_steps": "2", "train.micro_batch_size": "2", "train.warmup_steps": "1",
        "train.val_batches": "1", "train.eval_every": "0", "train.save_every": "0", "lora.r": "4", "lora.alpha": "8",
    }  # fmt: skip
    argv = ["local", "--config", str(REPO / "configs" / "tiny.yaml"), "--device", "cpu", "--no-progress"]
    for key, value in overrides.items():
        argv += ["--set", f"{key}={value}"]
    rc, stdout, stderr = run_cli(*argv)
    assert rc == 0, stdout[-2000:] + stderr[-4000:]
    final = run_dir / "checkpoints" / "final"
    adapter_config = json.loads((final / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(out)
    with safe_open(final / "adapter_model.safetensors", framework="pt") as f:
        names = list(f.keys())
    assert any(".language_model.layers." in n and "lora_" in n for n in names)
    assert all(("lora_" in n and ".language_model.layers." in n) or "multi_modal_projector" in n for n in names)
