"""`convert()`: the original checkpoint -> OUT.partial (weights, config, generation config, tokenizer, processor),
optionally verified against the original layout's logits, then renamed to OUT.

    launcher model convert-llava-med --src models/llava-med-v1.5-mistral-7b \\
        --vision-tower models/clip-vit-large-patch14-336 --out models/llava-med-v1.5-mistral-7b-hf --verify
"""

from __future__ import annotations

import gc
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from datasets_io.errors import LauncherError
from training.convert_llava_med.plan import build_plan, llava_config, resolve_dtype
from training.convert_llava_med.processor import IMAGE_TOKEN, PAD_TOKEN, add_llava_tokens, save_processor
from training.convert_llava_med.source import (
    SourceInfo,
    TensorFile,
    load_source_tokenizer,
    open_tensor_file,
    read_source_info,
    weight_files,
)
from training.convert_llava_med.verify import verify_conversion
from training.convert_llava_med.writing import save_generation_config, write_shards


@dataclass
class ConversionResult:
    """What a conversion wrote (also in OUT/conversion.json, with the --verify report)."""

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
    check_paths(src, vision_tower, out, overwrite)
    info = read_source_info(src, vision_tower)
    src_paths = weight_files(src, allow_pickle, "--src")
    tower_paths = [] if info.tower_from_source else weight_files(vision_tower, allow_pickle, "--vision-tower")

    partial = out.with_name(out.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    result = write_converted(src, vision_tower, info, src_paths, tower_paths, dtype, partial, out, log)
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


def check_paths(src: Path, vision_tower: Path, out: Path, overwrite: bool) -> None:
    """Both inputs are directories; OUT is absent or empty unless `overwrite`."""
    for flag, d in (("--src", src), ("--vision-tower", vision_tower)):
        if not d.is_dir():
            raise LauncherError(f"{flag} {d}: not a directory")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise LauncherError(f"--out {out} exists and is not empty: pass --overwrite or choose another directory")


def write_converted(
    src: Path,
    vision_tower: Path,
    info: SourceInfo,
    src_paths: list[Path],
    tower_paths: list[Path],
    dtype: str,
    partial: Path,
    out: Path,
    log: Callable[[str], None],
) -> ConversionResult:
    """Everything of the converted directory into `partial`: the weights (planned, then streamed), config.json, the
    generation config, tokenizer and processor. On any error `partial` is removed; the source files are closed (and
    their memory released) either way."""
    files: list[TensorFile] = []
    try:
        files = [open_tensor_file(p) for p in (*src_paths, *tower_paths)]
        src_files, tower_files = files[: len(src_paths)], files[len(src_paths) :]
        out_dtype = resolve_dtype(dtype, src_files)
        src_vocab = source_vocab_size(src, src_files)
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
        notes = list(plan.notes) + save_processor(tokenizer, info, vision_tower, partial)
        return ConversionResult(
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


def source_vocab_size(src: Path, src_files: list[TensorFile]) -> int:
    """Rows of the source's model.embed_tokens.weight."""
    embed_key = next((k for f in src_files for k in f.keys() if k == "model.embed_tokens.weight"), None)
    if embed_key is None:
        raise LauncherError(f"--src {src}: no model.embed_tokens.weight in its weights")
    return next(f.spec(embed_key)[1][0] for f in src_files if embed_key in f.keys())
