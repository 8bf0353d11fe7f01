"""The model side of packing (datasets_io/packing.py lays the rows out): forward inputs per attention backend, and
per-sample losses for padded and packed batches alike.

Attention stays inside each sample through the restarting `position_ids` alone, with no 2D attention mask and no KV
cache (`use_cache=False`: transformers only looks for packed sequences when there is no cache):
- sdpa / eager / flex_attention: transformers builds the block-diagonal causal 4D mask from them
  (masking_utils.find_packed_sequence_indices + packed_sequence_mask_function); cost O(R * W^2) booleans per layer
  call, like the padded batch's causal mask;
- flash_attention_2 / 3: transformers takes FlashAttention's variable-length path (cu_seqlens from the position ids)
  only for a batch of ONE row, so the rows are flattened here to one row of the real tokens, padding dropped: no
  mask is materialised and no padding computed (padding efficiency 1.0).
- packed_sdpa (this module's `packed_sdpa_attention`, registered with transformers by `register_packed_sdpa`): the
  same padding-free row for devices without FlashAttention (CPU, MPS): torch's SDPA on each sample's tokens alone,
  so attention costs sum(L_i^2), not rows x W^2, and no mask is built. torch has no variable-length attention kernel
  for them (torch.nn.attention.varlen is FlashAttention on CUDA; nested tensors refuse causal SDPA), so the samples
  are a loop of transformers' own sdpa_attention_forward calls, one per sample and layer.

A packed batch planned for several forward passes (`forwards`, train.packing_forwards) is cut into them by
`forward_passes`: each pass its rows at its own width, with its samples' images; the loss sums over all passes
before the one backward (training.model.label_loss).
"""

from __future__ import annotations

from typing import Any

import torch

from datasets_io.packing import NON_MODEL_KEYS, PACKED_SDPA, computed_tokens, padding_free
from datasets_io.tokens import IGNORE_INDEX


def packed_sdpa_attention(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function `packed_sdpa`: where a row carries samples one after another (position ids
    restarting at 0, no padding mask, no KV cache), causal SDPA on each sample alone; anything else (a padding mask,
    a decoding step, the vision tower) is plain sdpa. Output (B, T, heads, head_dim), like sdpa_attention_forward."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    position_ids = kwargs.get("position_ids")
    whole_rows = query.shape[2] == key.shape[2] > 1  # every token's keys are in the row: no KV cache, not decoding
    if attention_mask is not None or position_ids is None or not whole_rows:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )

    def one_sample(b: int, start: int, end: int) -> torch.Tensor:  # (1, end - start, heads, head_dim)
        q, k, v = (t[b : b + 1, :, start:end] for t in (query, key, value))
        return sdpa_attention_forward(module, q, k, v, None, dropout=dropout, scaling=scaling, is_causal=True)[0]

    window = kwargs.get("sliding_window")
    rows = []
    for b, pos in enumerate(position_ids.expand(query.shape[0], -1)):
        starts = [0, *((pos[1:] == 0).nonzero().flatten() + 1).tolist()]  # the host reads them: once per row and layer
        bounds = list(zip(starts, starts[1:] + [pos.numel()]))
        longest = max(end - start for start, end in bounds)
        if window is not None and longest > window:
            raise ValueError(
                f"packed_sdpa: a sample of {longest} tokens is longer than the model's sliding window ({window}); "
                "use model.attn_implementation sdpa"
            )
        rows.append(torch.cat([one_sample(b, start, end) for start, end in bounds], dim=1))
    return torch.cat(rows), None


def packed_sdpa_mask(attention_mask: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor | None:
    """transformers mask function of `packed_sdpa`: none without a padding mask (the attention function finds the
    samples in the position ids), sdpa's mask with one (batched generation)."""
    from transformers.masking_utils import sdpa_mask

    return None if attention_mask is None else sdpa_mask(attention_mask=attention_mask, **kwargs)


def register_packed_sdpa() -> None:
    """Make `model.attn_implementation: packed_sdpa` loadable (training.model.load_base calls this first)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention)
    AttentionMaskInterface.register(PACKED_SDPA, packed_sdpa_mask)


def attn_implementation(model: Any) -> str:
    """The language model's attention backend of a (Peft / DeepSpeed wrapped) LLaVA. A DeepSpeed engine's own
    `config` is its JSON dict, so the wrapped module's model config is looked at first."""
    for candidate in (getattr(model, "module", None), model):
        config = getattr(candidate, "config", None)
        text = getattr(config, "text_config", None) or config
        if hasattr(text, "_attn_implementation"):
            return str(text._attn_implementation or "sdpa")
    raise ValueError(f"cannot find the attention implementation of {type(model).__name__}")


def padding_free_backend(model: Any) -> bool:
    """FlashAttention: packed rows reach it as one row of the real tokens (model_layout), so it computes no padding."""
    return padding_free(attn_implementation(model))


def to_device(batch: dict[str, torch.Tensor], device: Any) -> dict[str, torch.Tensor]:
    """The micro-batch on `device`, except the pass plan (`forwards`): forward_passes reads it on the host, and
    reading a CUDA tensor there would wait for the previous micro-batch's kernels every time."""
    return {k: v if k == "forwards" else v.to(device, non_blocking=True) for k, v in batch.items()}


def forward_passes(batch: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """The micro-batch as the forward passes it is computed in: one, the batch itself, unless it is packed rows
    planned for several (`forwards`: rows, width, samples of each, in row order); then each pass gets its run of rows
    cut to its width, and its samples' `pixel_values` (stacked in row order). Per-token keys are those shaped like
    `input_ids`; `segment_ids` keep the micro-batch's sample indices, so per-sample sums need no remapping."""
    plan = batch.get("forwards")
    if plan is None or len(plan) <= 1:
        return [batch]
    shape = batch["input_ids"].shape
    parts, row, image = [], 0, 0
    for rows, width, samples in plan.tolist():
        part = {}
        for k, v in batch.items():
            if k == "pixel_values":
                part[k] = v[image : image + samples]
            elif torch.is_tensor(v) and v.shape[:2] == shape:
                part[k] = v[row : row + rows, :width]
            elif k != "forwards":
                part[k] = v
        parts.append(part)
        row, image = row + rows, image + samples
    return parts


def model_layout(model: Any, batch: dict[str, torch.Tensor]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(forward() arguments, per-token tensors: `labels`, `prompt_labels` when the batch has them, `owner` = sample
    ids) in the layout fed to the model. Bookkeeping keys are dropped; for FlashAttention the packed rows become one
    row without their padding, (R, W) -> (1, real tokens): its variable-length path computes on real tokens only."""
    inputs: dict[str, Any] = {k: v for k, v in batch.items() if k not in NON_MODEL_KEYS}
    inputs["use_cache"] = False  # training needs no KV cache, and with one transformers ignores packed position ids
    tokens = {k: batch[k] for k in ("labels", "prompt_labels") if k in batch} | {"owner": sample_ids(batch)}
    if "segment_ids" in batch and padding_free_backend(model):
        real = batch["segment_ids"].reshape(-1) >= 0  # (R*W,)
        flat = lambda t: t.reshape(-1)[real][None]  # noqa: E731  (R, W) -> (1, real tokens)
        inputs["input_ids"], inputs["position_ids"] = flat(inputs["input_ids"]), flat(inputs["position_ids"])
        tokens = {k: flat(v) for k, v in tokens.items()}
    return inputs, tokens


def token_counts(batch: dict[str, torch.Tensor], padding_free: bool = False) -> tuple[int, int]:
    """(real tokens, tokens the model computes on) of a padded or packed micro-batch: rows x width of each forward
    pass, or the real tokens alone for the one padding-free row FlashAttention gets from packed rows
    (`padding_free`: padding_free_backend)."""
    real = int((batch["segment_ids"] >= 0).sum()) if "segment_ids" in batch else int(batch["attention_mask"].sum())
    if padding_free and "segment_ids" in batch:
        return real, real
    return real, computed_tokens(batch["forwards"]) if "forwards" in batch else batch["input_ids"].numel()


def sample_ids(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(R, W) index of the micro-batch sample each token belongs to: `segment_ids` when packed, the row when padded."""
    if "segment_ids" in batch:
        return batch["segment_ids"]
    rows = torch.arange(batch["input_ids"].shape[0], device=batch["input_ids"].device)
    return rows[:, None].expand_as(batch["input_ids"])


def per_sample_losses(model: Any, batch: dict[str, torch.Tensor], key: str = "labels") -> torch.Tensor:
    """(B,) mean next-token cross-entropy of each sample over its own label tokens (`key`: the target's `labels`, or
    `prompt_labels`), in micro-batch sample order (NaN for a sample without labels). Full logits: for tests and
    benchmarks, not the training step; packed rows in their forward passes, like the training step)."""
    n = int(batch["pixel_values"].shape[0])
    total = count = torch.zeros(n, dtype=torch.float32)
    for part in forward_passes(batch):
        inputs, tokens = model_layout(model, part)
        logits = model(**inputs).logits.float()  # (R, W, V)
        labels, owner = tokens[key][:, 1:], tokens["owner"][:, 1:]  # position t predicts token t+1
        per_token = torch.nn.functional.cross_entropy(
            logits[:, :-1].transpose(1, 2), labels.clamp(min=0), reduction="none"
        )  # (R, W-1)
        has = labels != IGNORE_INDEX
        total = total.to(per_token.device).index_add(0, owner[has], per_token[has])
        count = count.to(per_token.device).index_add(0, owner[has], torch.ones_like(per_token[has]))
    return total / count
