"""Steps 1-3 of the build: per study one image by view preference, its official split, its CheXpert labels and the
impression of its report -> `Study`, sorted by (subject_id, study_id); each drop is counted by reason."""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from datasets_io.errors import LauncherError
from datasets_io.mimic_build.options import BuildOptions, subject_selected
from datasets_io.mimic_build.raw_files import CHEXPERT, METADATA, SPLIT, locate, read_csv, subfolder
from datasets_io.mimic_build.report_sections import extract_impression
from datasets_io.mimic_build.time_alignment import study_epoch_seconds
from datasets_io.records import CHEXPERT_LABELS

SPLIT_FILES = {"train": "curriculum_train.jsonl", "validate": "curriculum_val.jsonl", "test": "curriculum_test.jsonl"}
CHEXPERT_RENDER = {1.0: "Positive", 0.0: "Negative", -1.0: "Uncertain"}


def subject_folder(subject_id: int) -> str:
    """The release's group folder of a subject: p10 for 10000032."""
    return f"p{str(subject_id)[:2]}"


def study_relpath(subject_id: int, study_id: int) -> str:
    """files/pXX/p<subject>/s<study>: the study's folder in the JPG and report trees, and under OUT."""
    return f"files/{subject_folder(subject_id)}/p{subject_id}/s{study_id}"


@dataclass
class Study:
    """One kept study: image, split, labels and impression (steps 1-3); admission, ICD flags, EHR (step 4)."""

    subject_id: int
    study_id: int
    dicom_id: str
    view: str
    split: str
    time_s: int
    chexpert: tuple[float | None, ...] = ()
    impression: str = ""
    impression_source: str = ""
    hadm_id: int | None = None
    ehr: dict[str, Any] = field(default_factory=dict)
    icd: dict[str, bool] = field(default_factory=dict)

    @property
    def image_relpath(self) -> str:
        return f"{study_relpath(self.subject_id, self.study_id)}/{self.dicom_id}.jpg"


def select_images(path: Path, views: tuple[str, ...], selectors: tuple[str, ...], report: dict) -> dict[int, tuple]:
    """study_id -> (subject_id, dicom_id, view, StudyDate, StudyTime) of the preferred-view image."""
    table = read_csv(path, METADATA[1], desc="metadata")
    rank = {v.upper(): i for i, v in enumerate(views)}
    best: dict[int, tuple] = {}
    study_subject: dict[int, int] = {}
    n_rows = 0
    for dicom, subject, study, view, date, time in zip(*(table.column(c).to_pylist() for c in METADATA[1])):
        if subject is None or study is None or dicom is None:
            raise LauncherError(f"{path}: a row has a blank dicom_id/subject_id/study_id (dicom_id {dicom!r})")
        if not subject_selected(subject, selectors):
            continue
        n_rows += 1
        if study_subject.setdefault(study, subject) != subject:
            raise LauncherError(f"{path}: study_id {study} belongs to subjects {study_subject[study]} and {subject}")
        r = rank.get((view or "").strip().upper())
        if r is None:
            continue
        key = (r, dicom)
        if study not in best or key < best[study][0]:
            best[study] = (key, (subject, dicom, (view or "").strip().upper(), date, time))
    report["metadata_images"] = n_rows
    report["metadata_studies"] = len(study_subject)
    report["dropped"]["no_preferred_view"] = len(study_subject) - len(best)
    return {study: v for study, (_, v) in best.items()}


def read_split(path: Path, selectors: tuple[str, ...]) -> tuple[dict[str, str], dict[int, set[str]]]:
    """(dicom_id -> split, study_id -> splits of its images)."""
    table = read_csv(path, SPLIT[1], desc="split")
    by_dicom: dict[str, str] = {}
    by_study: dict[int, set[str]] = defaultdict(set)
    for dicom, study, subject, split in zip(*(table.column(c).to_pylist() for c in SPLIT[1])):
        if not subject_selected(subject, selectors):
            continue
        if split not in SPLIT_FILES:
            raise LauncherError(
                f"{path}: column 'split': unexpected value {split!r} for dicom_id {dicom} "
                f"(expected one of {sorted(SPLIT_FILES)})"
            )
        by_dicom[dicom] = split
        by_study[study].add(split)
    return by_dicom, by_study


def read_chexpert(path: Path, selectors: tuple[str, ...]) -> dict[int, tuple[float | None, ...]]:
    table = read_csv(path, CHEXPERT[1], desc="chexpert")
    columns = [table.column(c).to_pylist() for c in CHEXPERT[1]]
    out: dict[int, tuple[float | None, ...]] = {}
    for row in zip(*columns):
        subject, study, values = row[0], row[1], row[2:]
        if not subject_selected(subject, selectors):
            continue
        for label, v in zip(CHEXPERT_LABELS, values):
            if v is not None and v not in CHEXPERT_RENDER:
                raise LauncherError(
                    f"{path}: column '{label}': unexpected value {v} for study_id {study} "
                    "(expected 1.0, 0.0, -1.0 or blank)"
                )
        if study in out:
            raise LauncherError(f"{path}: study_id {study} appears twice")
        out[study] = tuple(values)
    return out


@dataclass
class _CxrRelease:
    """What a candidate study is checked against: the split and CheXpert tables, the image and report trees."""

    split_by_dicom: dict[str, str]
    split_by_study: dict[int, set[str]]
    chexpert: dict[int, tuple[float | None, ...]]
    image_root: Path
    report_root: Path

    def study(self, study_id: int, subject: int, dicom: str, view: str, date: Any, time: Any) -> Study | str:
        """The Study of a candidate image, or the report's `dropped` key saying why there is none."""
        split = self.split_by_dicom.get(dicom)
        if split is None:
            return "not_in_split_file"
        if len(self.split_by_study.get(study_id, ())) > 1:
            raise LauncherError(
                f"{SPLIT[0]}: study {study_id} has images in splits {sorted(self.split_by_study[study_id])}"
            )
        labels = self.chexpert.get(study_id)
        if labels is None:
            return "no_chexpert_row"
        rel = study_relpath(subject, study_id).removeprefix("files/")
        if not (self.image_root / rel / f"{dicom}.jpg").is_file():
            return "image_file_missing"
        try:
            text = (self.report_root / f"{rel}.txt").read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return "report_file_missing"
        impression, source = extract_impression(text)
        if impression is None:
            return "no_usable_report_text"
        time_s = study_epoch_seconds(date, time, f"{METADATA[0]}: dicom_id {dicom}")
        return Study(subject, study_id, dicom, view, split, time_s, labels, impression, source)


def select_studies(opts: BuildOptions, report: dict) -> list[Study]:
    """Steps 1-3: image by view, split, CheXpert, report text; sorted by (subject_id, study_id)."""
    cxr = Path(opts.cxr_jpg)
    images = select_images(locate(cxr, METADATA[0], "--cxr-jpg"), opts.views, opts.subjects, report)
    release = _CxrRelease(
        *read_split(locate(cxr, SPLIT[0], "--cxr-jpg"), opts.subjects),
        read_chexpert(locate(cxr, CHEXPERT[0], "--cxr-jpg"), opts.subjects),
        subfolder(cxr, "files"),
        subfolder(opts.reports, "files"),
    )
    sources: Counter = Counter()
    kept: list[Study] = []
    candidates = sorted(images.items(), key=lambda kv: (kv[1][0], kv[0]))
    examined = 0
    for study_id, (subject, dicom, view, date, time) in tqdm(candidates, desc="studies", disable=None, leave=False):
        if opts.max_studies and len(kept) >= opts.max_studies:
            break
        examined += 1
        study = release.study(study_id, subject, dicom, view, date, time)
        if isinstance(study, str):
            report["dropped"][study] += 1
            continue
        sources[study.impression_source] += 1
        kept.append(study)
    report["candidates_with_preferred_view"] = len(candidates)
    report["candidates_examined"] = examined
    report["stopped_at_max_studies"] = bool(opts.max_studies and examined < len(candidates))
    report["impression_source"] = dict(sorted(sources.items()))
    return kept


def check_patient_disjoint(studies: list[Study]) -> dict[str, int]:
    splits: dict[int, set[str]] = defaultdict(set)
    for s in studies:
        splits[s.subject_id].add(s.split)
    crossing = sorted(subj for subj, sp in splits.items() if len(sp) > 1)
    if crossing:
        shown = ", ".join(f"{s} ({'/'.join(sorted(splits[s]))})" for s in crossing[:5])
        raise LauncherError(
            f"{SPLIT[0]}: {len(crossing)} patient(s) in more than one split, e.g. {shown}; "
            "train/val/test must be patient-disjoint (use the official split file unchanged)"
        )
    return {"subjects": len(splits), "subjects_in_two_or_more_splits": 0}
