"""Which studies are evaluated and which arm scores which: a study's image, prompts and target, the arms of an --ehr
mode, and a hash of the study ids that shows arms are paired without writing the ids anywhere."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from datasets_io.errors import LauncherError
from datasets_io.jsonl import join, path_exists, read_records
from datasets_io.records import prompt_a, with_empty_ehr

ARM_DESCRIPTIONS = {
    "ehr_on": "EHR on: the Stage B prompt",
    "ehr_off": "EHR off: the Stage B prompt with the Patient Data block emptied",
    "stage_a": "the Stage A prompt (image only)",
}
ARM_EXPECTS_ICD = {"ehr_on": True, "ehr_off": True, "stage_a": False}
EHR_MODES = {"on": ("ehr_on", "stage_a"), "off": ("ehr_off", "stage_a"), "both": ("ehr_on", "ehr_off", "stage_a")}


@dataclass(frozen=True)
class Study:
    """One study of the evaluation set: its image, its prompts and the target every arm is scored against."""

    study_id: str
    image: str  # relative to the data root
    prompt_b: str | None  # None when the file has no Stage B row for the study
    prompt_a: str  # the Stage A row's prompt (the fixed image-only prompt when the file has no Stage A row)
    target: str  # the Stage B target when there is one (Impression + CheXpert + ICD), else the Stage A target
    where: str = ""

    @property
    def has_ehr(self) -> bool:
        return self.prompt_b is not None

    def covered_by(self, arm: str) -> bool:
        """The image-only arm covers every study; the EHR arms the studies with a Stage B row."""
        return arm == "stage_a" or self.has_ehr

    def prompt(self, arm: str) -> str:
        if arm == "stage_a":
            return self.prompt_a
        if self.prompt_b is None:
            raise ValueError(f"{self.where}: study {self.study_id} has no Stage B row for arm {arm}")
        return self.prompt_b if arm == "ehr_on" else with_empty_ehr(self.prompt_b)


def load_studies(data_file: str, data_root: str, limit: int | None = None, seed: int = 0) -> list[Study]:
    """Every study of the file (a Stage A row, a Stage B row or both), in file order; with `limit`, a seeded random
    sample of `limit` studies (kept in file order), so a short run is not biased towards the file's first subjects.
    Which arm scores which study is `Study.covered_by`. Bad records are errors (file:line)."""
    if "://" not in data_file and not Path(data_file).is_file():
        raise LauncherError(f"--data {data_file}: file not found")
    if "://" not in data_root and not Path(data_root).is_dir():
        raise LauncherError(f"--data-root {data_root}: directory not found")
    records, _ = read_records(data_file, data_root, policy="error", check_images="none")
    if not records:
        raise LauncherError(f"--data {data_file}: no records")
    a_rows = {r.study_id: r for r in records if r.stage == "A"}
    b_rows = {r.study_id: r for r in records if r.stage == "B"}
    order = sample_studies(list(dict.fromkeys(r.study_id for r in records)), limit, seed)
    studies = []
    for sid in order:
        b, a = b_rows.get(sid), a_rows.get(sid)
        row = b or a
        studies.append(
            Study(sid, row.image, b.prompt if b else None, a.prompt if a else prompt_a(), row.target, row.where)
        )
    missing = [s for s in studies if not path_exists(join(data_root, s.image))]
    if missing:
        raise LauncherError(
            f"{len(missing)} image(s) not found under --data-root {data_root}, first: "
            f"{missing[0].where}: {missing[0].image}"
        )
    return studies


def sample_studies(order: list[str], limit: int | None, seed: int) -> list[str]:
    """All of `order`, or a uniform random sample of `limit` of them without replacement (numpy default_rng(seed)),
    in their original order."""
    if limit is None:
        return order
    if limit < 1:
        raise LauncherError(f"--limit must be >= 1, got {limit}")
    if limit >= len(order):
        return order
    keep = np.sort(np.random.default_rng(seed).choice(len(order), size=limit, replace=False))
    return [order[i] for i in keep]


def arms_for(ehr: str, studies: Sequence[Study]) -> tuple[str, ...]:
    if ehr not in EHR_MODES:
        raise LauncherError(f"--ehr {ehr!r}: choose one of {', '.join(EHR_MODES)}")
    if not any(s.has_ehr for s in studies):
        return ("stage_a",)  # no Stage B rows: the image-only arm is all there is
    return EHR_MODES[ehr]


def arm_indices(arm: str, studies: Sequence[Study]) -> list[int]:
    """Positions (in `studies`) of the studies the arm scores."""
    return [i for i, s in enumerate(studies) if s.covered_by(arm)]


def arm_coverage(arms: Sequence[str], studies: Sequence[Study]) -> dict[str, dict[str, Any]]:
    """Which studies each arm scores, for metrics.json and the report: count, rule and a hash of the ids."""
    out = {}
    for arm in arms:
        covered = [studies[i] for i in arm_indices(arm, studies)]
        rule = "every study" if arm == "stage_a" else "the studies with a Stage B row"
        out[arm] = {"n": len(covered), "of": len(studies), "rule": rule, "studies_sha256": studies_digest(covered)}
    return out


def studies_digest(studies: Sequence[Study]) -> str:
    """A hash of the study ids in order: shows the arms are paired without writing the ids anywhere."""
    return hashlib.sha256("\n".join(s.study_id for s in studies).encode()).hexdigest()[:16]
