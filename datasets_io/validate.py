"""`launcher data validate`: read every record under the skip policy (so ALL problems are listed), then summarize:
rows per stage, label prevalence, EHR field coverage, subjects shared between the files (patient leakage) and, given
a config, the token budget per file (datasets_io.token_budget). Only counts, label names, subject ids and file:line
positions are printed, never patient values.
"""

from __future__ import annotations

from collections import Counter

from itertools import combinations
from typing import Any

from datasets_io.jsonl import ReadReport, iter_records, read_records
from datasets_io.leakage import SHOWN_EXAMPLES, subject_of
from datasets_io.records import CHEXPERT_LABELS, ehr_from_prompt, parse_target
from datasets_io.token_budget import budget_report

EHR_FIELDS = ("Age", "Sex", "Vitals", "Labs", "O2_device", "Chronic_conditions")


def summarize_files(files: list[str], data_root: str, images: str = "decode") -> dict:
    report = ReadReport()
    chexpert: dict[str, Counter] = {label: Counter() for label in CHEXPERT_LABELS}
    icd: Counter = Counter()
    ehr_cov: Counter = Counter()
    studies, patients = set(), set()
    n_b = 0
    subjects: dict[str, set[str]] = {path: set() for path in files}
    for path in files:
        for r in iter_records(path, data_root, policy="skip", check_images=images, report=report):
            subjects[path].add(subject_of(r))
            studies.add(r.study_id)
            parts = r.image.split("/")
            patients.update(p for p in parts if p.startswith("p") and len(p) > 3)
            parsed = parse_target(r.target, expect_icd=r.stage == "B")
            for label, value in (parsed.chexpert or {}).items():
                chexpert.setdefault(label, Counter())[value] += 1
            if r.stage == "B":
                n_b += 1
                icd.update(k for k, v in (parsed.icd or {}).items() if v)
                ehr = ehr_from_prompt(r.prompt) or {}
                ehr_cov.update(f for f in EHR_FIELDS if ehr.get(f) not in (None, "", [], {}))
    rows = max(report.rows, 1)
    return {
        "files": list(files),
        "rows": report.rows,
        "bad_records": report.skipped,
        "blank_lines": report.blank_lines,
        "per_stage": dict(sorted(report.per_stage.items())),
        "studies": len(studies),
        "patients": len(patients),
        "chexpert_prevalence": {
            label: {v: c[v] / rows for v in ("Positive", "Uncertain", "Negative")} for label, c in chexpert.items()
        },
        "icd_prevalence": {k: v / max(n_b, 1) for k, v in sorted(icd.items())},
        "ehr_coverage": {f: ehr_cov[f] / max(n_b, 1) for f in EHR_FIELDS},
        "subject_overlap": subject_overlaps(subjects),
        "problems": report.problems,
    }


def subject_overlaps(subjects: dict[str, set[str]]) -> list[dict[str, Any]]:
    """Every pair of files with the count of subjects they share and the first few ids (leakage when one is a
    training file and the other a validation or test file)."""
    out = []
    for a, b in combinations(subjects, 2):
        shared = sorted(subjects[a] & subjects[b])
        out.append({"files": [a, b], "shared_subjects": len(shared), "examples": shared[:SHOWN_EXAMPLES]})
    return out


def token_budgets(
    files: list[str],
    data_root: str,
    tokenizer: Any,
    image_token_id: int,
    num_image_tokens: int,
    max_len: int,
    overlong: str,
) -> dict[str, dict[str, Any]]:
    """Per file: the token budget report (lengths per stage, rows shortened, rows over budget with file:line)."""
    out = {}
    for path in files:
        records, _ = read_records(path, data_root, policy="skip", check_images="none")
        report = budget_report(records, tokenizer, image_token_id, num_image_tokens, max_len, overlong)
        out[path] = {
            "lines": report.lines(),
            "metrics": report.metrics(prefix=""),
            "percentiles": {stage: report.percentiles(stage) for stage in sorted(report.lengths)},
            "over_budget": report.problems,
            "rows_over_budget": len(report.over_budget),
        }
    return out
