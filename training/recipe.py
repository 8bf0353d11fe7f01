"""What both runtimes do the same way to prepare a run (the runtimes differ only in engine, rank slice, tracker on
rank 0 and checkpoint reporting): the model they train, built in one order.

    bundle = build_lora_model(cfg, base_path, dtype="fp32")     # launcher/local.py and every Ray worker
"""

from __future__ import annotations

from typing import Any


def build_lora_model(cfg: Any, base_path: str, dtype: str = "fp32") -> Any:
    """Load the base, re-seed, add LoRA. Re-seeding between loading the base and adding LoRA makes the LoRA A init
    independent of how the base was obtained (built here, loaded from disk, or ZeRO-3's partitioned loading, which
    consumes the RNG differently), so the local runtime and every ZeRO stage start from the same weights. The base
    loads in the training dtype (a 7B in fp32 would be 28 GB of host memory per worker)."""
    import torch

    from training.model import apply_lora, bundle_for, load_base

    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    base, tokenizer = load_base(base_path, torch_dtype)
    torch.manual_seed(cfg.train.seed)
    return bundle_for(apply_lora(cfg, base), tokenizer, base_path)
