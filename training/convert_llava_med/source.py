"""Reading the original checkpoint: its config and the CLIP tower's (checked: every unsupported LLaVA setting is an
error naming it), its weight files, one tensor at a time, and its tokenizer."""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from datasets_io.errors import LauncherError
from training.convert_llava_med.safetensors_stream import SafetensorsFile


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
    cfg = read_source_config(src)
    vision_config = read_tower_config(vision_tower)
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
        select_strategy="default" if cfg.get("mm_vision_select_feature", "patch") == "patch" else "full",
        pad_to_square=cfg.get("image_aspect_ratio", "square") == "pad",
        tower_from_source=bool(cfg.get("unfreeze_mm_vision_tower", False)),
    )


def read_source_config(src: Path) -> dict:
    """The original config.json, refused unless it is a llava_mistral config with only supported settings."""
    cfg_path = src / "config.json"
    if not cfg_path.is_file():
        raise LauncherError(f"--src {src}: no config.json")
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("model_type") != "llava_mistral":
        raise LauncherError(
            f"--src {src}: model_type is {cfg.get('model_type')!r}, expected 'llava_mistral' (LLaVA-Med v1.5 "
            "Mistral in the LLaVA repository's format)"
        )
    problems = unsupported_settings(cfg)
    if problems:
        raise LauncherError(f"--src {src}/config.json: unsupported LLaVA settings: " + "; ".join(problems))
    return cfg


def unsupported_settings(cfg: dict) -> list[str]:
    """Every LLaVA setting of `cfg` this converter does not reproduce, as 'key=value (supported: ...)'."""
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
    return problems


def read_tower_config(vision_tower: Path):
    """The CLIPVisionConfig of the tower dir (a CLIPModel's vision half, or a CLIPVisionModel's config)."""
    from transformers import CLIPConfig, CLIPVisionConfig

    tower_cfg_path = vision_tower / "config.json"
    if not tower_cfg_path.is_file():
        raise LauncherError(f"--vision-tower {vision_tower}: no config.json (expected a CLIP model directory)")
    tower_type = json.loads(tower_cfg_path.read_text()).get("model_type")
    if tower_type == "clip":
        return CLIPConfig.from_pretrained(vision_tower).vision_config
    if tower_type == "clip_vision_model":
        return CLIPVisionConfig.from_pretrained(vision_tower)
    raise LauncherError(f"--vision-tower {vision_tower}: model_type {tower_type!r} is not a CLIP model")


# ---------------------------------------------------------------------------------------------------------------------
# Weights: one tensor at a time
# ---------------------------------------------------------------------------------------------------------------------


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
# Tokenizer
# ---------------------------------------------------------------------------------------------------------------------


def load_source_tokenizer(src: Path):
    from transformers import AutoTokenizer

    try:
        with quiet_transformers():  # it reads config.json too, and warns that llava_mistral is an unknown model type
            return AutoTokenizer.from_pretrained(src)
    except Exception as e:
        raise LauncherError(
            f"--src {src}: could not load its tokenizer ({type(e).__name__}: {str(e).strip().splitlines()[0]}). A "
            "tokenizer.model-only (SentencePiece) tokenizer needs `pip install sentencepiece` to be converted"
        ) from e


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
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
