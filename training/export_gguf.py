"""GGUF export for llama.cpp / Ollama: the merged language model, the vision tower + projector (mmproj), a Modelfile.

    launcher export --checkpoint runs/tiny/checkpoints/final --format gguf --out exports/tiny-gguf --dtype fp16
    cd exports/tiny-gguf && ollama create cxr -f Modelfile && ollama run cxr
    llama-mtmd-cli -m model-f16.gguf --mmproj mmproj-model-f16.gguf --image x.jpg -p "..."

Needs the `gguf` package (`pip install .[export]`); tensor names come from its TensorNameMap.

- `model-F.gguf`: the Mistral language model under llama.cpp's "llama" architecture (Mistral without a sliding
  window is Llama's graph), named as convert_hf_to_gguf.py names Llama tensors (token_embd, blk.N.attn_q, ...,
  output_norm, output). q_proj / k_proj rows are permuted as that script does: HF's rotary embedding rotates the two
  halves of each head, llama.cpp's rotates interleaved pairs. The tokenizer (tokens, types, merges, special ids) and
  the chat template go in too.
- `mmproj-model-F.gguf`: arch "clip" with a LLaVA "mlp" projector, laid out as llama.cpp's LLaVA-1.5 image-encoder
  converter lays it out (tools/mtmd/legacy-models/convert_image_encoder_to_gguf.py): v.patch_embd, v.class_embd,
  v.position_embd, v.pre_ln, v.blk.N.*, and the projector's linear_1 / linear_2 as mm.0 / mm.2. The tower stops at
  the layer the model reads (`vision_feature_layer`); later blocks and the post-layernorm are left out, as there.
- `Modelfile`: both files and the prompt template the model was trained on, greedy decoding, EOS as the stop.

f32: every tensor f32, equal to the merged weights. f16: 2-D and 4-D weights f16, 1-D tensors (norms, biases,
class embedding) f32, as llama.cpp's converters do.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from datasets_io.errors import LauncherError

GGUF_DTYPES = {"fp32": "f32", "fp16": "f16"}
LM_PREFIX = "model.language_model."
TOWER_PREFIX = "model.vision_tower."
FEATURE_LAYER_KEY = "clip.vision.feature_layer"  # llama.cpp clip-impl.h KEY_FEATURE_LAYERS; no gguf constant
PROJECTOR_NAMES = {"model.multi_modal_projector.linear_1": "mm.0", "model.multi_modal_projector.linear_2": "mm.2"}


def require_gguf() -> Any:
    try:
        import gguf
    except ModuleNotFoundError:
        raise LauncherError("--format gguf needs the gguf package: pip install '.[export]' (or gguf==0.19.0)") from None
    return gguf


@dataclass
class GgufTensor:
    name: str
    data: np.ndarray  # what is stored: f32 or f16, in llama.cpp's row layout


def permute_rotary(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF (rotate_half) -> llama.cpp (interleaved) order of q/k rows within each head: convert_hf_to_gguf's permute.
    (n_head * head_dim, in) -> same shape."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def stored(name: str, t: torch.Tensor, ftype: str) -> GgufTensor:
    """f16 export: weights of 2+ dims in f16; 1-D tensors stay f32 (llama.cpp's kernels want them so)."""
    a = t.detach().to(torch.float32).cpu().numpy()
    return GgufTensor(name, a.astype(np.float16) if ftype == "f16" and a.ndim >= 2 else a)


# --------------------------------------------------------------------------------------------- language model
def language_model_tensors(model: Any, ftype: str) -> list[GgufTensor]:
    gguf = require_gguf()
    text = model.config.text_config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, text.num_hidden_layers)
    out = []
    for key, t in model.state_dict().items():
        if key == "lm_head.weight":
            hf = key
        elif key.startswith(LM_PREFIX):
            hf = "model." + key[len(LM_PREFIX) :]
        else:
            continue
        if hf.endswith("rotary_emb.inv_freq"):
            continue
        if hf.endswith("self_attn.q_proj.weight"):
            t = permute_rotary(t, text.num_attention_heads)
        elif hf.endswith("self_attn.k_proj.weight"):
            t = permute_rotary(t, text.num_key_value_heads)
        name = names.get_name(hf, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise LauncherError(f"GGUF export: no llama.cpp name for language-model tensor {key}")
        out.append(stored(name, t, ftype))
    return out


def rope_theta(text_config: Any) -> float:
    params = getattr(text_config, "rope_parameters", None) or {}
    return float(params.get("rope_theta") or getattr(text_config, "rope_theta", 10000.0))


def write_language_model(path: Path, model: Any, tokenizer: Any, ftype: str, name: str) -> list[GgufTensor]:
    gguf = require_gguf()
    text = model.config.text_config
    if getattr(text, "sliding_window", None):
        raise LauncherError(
            f"GGUF export: the language model uses a sliding window ({text.sliding_window}); "
            "llama.cpp's llama graph has none"
        )
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_name(name)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if ftype == "f32" else gguf.LlamaFileType.MOSTLY_F16)
    writer.add_context_length(text.max_position_embeddings)
    writer.add_embedding_length(text.hidden_size)
    writer.add_block_count(text.num_hidden_layers)
    writer.add_feed_forward_length(text.intermediate_size)
    writer.add_head_count(text.num_attention_heads)
    writer.add_head_count_kv(text.num_key_value_heads)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(rope_theta(text))
    writer.add_layer_norm_rms_eps(text.rms_norm_eps)
    writer.add_vocab_size(text.vocab_size)
    add_tokenizer(writer, tokenizer, text.vocab_size)
    tensors = language_model_tensors(model, ftype)
    _write(writer, tensors)
    return tensors


def add_tokenizer(writer: Any, tokenizer: Any, n_vocab: int) -> None:
    """Tokens in id order, their types, merges, special ids, chat template (gguf.SpecialVocab reads the last three
    from the saved tokenizer). A byte-level BPE (the tiny model's) is llama.cpp's "gpt2" model; a byte-fallback BPE
    (Mistral's tokenizer.json) is its "llama" model, read with gguf's LlamaHfVocab."""
    from training.export import chat_template

    gguf = require_gguf()
    tokenizer.chat_template = chat_template(tokenizer)  # the HF export's template: SpecialVocab copies it
    with tempfile.TemporaryDirectory(prefix="gguf-tok-") as tmp:
        tokenizer.save_pretrained(tmp)
        spec = json.loads((Path(tmp) / "tokenizer.json").read_text())
        if spec["model"].get("byte_fallback"):
            vocab = gguf.LlamaHfVocab(Path(tmp))
            tokens, scores, types = zip(*vocab.all_tokens())
            writer.add_tokenizer_model("llama")
            writer.add_tokenizer_pre("default")
            writer.add_token_scores(list(scores))
        else:
            tokens, types = byte_level_tokens(tokenizer)
            writer.add_tokenizer_model("gpt2")
            writer.add_tokenizer_pre("default")
        tokens, types = list(tokens), list(types)
        for i in range(len(tokens), n_vocab):  # embedding rows beyond the tokenizer (padding): unused tokens
            tokens.append(f"[PAD{i}]".encode() if isinstance(tokens[0], bytes) else f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        special = gguf.SpecialVocab(Path(tmp), load_merges=not spec["model"].get("byte_fallback"), n_vocab=n_vocab)
        special.add_to_gguf(writer, quiet=True)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)


def byte_level_tokens(tokenizer: Any) -> tuple[list[str], list[int]]:
    """Every id's token string as the BPE vocabulary spells it; special added tokens are CONTROL, other added tokens
    (the tiny tokenizer's phrase tokens) USER_DEFINED, the rest NORMAL."""
    gguf = require_gguf()
    added = tokenizer.added_tokens_decoder  # {id: AddedToken}
    tokens, types = [], []
    for i in range(len(tokenizer)):
        if i in added:
            tokens.append(added[i].content)
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(tokenizer.convert_ids_to_tokens(i))
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


# --------------------------------------------------------------------------------------------- vision + projector
def tower_layers_used(config: Any) -> int:
    """How many CLIP blocks feed the projector: vision_feature_layer -1 = all, -2 = all but the last, ..."""
    layer = config.vision_feature_layer
    if not isinstance(layer, int):
        raise LauncherError(f"GGUF export: vision_feature_layer={layer!r} (several layers) is not LLaVA-1.5's layout")
    n = config.vision_config.num_hidden_layers
    return layer if layer >= 0 else n + layer + 1


def mmproj_tensors(model: Any, ftype: str) -> list[GgufTensor]:
    gguf = require_gguf()
    config = model.config
    used = tower_layers_used(config)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, config.vision_config.num_hidden_layers)
    out = []
    for key, t in model.state_dict().items():
        module, _, leaf = key.rpartition(".")
        if module in PROJECTOR_NAMES:
            out.append(stored(f"{PROJECTOR_NAMES[module]}.{leaf}", t, ftype))
            continue
        if not key.startswith(TOWER_PREFIX) or "post_layernorm" in key or key.endswith("position_ids"):
            continue
        if ".encoder.layers." in key and int(key.split(".encoder.layers.")[1].split(".")[0]) >= used:
            continue  # blocks after the feature layer are never run
        inner = key[len(TOWER_PREFIX) :].removeprefix("vision_model.")  # CLIPVisionModel or its inner transformer
        name = names.get_name("vision_tower.vision_model." + inner, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise LauncherError(f"GGUF export: no llama.cpp name for vision tensor {key}")
        out.append(stored(name, t, ftype))
    return out


def write_mmproj(path: Path, model: Any, image_spec: Any, ftype: str, name: str) -> list[GgufTensor]:
    gguf = require_gguf()
    config, vision = model.config, model.config.vision_config
    if config.vision_feature_select_strategy != "default" or config.projector_hidden_act != "gelu":
        raise LauncherError(
            "GGUF export: llama.cpp's LLaVA 'mlp' projector drops CLS and uses GELU; this model has "
            f"select strategy {config.vision_feature_select_strategy!r}, "
            f"projector act {config.projector_hidden_act!r}"
        )
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.MMPROJ])
    writer.add_name(name)
    writer.add_description("image encoder for LLaVA")
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if ftype == "f32" else gguf.LlamaFileType.MOSTLY_F16)
    writer.add_bool(gguf.Keys.Clip.HAS_VISION_ENCODER, True)
    writer.add_bool(gguf.Keys.Clip.HAS_LLAVA_PROJECTOR, True)
    writer.add_string(gguf.Keys.Clip.PROJECTOR_TYPE, "mlp")
    writer.add_vision_image_size(vision.image_size)
    writer.add_vision_patch_size(vision.patch_size)
    writer.add_vision_embedding_length(vision.hidden_size)
    writer.add_vision_feed_forward_length(vision.intermediate_size)
    writer.add_vision_projection_dim(config.text_config.hidden_size)
    writer.add_vision_head_count(vision.num_attention_heads)
    writer.add_vision_attention_layernorm_eps(vision.layer_norm_eps)
    used = tower_layers_used(config)
    writer.add_vision_block_count(used)
    # Without it llama.cpp's LLaVA graph runs block_count - 1 blocks (LLaVA-1.5's "second to last" default).
    writer.add_array(FEATURE_LAYER_KEY, [used])
    writer.add_vision_image_mean(list(image_spec.mean))
    writer.add_vision_image_std(list(image_spec.std))
    writer.add_bool(gguf.Keys.ClipVision.USE_GELU, vision.hidden_act == "gelu")  # False: CLIP's quick_gelu
    tensors = mmproj_tensors(model, ftype)
    _write(writer, tensors)
    return tensors


def _write(writer: Any, tensors: list[GgufTensor]) -> None:
    for t in tensors:
        writer.add_tensor(t.name, t.data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# --------------------------------------------------------------------------------------------- Modelfile + driver
def modelfile(lm_file: str, mmproj_file: str, eos: str, num_ctx: int) -> str:
    """Ollama: the two GGUF files, the trained prompt format (`{prompt}\\n`, BOS from the tokenizer), greedy."""
    return (
        "# ollama create cxr-report -f Modelfile && ollama run cxr-report\n"
        "# Prompt: the training prompt, e.g. datasets_io.records.prompt_a(): 'Image:<image>\\nAnswer Impression & "
        "CheXpert.'\n"
        f"FROM ./{lm_file}\n"
        f"FROM ./{mmproj_file}\n"
        'TEMPLATE """{{ .Prompt }}\n"""\n'
        "PARAMETER temperature 0\n"
        f"PARAMETER num_ctx {num_ctx}\n"
        f'PARAMETER stop "{eos}"\n'
    )


def export_gguf(merged: Any, out: str | Path, dtype: str = "auto", overwrite: bool = False) -> dict:
    """Write model-F.gguf, mmproj-model-F.gguf and a Modelfile to `out` (atomically). Returns the summary."""
    from training.export import EXPORT_INFO, finish, partial_dir, resolve_dtype

    require_gguf()
    dtype = resolve_dtype(dtype, merged.bundle.base_model_path)
    dtype = "fp16" if dtype == "bf16" else dtype  # GGUF f16 for a bf16 base (llama.cpp's default too)
    ftype = GGUF_DTYPES[dtype]
    out = Path(out)
    partial = partial_dir(out, overwrite)
    name = Path(merged.source.get("checkpoint") or merged.source.get("model_uri", "cxr")).name
    lm_file, mm_file = f"model-{ftype}.gguf", f"mmproj-model-{ftype}.gguf"
    model = merged.model
    lm = write_language_model(partial / lm_file, model, merged.tokenizer, ftype, name)
    mm = write_mmproj(partial / mm_file, model, merged.bundle.image_spec, ftype, name)
    num_ctx = model.config.text_config.max_position_embeddings
    (partial / "Modelfile").write_text(modelfile(lm_file, mm_file, merged.tokenizer.eos_token, num_ctx))
    summary = {
        "format": "gguf",
        "out": str(out),
        "dtype": dtype,
        **merged.source,
        "files": [lm_file, mm_file, "Modelfile", EXPORT_INFO],
        "tensors": {lm_file: len(lm), mm_file: len(mm)},
        "bytes": {lm_file: (partial / lm_file).stat().st_size, mm_file: (partial / mm_file).stat().st_size},
    }
    (partial / EXPORT_INFO).write_text(json.dumps(summary, indent=2) + "\n")
    finish(partial, out)
    return summary
