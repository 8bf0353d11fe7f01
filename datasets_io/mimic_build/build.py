"""The build itself: every step in order (studies.py: image, split, CheXpert, impression; ehr.py: the Patient Data
block and ICD flags), then the curriculum written under OUT (records, images, build_report.json) and its summary."""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tqdm import tqdm

from datasets_io.errors import LauncherError
from datasets_io.mimic_build.ehr import add_ehr
from datasets_io.mimic_build.icd_map import IcdMap, load_icd_map
from datasets_io.mimic_build.options import BuildOptions
from datasets_io.mimic_build.raw_files import (
    ADMISSIONS,
    CHEXPERT,
    D_LABITEMS,
    DIAGNOSES,
    ED_DIRS,
    HOSP_DIRS,
    LABEVENTS,
    METADATA,
    PATIENTS,
    SPLIT,
    VITALSIGN,
    locate,
    subfolder,
)
from datasets_io.mimic_build.studies import (
    CHEXPERT_RENDER,
    SPLIT_FILES,
    Study,
    check_patient_disjoint,
    select_studies,
)
from datasets_io.records import CHEXPERT_LABELS, STAGE_MODES, prompt_a, prompt_b, target_a, target_b

DROP_REASONS = (
    "no_preferred_view",
    "not_in_split_file",
    "no_chexpert_row",
    "image_file_missing",
    "report_file_missing",
    "no_usable_report_text",
)  # report["dropped"], in step order


def build(opts: BuildOptions) -> dict[str, Any]:
    """Run every step and write OUT; returns the build report (also written to OUT/build_report.json)."""
    out = Path(opts.out)
    if out.resolve() in (Path(opts.cxr_jpg).resolve(), subfolder(opts.cxr_jpg, "files").resolve()):
        raise LauncherError(f"--out {out} is the MIMIC-CXR-JPG folder; choose a separate output folder")
    icd_map = load_icd_map(opts.icd_map)
    report: dict[str, Any] = {
        "options": asdict(opts),
        "inputs": locate_inputs(opts),
        "icd_map": {"path": str(opts.icd_map), "version": icd_map.version, "sha256": icd_map.sha256},
        "dropped": Counter({key: 0 for key in DROP_REASONS}),
        "ehr": {},
    }
    studies = select_studies(opts, report)
    if not studies:
        raise LauncherError("no study survived selection; see the counts: " + json.dumps(dict(report["dropped"])))
    report["split_check"] = check_patient_disjoint(studies)
    add_ehr(studies, opts, icd_map, report)
    rows_by_split, stage_b_skipped = write_curriculum(studies, opts)
    count_outputs(report, studies, rows_by_split, stage_b_skipped, icd_map)
    tmp = out / "build_report.json.tmp"
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, out / "build_report.json")
    return report


def locate_inputs(opts: BuildOptions) -> dict[str, str]:
    """Every input file, found before any work starts (a wrong folder fails in a second, not after the reports)."""
    found = {name: locate(opts.cxr_jpg, name, "--cxr-jpg") for name, _ in (METADATA, CHEXPERT, SPLIT)}
    for name, _ in (PATIENTS, ADMISSIONS, DIAGNOSES, D_LABITEMS, LABEVENTS):
        found[name] = locate(opts.mimic_iv, name, "--mimic-iv", HOSP_DIRS)
    if opts.mimic_iv_ed:
        found[VITALSIGN[0]] = locate(opts.mimic_iv_ed, VITALSIGN[0], "--mimic-iv-ed", ED_DIRS)
    for flag, root in (("--cxr-jpg", opts.cxr_jpg), ("--reports", opts.reports)):
        if not subfolder(root, "files").is_dir():
            raise LauncherError(f"{flag} {root}: not a folder (expected the release's files/pXX/... tree under it)")
    return {name: str(path) for name, path in found.items()}


# --------------------------------------------------------------------------------------------- output
def write_curriculum(studies: list[Study], opts: BuildOptions) -> tuple[dict[str, list[dict[str, str]]], int]:
    """Each study's image under OUT/files and its records in its split's JSONL. Returns (rows per split, studies
    whose Stage B row was not written)."""
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    image_root = subfolder(opts.cxr_jpg, "files")
    rows_by_split: dict[str, list[dict[str, str]]] = {split: [] for split in SPLIT_FILES}
    stage_b_skipped = 0
    for s in tqdm(studies, desc="images", disable=None, leave=False):
        src = image_root / s.image_relpath.removeprefix("files/")
        place_image(src, out / s.image_relpath, opts.image_mode)
        rows = records_of(s, opts)
        stage_b_skipped += len(rows) == 1
        rows_by_split[s.split].extend(rows)
    for split, name in SPLIT_FILES.items():
        write_jsonl(out / name, rows_by_split[split])
    return rows_by_split, stage_b_skipped


def place_image(src: Path, dest: Path, mode: str) -> None:
    """The chosen image at `dest` under OUT: an absolute symlink to `src`, or a copy."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.is_symlink() or dest.exists():
        if dest.exists() and os.path.samefile(src, dest) and not dest.is_symlink():
            return  # the output root is the image tree itself: never replace an original by a link to itself
        dest.unlink()
    if mode == "copy":
        shutil.copyfile(src, dest)
    else:
        os.symlink(src.resolve(), dest)


def records_of(s: Study, opts: BuildOptions) -> list[dict[str, str]]:
    """The study's Stage A row, and its Stage B row when it has an admission (or with --no-admission icd-none)."""
    chexpert = chexpert_block(s.chexpert, opts.unmentioned)
    base = {"study_id": str(s.study_id), "image": s.image_relpath}
    rows = [
        {
            **base,
            "prompt": prompt_a(),
            "target": target_a(s.impression, chexpert),
            "mode": STAGE_MODES["A"],
            "stage": "A",
        }
    ]
    if s.hadm_id is not None or opts.no_admission == "icd-none":
        rows.append(
            {
                **base,
                "prompt": prompt_b(s.ehr),
                "target": target_b(s.impression, chexpert, s.icd),
                "mode": STAGE_MODES["B"],
                "stage": "B",
            }
        )
    return rows


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    """One JSON object per line, written atomically (a .tmp file, then renamed)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    os.replace(tmp, path)


def chexpert_block(values: tuple[float | None, ...], unmentioned: str) -> dict[str, str]:
    """Label -> Positive/Negative/Uncertain in CHEXPERT_LABELS order; blank is omitted or Negative, never Uncertain."""
    block: dict[str, str] = {}
    for label, v in zip(CHEXPERT_LABELS, values):
        if v is None:
            if unmentioned == "negative":
                block[label] = "Negative"
        else:
            block[label] = CHEXPERT_RENDER[v]
    return block


# --------------------------------------------------------------------------------------------- the report
def count_outputs(
    report: dict[str, Any],
    studies: list[Study],
    rows_by_split: dict[str, list[dict[str, str]]],
    stage_b_skipped: int,
    icd_map: IcdMap,
) -> None:
    """The report's counts of what was written, and the funnel of every step."""
    report["dropped"] = dict(report["dropped"])
    report["kept_studies"] = len(studies)
    report["studies_per_split"] = {sp: sum(1 for s in studies if s.split == sp) for sp in SPLIT_FILES}
    report["stage_b_not_written_outside_every_admission"] = stage_b_skipped
    report["rows_written"] = {
        SPLIT_FILES[sp]: dict(Counter(r["stage"] for r in rows)) for sp, rows in rows_by_split.items()
    }
    report["chexpert_labels"] = label_counts(studies)
    report["icd_flags_positive"] = {f: sum(1 for s in studies if s.icd.get(f)) for f in icd_map.flags}
    report["funnel"] = funnel(report)


def label_counts(studies: list[Study]) -> dict[str, dict[str, int]]:
    """Per CheXpert label: how many kept studies are Positive, Negative, Uncertain, not mentioned."""
    out = {label: Counter() for label in CHEXPERT_LABELS}
    for s in studies:
        for label, v in zip(CHEXPERT_LABELS, s.chexpert):
            out[label]["not_mentioned" if v is None else CHEXPERT_RENDER[v]] += 1
    keys = ("Positive", "Negative", "Uncertain", "not_mentioned")
    return {label: {k: c[k] for k in keys} for label, c in out.items()}


def funnel(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The counts at each step, in order: studies in, dropped, why."""
    d = report["dropped"]
    n = report["metadata_studies"]
    steps = [("metadata studies (after --subjects)", n, 0, "")]
    n -= d["no_preferred_view"]
    steps.append(("with an image in --views", n, d["no_preferred_view"], "no image with a preferred ViewPosition"))
    unexamined = report["candidates_with_preferred_view"] - report["candidates_examined"]
    if unexamined:
        n -= unexamined
        steps.append(("examined before --max-studies was reached", n, unexamined, "--max-studies"))
    for key, why in (
        ("not_in_split_file", "image not in the split file"),
        ("no_chexpert_row", "study not in the CheXpert file"),
        ("image_file_missing", "JPEG not on disk"),
        ("report_file_missing", "report .txt not on disk"),
        ("no_usable_report_text", "no IMPRESSION, FINDINGS or last paragraph with text"),
    ):
        n -= d[key]
        steps.append((f"after: {why}", n, d[key], key))
    return [{"step": s, "studies": k, "dropped": dr, "reason": r} for s, k, dr, r in steps]


def summary(report: dict[str, Any]) -> str:
    """What `launcher data build` prints: the funnel and the counts (no report text, no EHR values)."""
    lines = ["MIMIC curriculum build", f"  ICD map {report['icd_map']['path']} version {report['icd_map']['version']}"]
    for step in report["funnel"]:
        dropped = f"  (-{step['dropped']} {step['reason']})" if step["dropped"] else ""
        lines.append(f"  {step['studies']:>8}  {step['step']}{dropped}")
    lines.append(f"  impression from: {report['impression_source']}")
    ehr = report["ehr"]
    lines.append(
        f"  admissions: {ehr.get('inside_an_admission', 0)} studies inside one, "
        f"{ehr.get('outside_every_admission', 0)} outside every admission "
        f"({report['stage_b_not_written_outside_every_admission']} Stage B rows not written)"
    )
    lab = ehr.get("labevents", {})
    lines.append(
        f"  labevents: {lab.get('rows_scanned', 0)} rows scanned, {lab.get('rows_kept', 0)} of the panel "
        f"and subjects, {ehr.get('studies_with_labs', 0)} studies with labs, "
        f"{ehr.get('studies_with_vitals', 0)} with vitals"
    )
    lines.append(f"  ICD flags: {report['icd_flags_positive']}")
    for name, counts in report["rows_written"].items():
        lines.append(f"  {name}: {sum(counts.values())} rows {counts}")
    return "\n".join(lines)
