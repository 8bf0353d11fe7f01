"""The token path: a (prompt, target) pair -> input_ids, attention_mask, labels for a LLaVA-style model.

    [prompt tokens ... <image> x N ... prompt tokens][target tokens ... EOS]
     labels = -100 on everything before the target;  labels = ids on the target and EOS

The `<image>` placeholder expands to the vision tower's number of image tokens (LLaVA splices one image feature into
each). Prompt and target are tokenized separately and concatenated, so the label mask is exact by construction (the
seed's "labels tokenized separately from the inputs" defect cannot happen: labels ARE the input ids, masked).
The tokenizer's chat template is used when it has one (Mistral-instruct for the real model).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from datasets_io.records import IMAGE_TOKEN

IGNORE_INDEX = -100


class OverlongError(ValueError):
    pass


@dataclass
class TokenizedSample:
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False

    @property
    def attention_mask(self) -> list[int]:
        return [1] * len(self.input_ids)


def prompt_text(tokenizer: Any, prompt: str) -> str:
    """The text the model sees before its answer: the chat template's user turn, or `prompt + newline`."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    bos = tokenizer.bos_token or ""
    return f"{bos}{prompt}\n"


def encode_prompt(tokenizer: Any, prompt: str, image_token_id: int, num_image_tokens: int) -> list[int]:
    """Prompt ids with the single `<image>` expanded to `num_image_tokens` copies of `image_token_id`."""
    text = prompt_text(tokenizer, prompt)
    if text.count(IMAGE_TOKEN) != 1:
        raise ValueError(f"prompt must contain exactly one {IMAGE_TOKEN}, found {text.count(IMAGE_TOKEN)}")
    before, after = text.split(IMAGE_TOKEN)
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"] if s else []  # noqa: E731
    return enc(before) + [image_token_id] * num_image_tokens + enc(after)


def encode_target(tokenizer: Any, target: str) -> list[int]:
    return tokenizer(target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def build_sample(
    tokenizer: Any,
    prompt: str,
    target: str,
    *,
    image_token_id: int,
    num_image_tokens: int,
    max_len: int,
    overlong: Literal["error", "truncate"] = "truncate",
    where: str = "",
) -> TokenizedSample:
    """One training sample. Overlong: `error` raises OverlongError naming `where`; `truncate` cuts the END of the
    target (so the start of the answer is never lost) and marks the sample truncated (callers count these)."""
    prompt_ids = encode_prompt(tokenizer, prompt, image_token_id, num_image_tokens)
    target_ids = encode_target(tokenizer, target)
    total = len(prompt_ids) + len(target_ids)
    truncated = False
    if total > max_len:
        room = max_len - len(prompt_ids)
        if overlong == "error" or room < 8:
            raise OverlongError(
                f"{where or 'sample'}: {total} tokens > data.max_seq_len={max_len} "
                f"(prompt {len(prompt_ids)}, target {len(target_ids)}); raise max_seq_len or use overlong=truncate"
            )
        target_ids, truncated = target_ids[:room], True
    return TokenizedSample(prompt_ids + target_ids, [IGNORE_INDEX] * len(prompt_ids) + target_ids, truncated)


def pad_batch(samples: list[TokenizedSample], pad_id: int, side: Literal["right", "left"] = "right") -> dict:
    """Pad to the longest sample. Returns lists (callers make tensors): input_ids, attention_mask, labels."""
    width = max(len(s.input_ids) for s in samples)
    out: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": []}
    for s in samples:
        n = width - len(s.input_ids)
        fill = lambda seq, v: ([v] * n + seq) if side == "left" else (seq + [v] * n)  # noqa: E731
        out["input_ids"].append(fill(s.input_ids, pad_id))
        out["attention_mask"].append(fill(s.attention_mask, 0))
        out["labels"].append(fill(s.labels, IGNORE_INDEX))
    return out
