"""The plan: every output tensor's name, shape and source file, and the LlavaConfig, made before a byte of weights is
read, and checked against the state dict transformers' LlavaForConditionalGeneration expects (a meta-device instance:
no memory)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from datasets_io.errors import LauncherError
from training.convert_llava_med.source import SourceInfo, TensorFile

OUT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_LM_KEY = re.compile(r"^model\.(embed_tokens\.|layers\.\d+\.|norm\.)")
_PROJ_KEY = re.compile(r"^model\.mm_projector\.(0|2)\.(weight|bias)$")
SRC_TOWER_PREFIX = "model.vision_tower.vision_tower.vision_model."  # LLaVA's CLIPVisionTower wrapper
RESIZED_KEYS = ("model.language_model.embed_tokens.weight", "lm_head.weight")


def rename_source_key(key: str, tower_from_source: bool) -> str | None:
    """Original LLaVA key -> converted key; None = not carried over; raises on a key it does not know."""
    if _LM_KEY.match(key):
        return "model.language_model." + key[len("model.") :]
    if key == "lm_head.weight":
        return key
    if m := _PROJ_KEY.match(key):
        return f"model.multi_modal_projector.linear_{1 if m.group(1) == '0' else 2}.{m.group(2)}"
    if key.startswith(SRC_TOWER_PREFIX):
        return "model.vision_tower." + key[len(SRC_TOWER_PREFIX) :] if tower_from_source else None
    if key.endswith("rotary_emb.inv_freq") or key.endswith("embeddings.position_ids"):
        return None  # buffers recomputed at load time (old checkpoints saved them)
    raise LauncherError(f"source checkpoint has a key this converter does not know: {key!r}")


def rename_tower_key(key: str) -> str | None:
    """CLIP dir key (a CLIPModel's `vision_model.*`, or a transformers-5 CLIPVisionModel's unprefixed keys) -> converted;
    None = not carried over."""
    if key.startswith(("text_model.", "visual_projection.", "text_projection.")) or key == "logit_scale":
        return None  # the CLIP text half: LLaVA uses only the image encoder
    key = key.removeprefix("vision_model.")
    if key.endswith("embeddings.position_ids"):
        return None
    return "model.vision_tower." + key


@dataclass
class OutputTensor:
    name: str
    src_file: int  # index into ConversionPlan.files
    src_name: str
    shape: tuple[int, ...]  # output shape (rows added for the resized embeddings)


@dataclass
class ConversionPlan:
    files: list[Path]  # source shards, then vision tower files
    shards: list[list[OutputTensor]]  # one output shard per file that contributes tensors
    dtype: torch.dtype
    new_rows: int  # rows appended to embed_tokens and lm_head
    notes: list[str] = field(default_factory=list)


_MISTRAL_FIELDS = (
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
    "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps", "rope_theta", "sliding_window",
    "attention_dropout", "bos_token_id", "eos_token_id",
)  # fmt: skip


def mistral_config(src_config: dict, vocab_size: int, pad_token_id: int | None):
    """The text model's MistralConfig from the original config (its llava-only mm_* fields dropped)."""
    from transformers import MistralConfig

    kwargs = {k: src_config[k] for k in _MISTRAL_FIELDS if k in src_config}
    return MistralConfig(**kwargs, vocab_size=vocab_size, pad_token_id=pad_token_id, tie_word_embeddings=False)


def image_seq_length(vision_config, select_strategy: str) -> int:
    """Image positions in the prompt: one per patch, plus CLS for "full". (336 / 14)^2 = 576 for CLIP-L/336."""
    n = (vision_config.image_size // vision_config.patch_size) ** 2
    return n + (1 if select_strategy == "full" else 0)


def llava_config(info: SourceInfo, vocab_size: int, image_token_id: int, pad_token_id: int, dtype: torch.dtype):
    """The converted model's LlavaConfig: the CLIP tower's config, the Mistral text config at the grown vocabulary, and
    LLaVA's projector (GELU, with bias) and feature selection."""
    from transformers import LlavaConfig

    config = LlavaConfig(
        vision_config=info.vision_config,
        text_config=mistral_config(info.src_config, vocab_size, pad_token_id),
        image_token_index=image_token_id,
        image_seq_length=image_seq_length(info.vision_config, info.select_strategy),
        projector_hidden_act="gelu",  # LLaVA's mlp2x_gelu is nn.GELU(): exact erf GELU, as is transformers' "gelu"
        vision_feature_select_strategy=info.select_strategy,
        vision_feature_layer=info.select_layer,
        multimodal_projector_bias=True,
        tie_word_embeddings=False,
    )
    config.architectures = ["LlavaForConditionalGeneration"]
    config.dtype = dtype
    return config


def expected_state_dict_specs(config) -> dict[str, tuple[int, ...]]:
    """Names and shapes of LlavaForConditionalGeneration(config) as transformers builds it (meta device: no memory)."""
    from transformers import LlavaForConditionalGeneration

    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def build_plan(
    src_files: list[TensorFile],
    tower_files: list[TensorFile],
    paths: list[Path],
    info: SourceInfo,
    config,
    dtype: torch.dtype,
    src_vocab: int,
) -> ConversionPlan:
    """Map every source tensor to its output name; check the result is exactly the state dict transformers expects."""
    new_rows = config.text_config.vocab_size - src_vocab
    shards, notes = planned_shards(src_files, tower_files, info, new_rows)
    check_against_llava(shards, expected_state_dict_specs(config), info)
    return ConversionPlan(files=paths, shards=shards, dtype=dtype, new_rows=new_rows, notes=notes)


def planned_shards(
    src_files: list[TensorFile], tower_files: list[TensorFile], info: SourceInfo, new_rows: int
) -> tuple[list[list[OutputTensor]], list[str]]:
    """(one output shard per file that contributes tensors, notes): each kept tensor renamed, its output shape (rows
    added to the resized embeddings) and where it comes from."""
    shards: list[list[OutputTensor]] = []
    notes: list[str] = []
    skipped_tower = 0
    for i, tf in enumerate([*src_files, *tower_files]):
        is_source = i < len(src_files)
        if not is_source and info.tower_from_source:
            continue  # unfreeze_mm_vision_tower: the checkpoint's own tower replaces the CLIP dir's weights
        shard = []
        for key in tf.keys():
            name = rename_source_key(key, info.tower_from_source) if is_source else rename_tower_key(key)
            if name is None:
                if is_source and key.startswith(SRC_TOWER_PREFIX):
                    skipped_tower += 1
                continue
            shape = tf.spec(key)[1]
            if name in RESIZED_KEYS:
                shape = (shape[0] + new_rows, *shape[1:])
            shard.append(OutputTensor(name, i, key, shape))
        if shard:
            shards.append(shard)
    if skipped_tower:
        notes.append(
            f"ignored {skipped_tower} vision-tower tensors stored in the source checkpoint: with "
            "unfreeze_mm_vision_tower=false the original LLaVA code loads the tower from mm_vision_tower, as this does"
        )
    return shards, notes


def check_against_llava(
    shards: list[list[OutputTensor]], expected: dict[str, tuple[int, ...]], info: SourceInfo
) -> None:
    """Raise naming every missing, unexpected, wrongly shaped or duplicated output tensor (the first five of each)."""
    got: dict[str, tuple[int, ...]] = {}
    duplicates = []
    for t in (t for shard in shards for t in shard):
        if t.name in got:
            duplicates.append(t.name)
        got[t.name] = t.shape
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    wrong = sorted(f"{k}: {got[k]} (expected {expected[k]})" for k in set(got) & set(expected) if got[k] != expected[k])
    if missing or unexpected or wrong or duplicates:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong),
                             ("duplicated", duplicates)):  # fmt: skip
            if items:
                parts.append(f"{len(items)} {label}: {', '.join(items[:5])}{' ...' if len(items) > 5 else ''}")
        where = "the source shards" + ("" if info.tower_from_source else " and the --vision-tower dir")
        raise LauncherError(
            f"converted weights would not match LlavaForConditionalGeneration ({where}): " + "; ".join(parts)
        )


def resolve_dtype(name: str, src_files: list[TensorFile]) -> torch.dtype:
    """The output's storage dtype: `name` from OUT_DTYPES, or for "auto" the source language model's."""
    if name != "auto":
        return OUT_DTYPES[name]
    for tf in src_files:  # the storage dtype of the language model (bf16 for LLaVA-Med v1.5)
        for key in tf.keys():
            if _LM_KEY.match(key):
                return tf.spec(key)[0]
    raise LauncherError("source checkpoint has no language-model tensors (model.layers.*)")
