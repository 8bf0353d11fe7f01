"""Writing the weights: every planned tensor streamed from its source file into its output shard, in the output
dtype; embed_tokens and lm_head gain their new rows (the mean row) without a second copy of the matrix."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch

from training.convert_llava_med.plan import RESIZED_KEYS, ConversionPlan
from training.convert_llava_med.safetensors_stream import StreamingSafetensorsWriter
from training.convert_llava_med.source import TensorFile


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
            if t.name in RESIZED_KEYS and plan.new_rows:
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


def save_generation_config(src: Path, out: Path, pad_token_id: int) -> None:
    """The source's generation_config.json, if it has one, with the new pad token."""
    from transformers import GenerationConfig

    if (src / "generation_config.json").is_file():
        gen = GenerationConfig.from_pretrained(src)
        gen.pad_token_id = pad_token_id
        gen.save_pretrained(out)
