"""Patient leakage: no subject may appear both in the training file and in a validation / test file.

    overlap = subject_overlap(train_records, val_records)
    check_subject_overlap(overlap, "data/train.jsonl", "data/val.jsonl", allow=cfg.data.allow_subject_overlap)

A record's subject is the MIMIC patient of its image path (`.../p<subject>/s<study>/...` -> `p<subject>`); a record
whose path has no such folder falls back to its study (`s<study_id>`), the finest unit that is certainly one
patient. The original project's files were not split by patient, so scores on them were inflated by patients seen
in training. An overlap is an error (LauncherError, with counts and a few subject ids, never patient data) unless
`data.allow_subject_overlap: true`, in which case the overlap is returned so the caller can record it (MLflow tag).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from datasets_io.records import Record
from datasets_io.errors import LauncherError

_SUBJECT_RE = re.compile(r"(?:^|/)p(\d+)/s\d+(?:/|$)")
SHOWN_EXAMPLES = 5


def subject_of(record: Record) -> str:
    """`p<subject>` from a MIMIC image path `.../p<subject>/s<study>/<file>`, else `s<study_id>`."""
    m = _SUBJECT_RE.search(record.image)
    return f"p{m.group(1)}" if m else f"s{record.study_id}"


@dataclass(frozen=True)
class SubjectOverlap:
    """Subjects found in both sets of records: counts and the first few ids (sorted)."""

    train_subjects: int
    other_subjects: int
    shared: tuple[str, ...]
    other_rows_affected: int

    @property
    def count(self) -> int:
        return len(self.shared)

    def describe(self, train_name: str, other_name: str) -> str:
        examples = ", ".join(self.shared[:SHOWN_EXAMPLES]) + (" ..." if self.count > SHOWN_EXAMPLES else "")
        return (
            f"{self.count} subject(s) of {other_name} ({self.other_subjects} subjects, {self.other_rows_affected} "
            f"rows affected) also in {train_name} ({self.train_subjects} subjects): {examples}"
        )


def subject_overlap(train: list[Record], other: list[Record]) -> SubjectOverlap:
    train_subjects = {subject_of(r) for r in train}
    other_subjects = [subject_of(r) for r in other]
    shared = sorted(train_subjects.intersection(other_subjects))
    shared_set = set(shared)
    return SubjectOverlap(
        len(train_subjects), len(set(other_subjects)), tuple(shared), sum(1 for s in other_subjects if s in shared_set)
    )


def check_subject_overlap(overlap: SubjectOverlap, train_name: str, other_name: str, *, allow: bool) -> SubjectOverlap:
    """Raise LauncherError on any shared subject unless `allow` (data.allow_subject_overlap); returns `overlap`."""
    if overlap.count and not allow:
        raise LauncherError(
            f"patient leakage: {overlap.describe(train_name, other_name)}. Split the files by patient (MIMIC-CXR's "
            "official split is, `launcher data build` keeps it), or set data.allow_subject_overlap=true to accept "
            "it (recorded as an MLflow tag)"
        )
    return overlap
