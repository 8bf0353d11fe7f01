"""LLaVA-Med v1.5 (the LLaVA repository's own `llava_mistral` checkpoint) -> a transformers
`LlavaForConditionalGeneration` directory, and the logit-match check that proves the conversion exact.

    launcher model convert-llava-med --src models/llava-med-v1.5-mistral-7b \\
        --vision-tower models/clip-vit-large-patch14-336 --out models/llava-med-v1.5-mistral-7b-hf --verify

What changes, and nothing else does (the names are the module names of transformers 5.24's LLaVA, so the output loads
with no key renaming; `convert()` checks every name and shape against a meta-device instance of that class):

    original (llava_mistral + the CLIP tower dir)        converted
    model.embed_tokens / model.layers.N.* / model.norm  model.language_model.embed_tokens / .layers.N.* / .norm
    lm_head.weight                                      lm_head.weight
    model.mm_projector.0.* / model.mm_projector.2.*     model.multi_modal_projector.linear_1.* / .linear_2.*
    CLIP dir: vision_model.* (CLIPModel) or unprefixed  model.vision_tower.*   (text tower, projections: dropped)

plus an `<image>` and a `<pad>` token: embed_tokens and lm_head gain rows initialised to the mean of the existing rows
(what LLaVA's own `initialize_vision_tokenizer` does for added tokens). The image token's embedding row is never used by
the model (those positions are overwritten by projected image features); it only has to exist.

Memory: tensors are streamed one at a time. The safetensors reader uses plain seek+read (no mmap, so the page cache is
not charged to this process) and the writer writes the header first, then each tensor's bytes, so peak memory is about
the largest single tensor (embed_tokens: 32000 x 4096 bf16 = 262 MB for the 7B), not a shard and never the model.
Each input shard becomes one output shard; the vision tower gets its own.

The output is written to `OUT.partial` and renamed to OUT only after it validated (and, with --verify, matched the
original's logits), so a failed run never leaves a directory that training would pick up.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import re
import shutil
import struct
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from datasets_io.errors import LauncherError

IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<pad>"
# The LLaVA repo's placeholder id for the image in a token list (llava/constants.py): the original tokenizer has no
# image token; `tokenizer_image_token` splits the prompt at "<image>" and puts -200 between the chunks.
ORIGINAL_IMAGE_TOKEN_INDEX = -200

# LLaVA-Med v1.5's conversation template `mistral_instruct` (llava/conversation.py): SeparatorStyle.LLAMA_2 with
# system="", sep="", sep2="</s>". A user turn is "[INST] {text} [/INST]", an assistant turn " {text} </s>", the image
# goes first in the user turn as "<image>\n", and a system prompt (empty in LLaVA-Med) is wrapped into the first user
# turn as "<<SYS>>\n{system}\n<</SYS>>\n\n". BOS is written by the template (apply_chat_template(tokenize=True)
# tokenizes with add_special_tokens=False); the original added it through the tokenizer. Content may be a string or the
# transformers list form [{"type": "image"}, {"type": "text", "text": ...}].
CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] if messages[0]['content'] is string "
    "else messages[0]['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('') -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set system = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{{- bos_token -}}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/... (an optional system first)') -}}"
    "{%- endif -%}"
    "{%- if message['content'] is string -%}{%- set text = message['content'] -%}"
    "{%- else -%}"
    "{%- set ns = namespace(text='') -%}"
    "{%- for part in message['content'] if part['type'] == 'image' -%}{%- set ns.text = ns.text + '<image>\\n' -%}"
    "{%- endfor -%}"
    "{%- for part in message['content'] if part['type'] == 'text' -%}{%- set ns.text = ns.text + part['text'] -%}"
    "{%- endfor -%}"
    "{%- set text = ns.text -%}"
    "{%- endif -%}"
    "{%- if message['role'] == 'user' -%}"
    "{%- if loop.index0 == 0 and system -%}{%- set text = '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' + text -%}"
    "{%- endif -%}"
    "{{- '[INST] ' + text + ' [/INST]' -}}"
    "{%- else -%}{{- ' ' + text + ' ' + eos_token -}}{%- endif -%}"
    "{%- endfor -%}"
)

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip
_ST_CODES = {v: k for k, v in _ST_DTYPES.items()}
OUT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ---------------------------------------------------------------------------------------------------------------------
# Reading: one tensor at a time
# ---------------------------------------------------------------------------------------------------------------------


class SafetensorsFile:
    """A safetensors file read one tensor at a time with seek+read (no mmap): memory is the tensor being read."""

    def __init__(self, path: Path):
        self.path = path
        self._f = open(path, "rb")
        try:
            (n,) = struct.unpack("<Q", self._f.read(8))
            header = json.loads(self._f.read(n))
        except (struct.error, ValueError) as e:
            self._f.close()
            raise LauncherError(f"{path}: not a readable safetensors file ({e})") from e
        header.pop("__metadata__", None)
        self._entries: dict[str, dict] = header
        self._data_start = 8 + n

    def keys(self) -> list[str]:
        return list(self._entries)

    def spec(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        e = self._entries[name]
        if e["dtype"] not in _ST_DTYPES:
            raise LauncherError(f"{self.path}: tensor {name} has unsupported dtype {e['dtype']}")
        return _ST_DTYPES[e["dtype"]], tuple(e["shape"])

    def read(self, name: str) -> torch.Tensor:
        dtype, shape = self.spec(name)
        begin, end = self._entries[name]["data_offsets"]
        buf = bytearray(end - begin)
        self._f.seek(self._data_start + begin)
        if self._f.readinto(buf) != len(buf):
            raise LauncherError(f"{self.path}: truncated file (tensor {name})")
        if not buf:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).reshape(shape)  # shares `buf`, no second copy

    def close(self) -> None:
        self._f.close()


class TorchBinFile:
    """A pytorch_model*.bin read with torch.load(weights_only=True): tensors only, no arbitrary pickled code.

    mmap=True keeps the file on disk (pages are read as tensors are touched); legacy non-zip files cannot be mapped and
    are loaded whole.
    """

    def __init__(self, path: Path):
        self.path = path
        try:
            try:
                sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # UnpicklingError and friends: say which file and why
            raise LauncherError(f"{path}: torch.load(weights_only=True) could not read it safely: {e}") from e
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise LauncherError(f"{path}: expected a flat dict of tensors (a state_dict)")
        self._sd: dict[str, torch.Tensor] = sd

    def keys(self) -> list[str]:
        return list(self._sd)

    def spec(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        t = self._sd[name]
        return t.dtype, tuple(t.shape)

    def read(self, name: str) -> torch.Tensor:
        return self._sd[name]

    def close(self) -> None:
        self._sd = {}


TensorFile = SafetensorsFile | TorchBinFile


def weight_files(directory: Path, allow_pickle: bool, what: str) -> list[Path]:
    """The weight files of a checkpoint directory, in index order. `.bin` files need `allow_pickle`."""
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):  # fmt: skip
        index = directory / index_name
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = [directory / f for f in dict.fromkeys(weight_map.values())]
        elif (directory / single).is_file():
            files = [directory / single]
        else:
            continue
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise LauncherError(f"{what} {directory}: index names files that are not there: {missing}")
        if files[0].suffix == ".bin" and not allow_pickle:
            raise LauncherError(
                f"{what} {directory} holds pickled .bin weights ({files[0].name}); pickles can run code when loaded. "
                "Pass --allow-pickle to read them with torch.load(weights_only=True) (tensors only), or convert them "
                "to safetensors first"
            )
        return sorted(files, key=lambda p: p.name)
    raise LauncherError(
        f"{what} {directory}: no model.safetensors(.index.json) or pytorch_model.bin(.index.json) found"
    )


def open_tensor_file(path: Path) -> TensorFile:
    return SafetensorsFile(path) if path.suffix == ".safetensors" else TorchBinFile(path)


# ---------------------------------------------------------------------------------------------------------------------
# Writing: header first, then each tensor's bytes
# ---------------------------------------------------------------------------------------------------------------------


class StreamingSafetensorsWriter:
    """Writes a safetensors file whose tensor list (names, dtypes, shapes) is known up front, one tensor at a time.

    `write(name, *parts)` writes the parts back to back (concatenated along dim 0) without building the concatenation:
    that is how embed_tokens gains its new rows without a second 262 MB copy.
    """

    def __init__(self, path: Path, specs: list[tuple[str, torch.dtype, tuple[int, ...]]]):
        header: dict[str, dict] = {}
        offset = 0
        for name, dtype, shape in specs:
            nbytes = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": _ST_CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        header["__metadata__"] = {"format": "pt"}  # transformers checks for it
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # the reference writer pads the header to 8 bytes; readers accept it
        self.path, self.nbytes = path, offset
        self._pending = [(n, d, s) for n, d, s in specs]
        self._f = open(path, "wb")
        self._f.write(struct.pack("<Q", len(blob)))
        self._f.write(blob)

    def write(self, name: str, *parts: torch.Tensor) -> None:
        exp_name, exp_dtype, exp_shape = self._pending.pop(0)
        rows = sum(p.shape[0] for p in parts) if parts[0].dim() else 1
        shape = (rows, *parts[0].shape[1:]) if parts[0].dim() else ()
        if name != exp_name or any(p.dtype != exp_dtype for p in parts) or shape != exp_shape:
            raise AssertionError(f"writer: got {name} {shape} {parts[0].dtype}, expected {exp_name} {exp_shape}")
        for p in parts:
            # (N,) uint8 view of the tensor's bytes: zero-copy for a contiguous tensor, works for bf16 too
            self._f.write(p.contiguous().reshape(-1).view(torch.uint8).numpy().data)

    def close(self) -> None:
        self._f.close()
        if self._pending:
            raise AssertionError(f"writer: {self.path} misses {len(self._pending)} tensors")


# ---------------------------------------------------------------------------------------------------------------------
# The plan: every output tensor, where it comes from, before a byte of data is read
# ---------------------------------------------------------------------------------------------------------------------

_LM_KEY = re.compile(r"^model\.(embed_tokens\.|layers\.\d+\.|norm\.)")
_PROJ_KEY = re.compile(r"^model\.mm_projector\.(0|2)\.(weight|bias)$")
_SRC_TOWER_PREFIX = "model.vision_tower.vision_tower.vision_model."  # LLaVA's CLIPVisionTower wrapper
_RESIZED = ("model.language_model.embed_tokens.weight", "lm_head.weight")


def rename_source_key(key: str, tower_from_source: bool) -> str | None:
    """Original LLaVA key -> converted key; None = not carried over; raises on a key it does not know."""
    if _LM_KEY.match(key):
        return "model.language_model." + key[len("model.") :]
    if key == "lm_head.weight":
        return key
    if m := _PROJ_KEY.match(key):
        return f"model.multi_modal_projector.linear_{1 if m.group(1) == '0' else 2}.{m.group(2)}"
    if key.startswith(_SRC_TOWER_PREFIX):
        return "model.vision_tower." + key[len(_SRC_TOWER_PREFIX) :] if tower_from_source else None
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


@dataclass
class SourceInfo:
    """What the conversion needs from the original config.json and the CLIP tower dir, validated."""

    src_config: dict
    vision_config: object  # CLIPVisionConfig
    select_layer: int
    select_strategy: str  # "default" (LLaVA "patch": drop CLS) or "full" ("cls_patch")
    pad_to_square: bool  # LLaVA image_aspect_ratio == "pad"
    tower_from_source: bool  # unfreeze_mm_vision_tower: the checkpoint's own tower weights are the ones used


def read_source_info(src: Path, vision_tower: Path) -> SourceInfo:
    """Read and check the original config and the tower config; every unsupported setting is an error naming it."""
    from transformers import CLIPConfig, CLIPVisionConfig

    cfg_path = src / "config.json"
    if not cfg_path.is_file():
        raise LauncherError(f"--src {src}: no config.json")
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("model_type") != "llava_mistral":
        raise LauncherError(
            f"--src {src}: model_type is {cfg.get('model_type')!r}, expected 'llava_mistral' (LLaVA-Med v1.5 "
            "Mistral in the LLaVA repository's format)"
        )
    problems = []
    expected = {"mm_projector_type": "mlp2x_gelu", "mm_use_im_start_end": False, "mm_use_im_patch_token": False}
    for key, want in expected.items():
        if cfg.get(key, want) != want:
            problems.append(f"{key}={cfg.get(key)!r} (supported: {want!r})")
    if cfg.get("mm_patch_merge_type", "flat") != "flat":
        problems.append(f"mm_patch_merge_type={cfg['mm_patch_merge_type']!r} (supported: 'flat')")
    feature = cfg.get("mm_vision_select_feature", "patch")
    if feature not in ("patch", "cls_patch"):
        problems.append(f"mm_vision_select_feature={feature!r} (supported: 'patch', 'cls_patch')")
    aspect = cfg.get("image_aspect_ratio", "square")
    if aspect not in ("pad", "square", None):
        problems.append(f"image_aspect_ratio={aspect!r} (supported: 'pad', 'square')")
    if cfg.get("rope_scaling"):
        problems.append(f"rope_scaling={cfg['rope_scaling']!r} (supported: none)")
    if cfg.get("tie_word_embeddings"):
        problems.append("tie_word_embeddings=true (supported: false)")
    if not isinstance(cfg.get("mm_vision_select_layer", -2), int):
        problems.append(f"mm_vision_select_layer={cfg['mm_vision_select_layer']!r} (supported: an int)")
    if problems:
        raise LauncherError(f"--src {src}/config.json: unsupported LLaVA settings: " + "; ".join(problems))

    tower_cfg_path = vision_tower / "config.json"
    if not tower_cfg_path.is_file():
        raise LauncherError(f"--vision-tower {vision_tower}: no config.json (expected a CLIP model directory)")
    tower_type = json.loads(tower_cfg_path.read_text()).get("model_type")
    if tower_type == "clip":
        vision_config = CLIPConfig.from_pretrained(vision_tower).vision_config
    elif tower_type == "clip_vision_model":
        vision_config = CLIPVisionConfig.from_pretrained(vision_tower)
    else:
        raise LauncherError(f"--vision-tower {vision_tower}: model_type {tower_type!r} is not a CLIP model")
    mm_hidden = cfg.get("mm_hidden_size")
    if mm_hidden is not None and mm_hidden != vision_config.hidden_size:
        raise LauncherError(
            f"--vision-tower {vision_tower}: hidden_size {vision_config.hidden_size} != the source's mm_hidden_size "
            f"{mm_hidden}: this is not the tower the projector was trained on ({cfg.get('mm_vision_tower')})"
        )
    return SourceInfo(
        src_config=cfg,
        vision_config=vision_config,
        select_layer=cfg.get("mm_vision_select_layer", -2),
        select_strategy="default" if feature == "patch" else "full",
        pad_to_square=aspect == "pad",
        tower_from_source=bool(cfg.get("unfreeze_mm_vision_tower", False)),
    )


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
    shards: list[list[OutputTensor]] = []
    notes: list[str] = []
    skipped_tower = 0
    new_rows = config.text_config.vocab_size - src_vocab
    all_files = [*src_files, *tower_files]
    for i, tf in enumerate(all_files):
        is_source = i < len(src_files)
        if not is_source and info.tower_from_source:
            continue  # unfreeze_mm_vision_tower: the checkpoint's own tower replaces the CLIP dir's weights
        shard = []
        for key in tf.keys():
            name = rename_source_key(key, info.tower_from_source) if is_source else rename_tower_key(key)
            if name is None:
                if is_source and key.startswith(_SRC_TOWER_PREFIX):
                    skipped_tower += 1
                continue
            shape = tf.spec(key)[1]
            if name in _RESIZED:
                shape = (shape[0] + new_rows, *shape[1:])
            shard.append(OutputTensor(name, i, key, shape))
        if shard:
            shards.append(shard)
    if skipped_tower:
        notes.append(
            f"ignored {skipped_tower} vision-tower tensors stored in the source checkpoint: with "
            "unfreeze_mm_vision_tower=false the original LLaVA code loads the tower from mm_vision_tower, as this does"
        )

    expected = expected_state_dict_specs(config)
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
    return ConversionPlan(files=paths, shards=shards, dtype=dtype, new_rows=new_rows, notes=notes)


def _mean_row(w: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Mean over rows in fp64, 1024 rows (32 MB at D=4096) at a time: no full-size copy of a (32000, 4096) matrix.
    Returns (1, D)."""
    acc = torch.zeros(w.shape[1:], dtype=torch.float64)
    for i in range(0, w.shape[0], chunk):
        acc += w[i : i + chunk].to(torch.float64).sum(0)
    return (acc / w.shape[0]).unsqueeze(0)


def write_shards(plan: ConversionPlan, files: list[TensorFile], out: Path, log: Callable[[str], None]) -> dict:
    """Stream every planned tensor into its output shard; returns the index json's content."""
    n = len(plan.shards)
    weight_map: dict[str, str] = {}
    total = 0
    for s, shard in enumerate(plan.shards, start=1):
        name = f"model-{s:05d}-of-{n:05d}.safetensors"
        t0 = time.perf_counter()
        writer = StreamingSafetensorsWriter(out / name, [(t.name, plan.dtype, t.shape) for t in shard])
        for t in shard:
            src = files[t.src_file].read(t.src_name)
            if t.name in _RESIZED and plan.new_rows:
                mean = _mean_row(src).to(plan.dtype).expand(plan.new_rows, -1)
                writer.write(t.name, src.to(plan.dtype), mean)
            else:
                writer.write(t.name, src.to(plan.dtype))
            del src
            weight_map[t.name] = name
        writer.close()
        total += writer.nbytes
        log(
            f"  {name}: {len(shard)} tensors, {writer.nbytes / 1e6:.1f} MB from "
            f"{plan.files[shard[0].src_file].name} ({time.perf_counter() - t0:.1f} s)"
        )
    return {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizer, image processor, processor
# ---------------------------------------------------------------------------------------------------------------------


def load_source_tokenizer(src: Path):
    from transformers import AutoTokenizer

    try:
        with _quiet_transformers():  # it reads config.json too, and warns that llava_mistral is an unknown model type
            return AutoTokenizer.from_pretrained(src)
    except Exception as e:
        raise LauncherError(
            f"--src {src}: could not load its tokenizer ({type(e).__name__}: {str(e).strip().splitlines()[0]}). A "
            "tokenizer.model-only (SentencePiece) tokenizer needs `pip install sentencepiece` to be converted"
        ) from e


def add_llava_tokens(tokenizer) -> tuple[int, int]:
    """Add `<image>` then `<pad>` (the llava-hf order). Returns (image_token_id, pad_token_id).

    `<pad>` replaces whatever pad the source tokenizer names: LLaVA's training script saves pad = `<unk>`, which would
    make padding indistinguishable from a real unknown token.
    """
    from transformers import AddedToken

    tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    return tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), tokenizer.pad_token_id


def image_processor_for(vision_tower: Path, vision_config, pad_to_square: bool):
    """The tower's CLIP preprocessing (its preprocessor_config.json, else CLIP's constants at the tower's image size) as
    transformers' PIL LLaVA image processor: do_pad=True is LLaVA's image_aspect_ratio="pad" (square with the mean
    colour, then CLIP's resize + centre crop). PIL backend: no torchvision. Returns (processor, note or None)."""
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    size = vision_config.image_size
    kwargs = dict(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
        resample=3,  # bicubic
        do_center_crop=True,
        do_convert_rgb=True,
    )
    note = None
    cfg_path = vision_tower / "preprocessor_config.json"
    if cfg_path.is_file():
        tower_cfg = json.loads(cfg_path.read_text())
        for key in ("size", "crop_size", "image_mean", "image_std", "resample", "do_center_crop", "rescale_factor"):
            if key in tower_cfg:
                kwargs[key] = tower_cfg[key]
        if isinstance(kwargs["size"], int):
            kwargs["size"] = {"shortest_edge": kwargs["size"]}
        if isinstance(kwargs["crop_size"], int):
            kwargs["crop_size"] = {"height": kwargs["crop_size"], "width": kwargs["crop_size"]}
    else:
        note = f"{vision_tower} has no preprocessor_config.json: wrote CLIP's mean/std at {size} px"
    return LlavaImageProcessorPil(do_pad=pad_to_square, **kwargs), note


# ---------------------------------------------------------------------------------------------------------------------
# convert()
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class ConversionResult:
    out: Path
    shards: int
    total_bytes: int
    dtype: str
    image_token_id: int
    pad_token_id: int
    vocab_size: int
    new_rows: int
    notes: list[str]
    verify: dict | None = None


def resolve_dtype(name: str, src_files: list[TensorFile]) -> torch.dtype:
    if name != "auto":
        return OUT_DTYPES[name]
    for tf in src_files:  # the storage dtype of the language model (bf16 for LLaVA-Med v1.5)
        for key in tf.keys():
            if _LM_KEY.match(key):
                return tf.spec(key)[0]
    raise LauncherError("source checkpoint has no language-model tensors (model.layers.*)")


def convert(
    src: Path,
    vision_tower: Path,
    out: Path,
    *,
    allow_pickle: bool = False,
    dtype: str = "auto",
    overwrite: bool = False,
    verify: bool = False,
    tolerance: float = 1e-4,
    verify_dtype: str = "fp32",
    verify_device: str = "cpu",
    verify_image: Path | None = None,
    log: Callable[[str], None] = print,
) -> ConversionResult:
    """Convert, write OUT.partial, optionally verify, then rename to OUT. Raises LauncherError on any problem."""
    src, vision_tower, out = Path(src), Path(vision_tower), Path(out)
    for flag, d in (("--src", src), ("--vision-tower", vision_tower)):
        if not d.is_dir():
            raise LauncherError(f"{flag} {d}: not a directory")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise LauncherError(f"--out {out} exists and is not empty: pass --overwrite or choose another directory")
    info = read_source_info(src, vision_tower)
    src_paths = weight_files(src, allow_pickle, "--src")
    tower_paths = [] if info.tower_from_source else weight_files(vision_tower, allow_pickle, "--vision-tower")

    partial = out.with_name(out.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    files: list[TensorFile] = []
    try:
        files = [open_tensor_file(p) for p in (*src_paths, *tower_paths)]
        src_files, tower_files = files[: len(src_paths)], files[len(src_paths) :]
        out_dtype = resolve_dtype(dtype, src_files)

        embed_key = next((k for f in src_files for k in f.keys() if k == "model.embed_tokens.weight"), None)
        if embed_key is None:
            raise LauncherError(f"--src {src}: no model.embed_tokens.weight in its weights")
        src_vocab = next(f.spec(embed_key)[1][0] for f in src_files if embed_key in f.keys())

        tokenizer = load_source_tokenizer(src)
        if len(tokenizer) > src_vocab:
            raise LauncherError(
                f"--src {src}: tokenizer has {len(tokenizer)} tokens but embed_tokens only {src_vocab} rows"
            )
        image_token_id, pad_token_id = add_llava_tokens(tokenizer)
        vocab_size = max(len(tokenizer), src_vocab)
        config = llava_config(info, vocab_size, image_token_id, pad_token_id, out_dtype)

        plan = build_plan(src_files, tower_files, [*src_paths, *tower_paths], info, config, out_dtype, src_vocab)
        for note in plan.notes:
            log(f"note: {note}")
        log(
            f"converting {src} + {vision_tower} -> {out} ({len(plan.shards)} shards, "
            f"{str(out_dtype).removeprefix('torch.')}, "
            f"vocab {src_vocab} -> {vocab_size}: {IMAGE_TOKEN}={image_token_id}, {PAD_TOKEN}={pad_token_id})"
        )
        index = write_shards(plan, files, partial, log)
        (partial / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        config.save_pretrained(partial)
        save_generation_config(src, partial, pad_token_id)
        notes = list(plan.notes)
        notes += save_processor(tokenizer, info, vision_tower, partial, src_config=info.src_config)
        result = ConversionResult(
            out=out, shards=len(plan.shards), total_bytes=index["metadata"]["total_size"],
            dtype=str(out_dtype).removeprefix("torch."), image_token_id=image_token_id, pad_token_id=pad_token_id,
            vocab_size=vocab_size, new_rows=plan.new_rows, notes=notes,
        )  # fmt: skip
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    finally:
        for f in files:
            f.close()
        del files
        gc.collect()

    if verify:
        try:
            report = verify_conversion(
                src, vision_tower, partial, tolerance=tolerance, dtype=verify_dtype, device=verify_device,
                image_path=verify_image, allow_pickle=allow_pickle, log=log,
            )  # fmt: skip
        except LauncherError as e:
            raise LauncherError(f"{e} (the unverified conversion is left in {partial} for inspection)") from e
        result.verify = asdict(report)
    provenance = {
        "converted_by": "launcher model convert-llava-med",
        "source": str(src.resolve()),
        "vision_tower": str(vision_tower.resolve()),
        "source_mm_vision_tower": info.src_config.get("mm_vision_tower"),
        **{k: v for k, v in asdict(result).items() if k != "out"},
    }
    (partial / "conversion.json").write_text(json.dumps(provenance, indent=2, default=str) + "\n")
    if out.exists():
        shutil.rmtree(out)
    partial.rename(out)
    return result


def save_generation_config(src: Path, out: Path, pad_token_id: int) -> None:
    from transformers import GenerationConfig

    if (src / "generation_config.json").is_file():
        gen = GenerationConfig.from_pretrained(src)
        gen.pad_token_id = pad_token_id
        gen.save_pretrained(out)


def save_processor(tokenizer, info: SourceInfo, vision_tower: Path, out: Path, src_config: dict) -> list[str]:
    """Tokenizer (+ chat template), image processor (preprocessor_config.json) and the LlavaProcessor tying them."""
    from transformers import LlavaProcessor

    notes = []
    image_processor, note = image_processor_for(vision_tower, info.vision_config, info.pad_to_square)
    if note:
        notes.append(note)
    if src_config.get("tokenizer_model_max_length"):
        tokenizer.model_max_length = src_config["tokenizer_model_max_length"]
    tokenizer.chat_template = CHAT_TEMPLATE
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=info.vision_config.patch_size,
        vision_feature_select_strategy=info.select_strategy,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,  # CLIP's CLS; "default" drops it again
        chat_template=CHAT_TEMPLATE,
    )
    processor.save_pretrained(out)
    tokenizer.save_pretrained(out)  # tokenizer_config.json with the chat template, for AutoTokenizer alone
    image_processor.save_pretrained(out)  # preprocessor_config.json, for AutoImageProcessor alone
    return notes


# ---------------------------------------------------------------------------------------------------------------------
# The original model, rebuilt (the reference for --verify)
# ---------------------------------------------------------------------------------------------------------------------


def original_llava_prompt(turns: list[tuple[str, str | None]], system: str = "") -> str:
    """LLaVA's Conversation.get_prompt() for SeparatorStyle.LLAMA_2 with conv_mistral_instruct's sep="", sep2="</s>".

    `turns` alternate (role, message) starting with the user; a None message is the open assistant turn.
    """
    sep, sep2 = "", "</s>"
    ret = ""
    for i, (_, message) in enumerate(turns):
        if message:
            if i == 0 and system:
                message = f"<<SYS>>\n{system}\n<</SYS>>\n\n" + message
            if i % 2 == 0:
                ret += sep + f"[INST] {message} [/INST]"
            else:
                ret += " " + message + " " + sep2
    return ret.lstrip(sep)  # lstrip("") strips nothing, as in the original


def tokenizer_image_token(prompt: str, tokenizer, image_token_index: int = ORIGINAL_IMAGE_TOKEN_INDEX) -> list[int]:
    """LLaVA's llava/mm_utils.py::tokenizer_image_token: tokenize the chunks around "<image>" separately (each with
    BOS, kept once) and put `image_token_index` between them."""
    prompt_chunks = [tokenizer(chunk).input_ids for chunk in prompt.split(IMAGE_TOKEN)]

    def insert_separator(x, sep):
        return [ele for sublist in zip(x, [sep] * len(x)) for ele in sublist][:-1]

    input_ids = []
    offset = 0
    if prompt_chunks and prompt_chunks[0] and prompt_chunks[0][0] == tokenizer.bos_token_id:
        offset = 1
        input_ids.append(prompt_chunks[0][0])
    for x in insert_separator(prompt_chunks, [image_token_index] * (offset + 1)):
        input_ids.extend(x[offset:])
    return input_ids


def expand2square(image, background_color):
    """LLaVA's expand2square (upstream LLaVA; LLaVA-Med adds a random 0-1 px jitter to the offset, left out here)."""
    from PIL import Image

    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    result = Image.new(image.mode, (side, side), background_color)
    result.paste(image, (0, (width - height) // 2) if width > height else ((height - width) // 2, 0))
    return result


def verification_image(path: Path | None):
    """The image both models see: the user's, or a fixed non-square RGB pattern (exercises the square padding)."""
    from PIL import Image

    if path is not None:
        return Image.open(path).convert("RGB")
    y, x = np.mgrid[0:300, 0:360].astype(np.float32)
    rng = np.random.default_rng(0)
    base = 128 + 80 * np.sin(x / 23.0) * np.cos(y / 31.0) + rng.normal(0, 20, size=(300, 360))
    rgb = np.stack([base, base * 0.9 + 10, base * 0.8 + 20], axis=-1)
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB")


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """from_pretrained prints a load report for every unexpected key (the reference loads skip the projector and the
    CLIP text half on purpose); this run checks the loading info itself instead."""
    from transformers.utils import logging as hf_logging

    before = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(before)
        hf_logging.enable_progress_bar()


def _read_source_tensors(src: Path, allow_pickle: bool, want: Callable[[str], bool]) -> dict[str, torch.Tensor]:
    """Tensors of the original checkpoint whose name passes `want`, read with the safetensors library / torch.load (not
    this module's reader, so the reference does not share the conversion's code path)."""
    from safetensors import safe_open

    found = {}
    for path in weight_files(src, allow_pickle, "--src"):
        if path.suffix == ".safetensors":
            with safe_open(path, framework="pt") as f:
                found.update({k: f.get_tensor(k) for k in f.keys() if want(k)})
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            found.update({k: v.clone() for k, v in sd.items() if want(k)})
            del sd
    return found


@dataclass
class VerifyReport:
    max_abs_diff: float  # over every position, original vocabulary columns
    max_abs_diff_text: float  # over the text positions only
    positions: int
    text_positions: int
    image_positions: int
    tolerance: float
    pixel_max_abs_diff: float
    chat_template_matches: bool
    processor_tokens_match: bool
    dtype: str
    seconds: float


def reference_logits(
    src: Path,
    vision_tower: Path,
    info: SourceInfo,
    input_ids: list[int],
    pixel_values: torch.Tensor,
    storage_dtype: torch.dtype,
    compute_dtype: torch.dtype,
    device: str,
    allow_pickle: bool,
) -> torch.Tensor:
    """The original LLaVA forward: MistralForCausalLM with the original weights, CLIPVisionModel from the tower dir, the
    projector by hand (Linear -> GELU -> Linear on layer `select_layer`'s patch features without CLS), its output
    spliced into the input embeddings where the -200 placeholder is, as prepare_inputs_labels_for_multimodal does.

    Weights are rounded to the converted checkpoint's storage dtype first (what the original runtime does when it
    casts the fp32 CLIP tower to the model dtype), so a difference means a conversion error, not a rounding choice.
    Returns logits (T, V_original) in fp32.
    """
    from transformers import CLIPVisionModel, MistralForCausalLM

    def as_used(t: torch.Tensor) -> torch.Tensor:
        return t.to(storage_dtype).to(compute_dtype).to(device)

    with _quiet_transformers():
        text_config = mistral_config(info.src_config, info.src_config["vocab_size"], None)
        proj = _read_source_tensors(src, allow_pickle, lambda k: k.startswith("model.mm_projector."))
        lm, lm_info = MistralForCausalLM.from_pretrained(
            src, config=text_config, dtype=compute_dtype, output_loading_info=True
        )
        if lm_info["missing_keys"] or lm_info["mismatched_keys"]:
            raise LauncherError(
                f"reference model: the original checkpoint did not fill MistralForCausalLM: missing "
                f"{sorted(lm_info['missing_keys'])[:5]}, mismatched {sorted(lm_info['mismatched_keys'])[:5]}"
            )
        tower, tower_info = CLIPVisionModel.from_pretrained(vision_tower, dtype=compute_dtype, output_loading_info=True)
        if tower_info["missing_keys"]:
            raise LauncherError(f"reference vision tower is missing {sorted(tower_info['missing_keys'])[:5]}")
        if info.tower_from_source:
            tower_sd = _read_source_tensors(src, allow_pickle, lambda k: k.startswith(_SRC_TOWER_PREFIX))
            tower.load_state_dict({k[len(_SRC_TOWER_PREFIX) :]: v for k, v in tower_sd.items()}, strict=True)
    for module in (lm, tower):
        for param in module.parameters():  # parameters only: buffers (rotary inv_freq) stay as computed at init
            param.data = param.data.to(storage_dtype).to(compute_dtype)
    lm, tower = lm.to(device).eval(), tower.to(device).eval()

    ids = torch.tensor(input_ids)
    (where,) = torch.nonzero(ids == ORIGINAL_IMAGE_TOKEN_INDEX, as_tuple=True)
    if len(where) != 1:
        raise LauncherError(f"verification prompt must hold exactly one image, got {len(where)}")
    p = int(where[0])
    with torch.no_grad():
        pixels = pixel_values.to(compute_dtype).to(device)  # (1, 3, S, S), as the converted model gets them
        hidden = tower(pixels, output_hidden_states=True).hidden_states[info.select_layer]  # (1, 1+N, C)
        feats = hidden[:, 1:] if info.select_strategy == "default" else hidden
        w0, b0, w2, b2 = (as_used(proj[f"model.mm_projector.{i}.{p}"]) for i in (0, 2) for p in ("weight", "bias"))
        feats = F.linear(F.gelu(F.linear(feats, w0, b0)), w2, b2)  # (1, N, D); nn.GELU() is the erf form
        embed = lm.get_input_embeddings()
        text = embed(torch.cat([ids[:p], ids[p + 1 :]]).to(device))  # (T-1, D): all text at once, then split
        inputs_embeds = torch.cat([text[:p], feats[0], text[p:]]).unsqueeze(0)  # (1, T-1+N, D)
        logits = lm(inputs_embeds=inputs_embeds).logits[0].float().cpu()
    del lm, tower
    gc.collect()
    return logits


def verify_conversion(
    src: Path,
    vision_tower: Path,
    converted: Path,
    *,
    tolerance: float = 1e-4,
    dtype: str = "fp32",
    device: str = "cpu",
    image_path: Path | None = None,
    allow_pickle: bool = False,
    question: str = "Describe the findings of this chest X-ray.",
    answer: str = "The lungs are clear. There is no pleural effusion or pneumothorax.",
    log: Callable[[str], None] = print,
) -> VerifyReport:
    """Run the original layout and the converted model on the same image and prompt; raise LauncherError if any logit
    differs by more than `tolerance` (or the converted model loads with missing or unexpected weights)."""
    from transformers import AutoImageProcessor, AutoProcessor, LlavaForConditionalGeneration

    t0 = time.perf_counter()
    compute_dtype = OUT_DTYPES[dtype]
    info = read_source_info(src, vision_tower)
    conv_config = json.loads((converted / "config.json").read_text())
    storage_dtype = getattr(torch, conv_config.get("dtype") or "float32")
    image_token_id = conv_config["image_token_index"]
    n_image = conv_config["image_seq_length"]

    # The prompt, both ways: LLaVA's template + tokenizer_image_token on the original tokenizer, and the converted
    # chat template. The logits are compared on one id sequence (the original's, image placeholder expanded).
    prompt = original_llava_prompt([("USER", f"{IMAGE_TOKEN}\n{question}"), ("ASSISTANT", answer)])
    original_tokenizer = load_source_tokenizer(src)
    original_ids = tokenizer_image_token(prompt, original_tokenizer)
    processor = AutoProcessor.from_pretrained(converted)
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
        {"role": "assistant", "content": [{"type": "text", "text": answer}]},
    ]
    rendered = processor.tokenizer.apply_chat_template(messages, tokenize=False)
    template_ok = rendered == (processor.tokenizer.bos_token or "") + prompt
    if not template_ok:
        raise LauncherError(f"converted chat template renders {rendered!r}, the original prompt is {prompt!r}")

    # The image, both ways: LLaVA's expand2square + the tower's CLIP processor, and the converted processor.
    image = verification_image(image_path)
    converted_inputs = processor(text=prompt, images=image, return_tensors="pt")
    pixel_values = converted_inputs["pixel_values"]  # (1, 3, S, S)
    if (vision_tower / "preprocessor_config.json").is_file():
        tower_processor = AutoImageProcessor.from_pretrained(vision_tower)
    else:
        tower_processor, _ = image_processor_for(vision_tower, info.vision_config, pad_to_square=False)
    original_image = image
    if info.pad_to_square:
        original_image = expand2square(image, tuple(int(x * 255) for x in tower_processor.image_mean))
    original_pixels = tower_processor(original_image, return_tensors="pt")["pixel_values"]
    pixel_diff = float((original_pixels - pixel_values).abs().max())

    expanded: list[int] = []
    for i in original_ids:
        expanded.extend([image_token_id] * n_image if i == ORIGINAL_IMAGE_TOKEN_INDEX else [i])
    processor_ids = converted_inputs["input_ids"][0].tolist()
    tokens_match = processor_ids == expanded
    if not tokens_match:
        log(
            "note: the converted processor tokenizes the prompt differently from LLaVA's tokenizer_image_token "
            f"({len(processor_ids)} vs {len(expanded)} ids; LLaVA tokenizes the text after <image> as a separate "
            "string). Logits are compared on LLaVA's ids."
        )

    log(f"verify: original layout ({len(expanded)} positions, {n_image} image, dtype {dtype}, device {device}) ...")
    ref = reference_logits(
        src, vision_tower, info, original_ids, original_pixels, storage_dtype, compute_dtype, device, allow_pickle
    )
    log("verify: converted model ...")
    with _quiet_transformers():
        model, load_info = LlavaForConditionalGeneration.from_pretrained(
            converted, dtype=compute_dtype, output_loading_info=True
        )
    bad = {k: sorted(v)[:5] for k, v in load_info.items() if k != "error_msgs" and v}
    if bad or load_info.get("error_msgs"):
        raise LauncherError(f"converted model does not load cleanly: {bad or load_info['error_msgs']}")
    model = model.to(device).eval()
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor([expanded], device=device), pixel_values=pixel_values.to(compute_dtype).to(device)
        )
    # (T, V_original): the two new tokens' columns have no counterpart in the original
    logits = out.logits[0].float().cpu()[:, : ref.shape[1]]
    del model, out
    gc.collect()

    if logits.shape != ref.shape:
        raise LauncherError(f"logit shapes differ: converted {tuple(logits.shape)}, original {tuple(ref.shape)}")
    diff = (logits - ref).abs()  # (T, V)
    is_text = torch.tensor([i != image_token_id for i in expanded])
    report = VerifyReport(
        max_abs_diff=float(diff.max()),
        max_abs_diff_text=float(diff[is_text].max()),
        positions=len(expanded),
        text_positions=int(is_text.sum()),
        image_positions=int((~is_text).sum()),
        tolerance=tolerance,
        pixel_max_abs_diff=pixel_diff,
        chat_template_matches=template_ok,
        processor_tokens_match=tokens_match,
        dtype=dtype,
        seconds=round(time.perf_counter() - t0, 1),
    )
    log(
        f"verify: max |logit difference| = {report.max_abs_diff:.3g} over {report.positions} positions "
        f"(text positions: {report.max_abs_diff_text:.3g}; tolerance {tolerance:g}; pixel difference "
        f"{pixel_diff:.3g}; logit scale {float(ref.abs().max()):.3g})"
    )
    if not math.isfinite(report.max_abs_diff) or report.max_abs_diff > tolerance:
        worst = int(diff.amax(dim=1).argmax())
        raise LauncherError(
            f"verification FAILED: max |logit difference| {report.max_abs_diff:.3g} > tolerance {tolerance:g} "
            f"(worst at position {worst} of {report.positions}, {'text' if is_text[worst] else 'image'})"
        )
    return report
