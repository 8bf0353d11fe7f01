"""Device resolution in one place: which accelerator a run, an evaluation or a prediction uses, and its dtype.

resolve_device("auto")          # cuda, then mps, then cpu
resolve_dtype("auto", "cuda")   # (torch.float32, "bf16"): fp32 weights, bf16 autocast
"""

from __future__ import annotations

import torch

from datasets_io.errors import LauncherError

DEVICES = ("auto", "cuda", "mps", "cpu")


def available_devices() -> list[str]:
    found = []
    if torch.cuda.is_available():
        found.append("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        found.append("mps")
    return found + ["cpu"]


def resolve_device(requested: str, available: list[str] | None = None) -> str:
    """auto -> cuda, then mps, then cpu. Asking for a device that is not there is an error, never a fallback."""
    available = available if available is not None else available_devices()
    if requested not in DEVICES:
        raise LauncherError(f"--device {requested!r}: choose one of {', '.join(DEVICES)}")
    if requested == "auto":
        return available[0]
    if requested not in available:
        raise LauncherError(
            f"--device {requested}: not available on this machine (available: {', '.join(available)}). "
            "Use --device auto to pick the best one."
        )
    return requested


def resolve_dtype(cfg_dtype: str, device: str) -> tuple[torch.dtype, str]:
    """(parameter dtype, Accelerate mixed_precision). Base weights stay fp32 on CPU; bf16 autocast on CUDA;
    fp16 autocast on MPS (bf16 is not supported by every MPS kernel)."""
    choice = cfg_dtype if cfg_dtype != "auto" else {"cuda": "bf16", "mps": "fp16", "cpu": "fp32"}[device]
    if device == "cpu" and choice == "fp16":
        raise LauncherError("model.dtype=fp16 is not supported on CPU; use fp32 or bf16")
    return torch.float32, {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[choice]
