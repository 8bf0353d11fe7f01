"""`launcher data validate`: read every record under the skip policy (so ALL problems are listed), then summarize:
rows per stage, label prevalence, EHR field coverage. Only counts and label names are printed, never patient values.
"""

from __future__ import annotations

from collections import Counter

from datasets_io.jsonl import ReadReport, iter_records
from datasets_io.records import CHEXPERT_LABELS, ehr_from_prompt, parse_target

EHR_FIELDS = ("Age", "Sex", "Vitals", "Labs", "O2_device", "Chronic_conditions")


def summarize_files(files: list[str], data_root: str, images: str = "decode") -> dict:
    report = ReadReport()
    chexpert: dict[str, Counter] = {label: Counter() for label in CHEXPERT_LABELS}
    icd: Counter = Counter()
    ehr_cov: Counter = Counter()
    studies, patients = set(), set()
    n_b = 0
    for path in files:
        for r in iter_records(path, data_root, policy="skip", check_images=images, report=report):
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
        "problems": report.problems,
    }
