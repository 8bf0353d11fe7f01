"""What `launcher data build` was asked to do (BuildOptions), and the --subjects selectors it keeps.

Light on purpose (no numpy, pyarrow or yaml): the CLI imports DEFAULT_ICD_MAP from here to build its parser on every
`launcher ...` call.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from datasets_io.errors import LauncherError

DEFAULT_ICD_MAP = Path(__file__).resolve().parents[2] / "configs" / "icd_map.yaml"


@dataclass
class BuildOptions:
    """What `launcher data build` was asked to do; saved in build_report.json."""

    cxr_jpg: str
    """MIMIC-CXR-JPG folder: the three mimic-cxr-2.0.0-*.csv.gz files and files/pXX/... images."""
    reports: str
    """MIMIC-CXR folder with files/pXX/p<subject>/s<study>.txt (or that files/ folder itself)."""
    mimic_iv: str
    """MIMIC-IV folder holding hosp/ (or the hosp folder itself)."""
    out: str
    """Output data root."""
    mimic_iv_ed: str | None = None
    """MIMIC-IV-ED folder holding ed/vitalsign.csv.gz (or the ed folder itself); None = no vitals."""
    subjects: tuple[str, ...] = ()
    """Subject folders to keep: pXX (a group, e.g. p10) or p<subject_id>; empty = all."""
    views: tuple[str, ...] = ("PA", "AP")
    """ViewPosition values usable as the study's image, most preferred first."""
    max_studies: int = 0
    """Stop after this many kept studies, in (subject_id, study_id) order; 0 = all."""
    icd_map: str = str(DEFAULT_ICD_MAP)
    """The versioned ICD flag / chronic-condition map (configs/icd_map.yaml)."""
    unmentioned: Literal["omit", "negative"] = "omit"
    """CheXpert blank (not mentioned): `omit` from the block, or render `negative`. Never Uncertain."""
    no_admission: Literal["stage-a-only", "icd-none"] = "stage-a-only"
    """A study inside no admission: `stage-a-only` (no Stage B row) or `icd-none` (Stage B with findings None)."""
    admission_start: Literal["admittime", "edregtime"] = "admittime"
    """Start of the admission window: `admittime`, or `edregtime` (the ED registration before it, when present)."""
    lab_window_hours: float = 24.0
    """A lab counts when taken at most this long before the study (and never after it)."""
    vital_window_hours: float = 24.0
    """The same for ED vital signs."""
    image_mode: Literal["symlink", "copy"] = "symlink"
    """How the chosen image lands under OUT/files: `symlink` (absolute) or `copy`."""


def parse_subject_selectors(text: str | None) -> tuple[str, ...]:
    """`--subjects p10,p11` -> ("p10", "p11"): pXX (a subject folder group) or p<8-digit subject_id>; "" -> all."""
    if not text:
        return ()
    items = tuple(s.strip() for s in text.split(",") if s.strip())
    bad = [s for s in items if not re.fullmatch(r"p\d{2}|p\d{8}", s)]
    if bad:
        raise LauncherError(f"--subjects: {bad} are not subject folders; use pXX (e.g. p10) or p<8-digit subject_id>")
    return items


def subject_selected(subject_id: int, selectors: tuple[str, ...]) -> bool:
    """Whether a subject is kept by the selectors (none = every subject)."""
    if not selectors:
        return True
    sid = str(subject_id)
    return any((len(s) == 3 and sid[:2] == s[1:]) or sid == s[1:] for s in selectors)
