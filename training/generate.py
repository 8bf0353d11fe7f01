"""Batched greedy report generation for a trained LLaVA adapter bundle, and the parser of what comes out.

    bundle = load_trained("runs/tiny/checkpoints/final")
    texts = generate_reports(bundle, [(prompt, image_bytes), ...], batch_size=16, max_new_tokens=256)
    parsed = parse_report(texts[0], expect_icd=True)      # records.ParsedTarget; .valid False when malformed

Prompts are left padded, so every row's answer starts at the same position and greedy decoding of a batch gives
exactly the batch-size-1 output (tests/test_generate.py checks this). Only the NEW tokens are decoded, cut at the
first EOS. The same path serves `launcher evaluate`, `launcher predict` and the MLflow pyfunc model.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from tqdm import tqdm

from datasets_io.images import preprocess_image
from datasets_io.records import ParsedTarget, parse_target, prompt_a, prompt_b
from datasets_io.tokens import TokenizedSample, encode_prompt, pad_batch

# Without a config to say otherwise: the curriculum's longest Stage B target is ~200-300 tokens with the
# phrase-level tokenizer; plain BPE needs more.
DEFAULT_MAX_NEW_TOKENS = 384


def model_device(model: Any) -> torch.device:
    return next(model.parameters()).device


def model_dtype(model: Any) -> torch.dtype:
    return next(model.parameters()).dtype


def encode_batch(bundle: Any, prompts: Sequence[str], pixels: Sequence[np.ndarray]) -> dict[str, torch.Tensor]:
    """Left-padded prompt ids, attention mask and stacked pixel values for one generation batch."""
    samples = []
    for prompt in prompts:
        ids = encode_prompt(bundle.tokenizer, prompt, bundle.image_token_id, bundle.num_image_tokens)
        samples.append(TokenizedSample(ids, ids))
    padded = pad_batch(samples, bundle.tokenizer.pad_token_id, side="left")
    device, dtype = model_device(bundle.model), model_dtype(bundle.model)
    return {
        "input_ids": torch.tensor(padded["input_ids"], dtype=torch.long, device=device),  # (B, T)
        "attention_mask": torch.tensor(padded["attention_mask"], dtype=torch.long, device=device),  # (B, T)
        "pixel_values": torch.from_numpy(np.stack(pixels)).to(device=device, dtype=dtype),  # (B, 3, S, S)
    }


def decode_new_tokens(tokenizer: Any, new_ids: torch.Tensor) -> list[str]:
    """(B, N) generated ids -> texts, each cut at its first EOS (what follows is padding)."""
    eos, out = tokenizer.eos_token_id, []
    for row in new_ids.tolist():
        if eos in row:
            row = row[: row.index(eos)]
        out.append(tokenizer.decode(row, skip_special_tokens=True))
    return out


@torch.inference_mode()
def generate_batch(bundle: Any, prompts: Sequence[str], pixels: Sequence[np.ndarray], max_new_tokens: int) -> list[str]:
    """Greedy decoding of one batch; returns the decoded new tokens per row."""
    if len(prompts) != len(pixels):
        raise ValueError(f"{len(prompts)} prompts but {len(pixels)} images")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    batch = encode_batch(bundle, prompts, pixels)
    tok = bundle.tokenizer
    out = bundle.model.generate(
        **batch,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )  # (B, T + new): decoder-only generate returns the prompt too
    return decode_new_tokens(tok, out[:, batch["input_ids"].shape[1] :])


def generate_reports(
    bundle: Any,
    items: Sequence[tuple[str, bytes | np.ndarray]],
    *,
    batch_size: int = 16,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    progress: bool = False,
    desc: str = "generate",
) -> list[str]:
    """Generate for (prompt, image) items in order. An image is JPEG/PNG bytes or preprocessed (3, S, S) pixels."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    bundle.model.eval()
    texts: list[str] = []
    with tqdm(total=len(items), disable=not progress, unit="report", desc=desc, dynamic_ncols=True) as bar:
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            pixels = [im if isinstance(im, np.ndarray) else preprocess_image(im, bundle.image_spec) for _, im in chunk]
            texts += generate_batch(bundle, [p for p, _ in chunk], pixels, max_new_tokens)
            bar.update(len(chunk))
    return texts


def parse_report(text: str | None, expect_icd: bool) -> ParsedTarget:
    """What a generated report says (records.parse_target). Malformed output is `valid=False`, never an exception."""
    try:
        return parse_target(text if isinstance(text, str) else "", expect_icd=expect_icd)
    except Exception as e:  # noqa: BLE001 -- generated text is arbitrary; a parser bug must not stop an evaluation
        return ParsedTarget(problems=[f"unparseable output ({e.__class__.__name__})"])


def max_new_tokens_for(max_seq_len: int, prompt_len: int, floor: int = 16) -> int:
    """Room the model was trained with: data.max_seq_len minus the prompt (never below `floor`)."""
    return max(floor, max_seq_len - prompt_len)


# --------------------------------------------------------------------------------------------- single requests
def request_prompt(ehr: dict | None) -> str:
    """No EHR (None): the Stage A prompt (image only, no ICD). A dict, even `{}`: the Stage B prompt with it."""
    return prompt_a() if ehr is None else prompt_b(ehr)


def predict_reports(
    bundle: Any,
    requests: Sequence[tuple[bytes | np.ndarray, dict | None]],
    *,
    max_seq_len: int | None = None,
    max_new_tokens: int | None = None,
    batch_size: int = 8,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """(image, EHR dict or None) requests -> report text and parsed labels, for `predict` and the pyfunc. An image is
    JPEG/PNG bytes or already preprocessed (3, S, S) pixels (the pyfunc decodes while it checks its input).

    max_new_tokens defaults to max_seq_len (the checkpoint's data.max_seq_len) minus the longest prompt.
    """
    prompts = [request_prompt(ehr) for _, ehr in requests]
    if max_new_tokens is None:
        longest = max(
            len(encode_prompt(bundle.tokenizer, p, bundle.image_token_id, bundle.num_image_tokens))
            for p in set(prompts)
        )
        max_new_tokens = max_new_tokens_for(max_seq_len, longest) if max_seq_len else DEFAULT_MAX_NEW_TOKENS
    texts = generate_reports(
        bundle,
        list(zip(prompts, [im for im, _ in requests])),
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        progress=progress,
    )
    out = []
    for text, (_, ehr) in zip(texts, requests):
        parsed = parse_report(text, expect_icd=ehr is not None)
        out.append(
            {
                "report": text,
                "valid": parsed.valid,
                "problems": parsed.problems,
                "impression": parsed.impression,
                "chexpert": parsed.chexpert,
                "icd": parsed.icd,
            }
        )
    return out
