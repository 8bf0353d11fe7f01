"""The token budget, measured on every record before the first step: lengths, shortened rows, rows that cannot fit.

    report = budget_report(records, tokenizer, image_token_id, num_image_tokens, max_len=2048)
    print("\\n".join(report.lines()))
    kept = apply_bad_records_policy(records, report, policy="skip", source="train")   # or "error": LauncherError

A row's length is prompt + image tokens + target + EOS, unshortened (what `max_seq_len` would need for the row to
need no shortening). A Stage B row over the budget is shortened by datasets_io.ehr_fit (counted); a row that does
not fit even then is over budget: `data.bad_records=error` stops the run here, `skip` counts and drops it. Only
counts and file:line positions are reported, never patient text.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from datasets_io.ehr_fit import with_ehr
from datasets_io.records import Record, ehr_from_prompt
from datasets_io.tokens import OverBudgetError, build_sample, encode_prompt, encode_target
from datasets_io.errors import LauncherError

SHOWN_EXAMPLES = 5
PERCENTILES = (50, 90, 99, 100)


@dataclass
class BudgetReport:
    """Token lengths of a set of records against `max_len`. Counts and positions only."""

    max_len: int
    num_image_tokens: int
    lengths: dict[str, list[int]] = field(default_factory=dict)
    """Stage -> unshortened length of each row."""
    shortest: list[int] = field(default_factory=list)
    """Per row, the length with the Patient Data block emptied (Stage A: the length itself)."""
    shortened: int = 0
    """Rows that fit only after their Patient Data block was shortened."""
    over_budget: list[int] = field(default_factory=list)
    """Indices (into the records given) of rows that do not fit even shortened."""
    problems: list[str] = field(default_factory=list)
    """The first few over-budget rows as "file:line: field 'length': ..." messages."""

    @property
    def rows(self) -> int:
        return sum(len(v) for v in self.lengths.values())

    def percentiles(self, stage: str) -> dict[str, int]:
        values = self.lengths.get(stage) or [0]
        return {f"p{q}": int(np.percentile(values, q, method="higher")) for q in PERCENTILES}

    def fits(self, share: float) -> int:
        """The smallest max_seq_len at which `share` of the rows fit with no shortening."""
        values = [n for v in self.lengths.values() for n in v] or [0]
        return int(np.percentile(values, share * 100, method="higher"))

    def metrics(self, prefix: str = "data/") -> dict[str, float]:
        """Numbers for MLflow (no patient data)."""
        return {
            f"{prefix}rows_checked": self.rows,
            f"{prefix}rows_shortened": self.shortened,
            f"{prefix}rows_over_budget": len(self.over_budget),
            f"{prefix}max_seq_len_fits_99": self.fits(0.99),
            f"{prefix}max_seq_len_fits_100": self.fits(1.0),
            f"{prefix}max_seq_len_fits_all_shortened": max(self.shortest or [0]),
        }

    def lines(self) -> list[str]:
        out = [
            f"token budget: data.max_seq_len={self.max_len}, {self.num_image_tokens} image tokens per sample",
            "  length per row (prompt + image tokens + target + EOS, unshortened):",
        ]
        for stage in sorted(self.lengths):
            p = self.percentiles(stage)
            out.append(
                f"    stage {stage}: {len(self.lengths[stage])} rows, p50 {p['p50']}, p90 {p['p90']}, "
                f"p99 {p['p99']}, max {p['p100']}"
            )
        out += [
            f"  max_seq_len that fits 99% of rows unshortened: {self.fits(0.99)}; 100%: {self.fits(1.0)}; "
            f"every row with Patient Data shortened: {max(self.shortest or [0])}",
            f"  rows shortened (Patient Data): {self.shortened}",
            f"  rows over budget (cannot fit without cutting the target): {len(self.over_budget)}",
        ]
        out += [f"    {p}" for p in self.problems]
        if len(self.over_budget) > len(self.problems):
            out.append(f"    ... and {len(self.over_budget) - len(self.problems)} more")
        return out


def budget_report(
    records: list[Record],
    tokenizer: Any,
    image_token_id: int,
    num_image_tokens: int,
    max_len: int,
    overlong: str = "shorten_ehr",
) -> BudgetReport:
    """Tokenize every record as training will (datasets_io.tokens.build_sample) and measure it against `max_len`."""
    report = BudgetReport(max_len, num_image_tokens)
    for i, r in enumerate(records):
        prompt_n = len(encode_prompt(tokenizer, r.prompt, image_token_id, num_image_tokens))
        target_n = len(encode_target(tokenizer, r.target))
        full = prompt_n + target_n
        report.lengths.setdefault(r.stage, []).append(full)
        shortest = full
        if ehr_from_prompt(r.prompt) is not None and full > max_len:
            emptied = with_ehr(r.prompt, {})
            shortest = len(encode_prompt(tokenizer, emptied, image_token_id, num_image_tokens)) + target_n
        report.shortest.append(shortest)
        if full <= max_len:
            continue
        try:  # the same call training makes, so the report and the run cannot disagree
            sample = build_sample(
                tokenizer,
                r.prompt,
                r.target,
                image_token_id=image_token_id,
                num_image_tokens=num_image_tokens,
                max_len=max_len,
                overlong=overlong,
                where=r.where,
            )
            report.shortened += sample.shortened
        except OverBudgetError as e:
            report.over_budget.append(i)
            if len(report.problems) < SHOWN_EXAMPLES:
                report.problems.append(str(e))
    return report


def apply_bad_records_policy(records: list[Record], report: BudgetReport, policy: str, source: str) -> list[Record]:
    """`error`: LauncherError naming the count and the first rows; `skip`: the records without the over-budget ones."""
    if not report.over_budget:
        return records
    if policy == "error":
        raise LauncherError(
            f"{source}: {len(report.over_budget)} record(s) do not fit data.max_seq_len={report.max_len} even with "
            f"their Patient Data shortened (the target is never cut); first: {report.problems[0]}. Raise "
            "data.max_seq_len, or set data.bad_records=skip to count and skip them "
            "(`launcher data validate FILE --config CONFIG` lists them)"
        )
    drop = set(report.over_budget)
    return [r for i, r in enumerate(records) if i not in drop]
