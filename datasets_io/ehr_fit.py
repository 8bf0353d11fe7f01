"""Shortening a Stage B prompt's Patient Data block until the sample fits `data.max_seq_len` (the target never is).

The rule (deterministic, documented in README "Token budget"): the block is rebuilt from a list of removal steps,
applied in this order until the prompt fits:

1. measurements, farthest in time from the study first: every entry of `Labs` and `Vitals` is one step, ordered by
   `hours_before` descending (an entry without `hours_before`, as in the seed's format, counts as farthest); ties go
   Labs before Vitals, and within a section the later-listed entry first;
2. whole fields, lowest priority first: `Vitals`, `Labs` (by then empty), `O2_device`, `Admission_type`,
   `Chronic_conditions`, any other field (last-listed first), then the demographics `Sex` and `Age`.

What survives keeps its order and values; the block stays `json.dumps(obj, indent=2)` (records.dump_block), down to
`{}` (the same emptied block as EHR dropout). The text outside the block is never touched.

    prompt, dropped = shorten_prompt(prompt, fits=lambda p: token_count(p) <= room)
"""

from __future__ import annotations

import math
from typing import Any, Callable

from datasets_io.records import PROMPT_B_TAIL, dump_block, ehr_from_prompt

PATIENT_DATA_HEAD = "Patient Data:\n"
MEASUREMENT_SECTIONS = ("Labs", "Vitals")
# Whole fields, dropped in this order once the measurements are gone; fields not listed go before the demographics.
FIELD_DROP_ORDER = ("Vitals", "Labs", "O2_device", "Admission_type", "Chronic_conditions")
DEMOGRAPHICS = ("Sex", "Age")

Step = tuple[str, str | None]  # (field, measurement name) or (field, None) for the whole field


def removal_steps(ehr: dict[str, Any]) -> list[Step]:
    """The removal order of README "Token budget": farthest measurements first, then fields by priority."""
    measurements = []
    for rank, section in enumerate(MEASUREMENT_SECTIONS):
        entries = ehr.get(section)
        if not isinstance(entries, dict):
            continue
        for pos, (name, entry) in enumerate(entries.items()):
            hours = entry.get("hours_before") if isinstance(entry, dict) else None
            far = float(hours) if isinstance(hours, (int, float)) and not isinstance(hours, bool) else math.inf
            measurements.append((-far, rank, -pos, section, name))
    steps: list[Step] = [(section, name) for *_, section, name in sorted(measurements)]
    others = [k for k in reversed(list(ehr)) if k not in FIELD_DROP_ORDER and k not in DEMOGRAPHICS]
    fields = [k for k in FIELD_DROP_ORDER if k in ehr] + others + [k for k in DEMOGRAPHICS if k in ehr]
    return steps + [(k, None) for k in fields]


def apply_steps(ehr: dict[str, Any], steps: list[Step]) -> dict[str, Any]:
    """A copy of `ehr` with `steps` removed (the input is not modified)."""
    whole = {f for f, name in steps if name is None}
    parts = {(f, name) for f, name in steps if name is not None}
    out: dict[str, Any] = {}
    for key, value in ehr.items():
        if key in whole:
            continue
        if key in MEASUREMENT_SECTIONS and isinstance(value, dict):
            value = {n: v for n, v in value.items() if (key, n) not in parts}
        out[key] = value
    return out


def with_ehr(prompt: str, ehr: dict[str, Any]) -> str:
    """`prompt` with its Patient Data block replaced by `ehr` (the text after the block is kept as is)."""
    return PATIENT_DATA_HEAD + dump_block(ehr) + prompt[prompt.rindex(PROMPT_B_TAIL) :]


def shorten_prompt(prompt: str, fits: Callable[[str], bool]) -> tuple[str, int] | None:
    """The longest prefix-of-the-rule shortening of `prompt` that `fits`: (prompt, steps removed), or None when even
    the emptied block does not fit (or the prompt has no Patient Data block).

    Binary search over the number of steps: prompt length falls as steps are removed, so ~log2(steps) calls of
    `fits` (each a tokenization) instead of one per measurement.
    """
    ehr = ehr_from_prompt(prompt)
    if ehr is None:
        return None
    steps = removal_steps(ehr)
    candidate = lambda k: with_ehr(prompt, apply_steps(ehr, steps[:k]))  # noqa: E731
    if not fits(candidate(len(steps))):
        return None
    lo, hi = 1, len(steps)  # invariant: candidate(hi) fits; the caller already knows candidate(0) does not
    while lo < hi:
        mid = (lo + hi) // 2
        if fits(candidate(mid)):
            hi = mid
        else:
            lo = mid + 1
    return candidate(hi), hi
