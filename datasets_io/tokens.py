"""The token path: a (prompt, target) pair -> input_ids, attention_mask, labels for a LLaVA-style model.

    [prompt tokens ... <image> x N ... prompt tokens][target tokens ... EOS]
     labels = -100 on everything before the target;  labels = ids on the target and EOS
     prompt_labels (train.prompt_loss_weight > 0 only) = ids on the prompt's text, -100 on image tokens and the target

The `<image>` placeholder expands to the vision tower's number of image tokens (LLaVA splices one image feature into
each). Prompt and target are tokenized separately and concatenated, so the label mask is exact by construction (the
seed's "labels tokenized separately from the inputs" defect cannot happen: labels ARE the input ids, masked).
The tokenizer's chat template is used when it has one (Mistral-instruct for the real model).

The target is never cut: a sample over `max_len` has its Patient Data block shortened (datasets_io.ehr_fit, counted
as `shortened`) or is a bad record (OverBudgetError: file:line, its lengths, the budget). datasets_io.token_budget
runs `build_sample` on every record before the first step, so training never meets that error mid-run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal

from datasets_io.ehr_fit import shorten_prompt, with_ehr
from datasets_io.records import IMAGE_TOKEN, RecordError, ehr_from_prompt

IGNORE_INDEX = -100
Overlong = Literal["shorten_ehr", "error"]
OVERLONG_POLICIES: tuple[str, ...] = ("shorten_ehr", "error")


class OverBudgetError(RecordError):
    """A record that cannot fit `data.max_seq_len` without cutting its target: a bad record (file:line, lengths)."""

    def __init__(self, where: str, reason: str):
        super().__init__(where or "sample", "length", reason)


@dataclass
class TokenizedSample:
    input_ids: list[int]
    labels: list[int]
    shortened: bool = False
    """The Patient Data block was shortened to fit (datasets_io.ehr_fit); callers count these."""
    prompt_labels: list[int] | None = None
    """With a prompt loss: the prompt's own text ids as labels (`prompt_labels`), IGNORE_INDEX on the target."""

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


def prompt_labels(prompt_ids: list[int], image_token_id: int) -> list[int]:
    """A prompt's own ids as labels, except the image tokens (features, not text) and the first token (no token
    before it predicts it)."""
    return [IGNORE_INDEX] + [IGNORE_INDEX if t == image_token_id else t for t in prompt_ids[1:]]


def build_sample(
    tokenizer: Any,
    prompt: str,
    target: str,
    *,
    image_token_id: int,
    num_image_tokens: int,
    max_len: int,
    overlong: Overlong = "shorten_ehr",
    where: str = "",
    prompt_loss: bool = False,
) -> TokenizedSample:
    """One training sample; the whole target (and EOS) is always supervised, never cut; with `prompt_loss` the
    sample also carries the prompt's text tokens as `prompt_labels` (training.model.label_loss weighs their loss).

    Over `max_len`: with `overlong="shorten_ehr"` a Stage B prompt gets its Patient Data block shortened by the rule
    of datasets_io.ehr_fit (farthest measurements first, then low-priority fields) and the sample is marked
    `shortened`; a sample that does not fit even with the block emptied, a Stage A sample, or any over-long sample
    under `overlong="error"`, raises OverBudgetError naming `where` (file:line), its lengths and the budget.
    `budget_report` runs this on every record before the first step, so training never meets the error mid-run.
    """
    if overlong not in OVERLONG_POLICIES:
        raise ValueError(f"overlong={overlong!r}: expected one of {OVERLONG_POLICIES}")
    prompt_ids = encode_prompt(tokenizer, prompt, image_token_id, num_image_tokens)
    target_ids = encode_target(tokenizer, target)
    shortened = False
    if len(prompt_ids) + len(target_ids) > max_len:
        room = max_len - len(target_ids)
        encode = lambda p: encode_prompt(tokenizer, p, image_token_id, num_image_tokens)  # noqa: E731
        fitted = shorten_prompt(prompt, lambda p: len(encode(p)) <= room) if overlong == "shorten_ehr" else None
        if fitted is None:
            raise OverBudgetError(
                where, over_budget_reason(prompt, prompt_ids, target_ids, num_image_tokens, max_len, overlong, encode)
            )
        prompt_ids, shortened = encode(fitted[0]), True
    ignore_prompt, ignore_target = [IGNORE_INDEX] * len(prompt_ids), [IGNORE_INDEX] * len(target_ids)
    return TokenizedSample(
        prompt_ids + target_ids,
        ignore_prompt + target_ids,
        shortened,
        prompt_labels(prompt_ids, image_token_id) + ignore_target if prompt_loss else None,
    )


def over_budget_reason(
    prompt: str,
    prompt_ids: list[int],
    target_ids: list[int],
    num_image_tokens: int,
    max_len: int,
    overlong: str,
    encode: Callable[[str], list[int]],
) -> str:
    """The numbers of an over-budget sample (token counts only: no patient text)."""
    total = len(prompt_ids) + len(target_ids)
    text = (
        f"{total} tokens > data.max_seq_len={max_len} (prompt {len(prompt_ids)} incl. {num_image_tokens} image "
        f"tokens, target {len(target_ids)} incl. EOS)"
    )
    if ehr_from_prompt(prompt) is None:
        return text + "; a Stage A prompt has nothing to shorten: raise data.max_seq_len or shorten the target"
    emptied = len(encode(with_ehr(prompt, {}))) + len(target_ids)
    if overlong == "error":
        return text + f"; data.overlong=error (shorten_ehr would need {emptied} or fewer with the EHR emptied)"
    return text + f"; {emptied} even with the Patient Data block emptied: raise data.max_seq_len"


def pad_batch(samples: list[TokenizedSample], pad_id: int, side: Literal["right", "left"] = "right") -> dict:
    """Pad to the longest sample. Returns lists (callers make tensors): input_ids, attention_mask, labels, and
    prompt_labels when the samples carry them."""
    width = max(len(s.input_ids) for s in samples)
    with_prompt = samples[0].prompt_labels is not None
    out: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": []}
    if with_prompt:
        out["prompt_labels"] = []
    for s in samples:
        n = width - len(s.input_ids)
        fill = lambda seq, v: ([v] * n + seq) if side == "left" else (seq + [v] * n)  # noqa: E731
        out["input_ids"].append(fill(s.input_ids, pad_id))
        out["attention_mask"].append(fill(s.attention_mask, 0))
        out["labels"].append(fill(s.labels, IGNORE_INDEX))
        if with_prompt:
            out["prompt_labels"].append(fill(s.prompt_labels, IGNORE_INDEX))
    return out
