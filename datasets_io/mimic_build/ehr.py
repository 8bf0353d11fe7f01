"""Step 4 of the build, the Patient Data block of each study from MIMIC-IV (+ MIMIC-IV-ED): the admission containing
the study, its ICD flags, chronic conditions from earlier admissions, age and sex, and the lab panel and ED vitals
nearest before the study (time_alignment.py says which event belongs to a study)."""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from datasets_io.errors import LauncherError
from datasets_io.mimic_build.icd_map import AdmissionCodes, IcdMap
from datasets_io.mimic_build.options import BuildOptions
from datasets_io.mimic_build.raw_files import (
    ADMISSIONS,
    D_LABITEMS,
    DIAGNOSES,
    ED_DIRS,
    HOSP_DIRS,
    LABEVENTS,
    PATIENTS,
    TS,
    VITALSIGN,
    Keep,
    locate,
    read_csv,
    stream_csv,
    subject_filter,
)
from datasets_io.mimic_build.studies import Study
from datasets_io.mimic_build.time_alignment import (
    Admission,
    NearestBefore,
    admission_containing,
    age_at,
    discharged_before,
    to_epoch_seconds,
    ts_seconds,
)

# Lab panel of the Patient Data block: output name -> (d_labitems labels, fluid). Resolved to itemids through
# d_labitems (exact label and fluid, case-insensitive), so no itemid is hard-coded; several itemids may share a
# name (e.g. Hemoglobin from Hematology and from Blood Gas): the nearest measurement of any of them wins.
LAB_PANEL: dict[str, tuple[tuple[str, ...], str]] = {
    "NT-proBNP": (("NTproBNP",), "Blood"),
    "Troponin T": (("Troponin T",), "Blood"),
    "Creatinine": (("Creatinine",), "Blood"),
    "BUN": (("Urea Nitrogen",), "Blood"),
    "Sodium": (("Sodium",), "Blood"),
    "Potassium": (("Potassium",), "Blood"),
    "Glucose": (("Glucose",), "Blood"),
    "WBC": (("White Blood Cells", "WBC Count"), "Blood"),
    "Hemoglobin": (("Hemoglobin",), "Blood"),
    "Platelets": (("Platelet Count",), "Blood"),
    "Lactate": (("Lactate",), "Blood"),
    "CRP": (("C-Reactive Protein",), "Blood"),
    "pH": (("pH",), "Blood"),
    "pO2": (("pO2",), "Blood"),
    "pCO2": (("pCO2",), "Blood"),
}
# MIMIC-IV-ED vitalsign column -> (output name, unit). The file has no unit column; these are its conventions.
VITALS: dict[str, tuple[str, str]] = {
    "temperature": ("temperature", "degF"),
    "heartrate": ("heart_rate", "bpm"),
    "resprate": ("resp_rate", "breaths/min"),
    "o2sat": ("o2_sat", "%"),
    "sbp": ("sbp", "mmHg"),
    "dbp": ("dbp", "mmHg"),
}


# --------------------------------------------------------------------------------------------- the whole step
def add_ehr(studies: list[Study], opts: BuildOptions, icd_map: IcdMap, report: dict) -> None:
    """Step 4: admission, ICD flags, chronic conditions, age/sex, labs and vitals; fills Study.ehr/.icd/.hadm_id."""
    hosp = Path(opts.mimic_iv)
    keep = subject_filter(np.array(sorted({s.subject_id for s in studies}), np.int64))
    ehr_report = report["ehr"]
    person = read_patients(hosp, keep)
    admissions = read_admissions(hosp, keep, opts.admission_start)
    codes = AdmissionCodes(icd_map, read_diagnoses(hosp, keep))
    labs, vitals = nearest_measurements(studies, opts, ehr_report)
    counts: Counter = Counter()
    for s, study_labs, study_vitals in zip(studies, labs, vitals):
        fill_study_ehr(s, admissions.get(s.subject_id, []), person, codes, study_labs, study_vitals, counts)
    ehr_report.update(dict(sorted(counts.items())))
    ehr_report["studies_with_labs"] = sum(1 for x in labs if x)
    ehr_report["studies_with_vitals"] = sum(1 for x in vitals if x)


def fill_study_ehr(
    s: Study,
    admissions: list[Admission],
    person: dict[int, tuple],
    codes: AdmissionCodes,
    labs: dict[str, Any],
    vitals: dict[str, Any],
    counts: Counter,
) -> None:
    """Set the study's hadm_id, ICD flags and Patient Data block; count where its admission was found."""
    current, n_inside = admission_containing(admissions, s.time_s)
    if n_inside > 1:
        counts["inside_two_or_more_admissions_latest_start_used"] += 1
    counts["inside_an_admission" if current else "outside_every_admission"] += 1
    s.hadm_id = current.hadm_id if current else None
    flags = codes.matched("flags", current.hadm_id) if current else set()
    s.icd = {f: True for f in codes.icd_map.flags if f in flags}
    chronic: set[str] = set()
    for a in discharged_before(admissions, s.time_s):
        chronic |= codes.matched("chronic", a.hadm_id)
    sex, anchor_age, anchor_year = person.get(s.subject_id, (None, None, None))
    if s.subject_id in person:
        counts["patient_row_found"] += 1
    s.ehr = {
        "Age": age_at(s.time_s, anchor_age, anchor_year),
        "Sex": sex if sex in ("M", "F") else None,
        "Admission_type": current.admission_type if current else None,
        "Vitals": vitals,
        "Labs": labs,
        "O2_device": None,  # not in hosp/ED tables (it is in ICU chartevents); kept as the seed's field
        "Chronic_conditions": [c for c in codes.icd_map.chronic if c in chronic],
    }


# --------------------------------------------------------------------------------------------- hosp tables
def read_patients(hosp: Path, keep: Keep) -> dict[int, tuple[str | None, int | None, int | None]]:
    """subject_id -> (gender, anchor_age, anchor_year)."""
    patients = read_csv(locate(hosp, PATIENTS[0], "--mimic-iv", HOSP_DIRS), PATIENTS[1], keep=keep, desc="patients")
    return {s: (g, a, y) for s, g, a, y in zip(*(patients.column(c).to_pylist() for c in PATIENTS[1]))}


def read_admissions(hosp: Path, keep: Keep, admission_start: str) -> dict[int, list[Admission]]:
    """subject_id -> its admissions; a window starts at admittime, or with `edregtime` at the ED registration before
    it when there is one."""
    columns = dict(ADMISSIONS[1])
    if admission_start == "edregtime":
        columns["edregtime"] = TS
    path = locate(hosp, ADMISSIONS[0], "--mimic-iv", HOSP_DIRS)
    table = read_csv(path, columns, keep=keep, desc="admissions")
    cols = {c: table.column(c).to_pylist() for c in columns}
    by_subject: dict[int, list[Admission]] = defaultdict(list)
    for i, (subject, hadm) in enumerate(zip(cols["subject_id"], cols["hadm_id"])):
        admit, disch = cols["admittime"][i], cols["dischtime"][i]
        if admit is None or disch is None or hadm is None:
            raise LauncherError(
                f"{path}: admission {hadm} of subject {subject} has a blank hadm_id, admittime or dischtime"
            )
        start = admit
        if admission_start == "edregtime" and cols["edregtime"][i] is not None:
            start = min(admit, cols["edregtime"][i])
        by_subject[subject].append(
            Admission(to_epoch_seconds(start), to_epoch_seconds(disch), hadm, cols["admission_type"][i])
        )
    return by_subject


def read_diagnoses(hosp: Path, keep: Keep) -> dict[int, set[tuple[int, str]]]:
    """hadm_id -> {(ICD version, code without dots, upper case)}."""
    path = locate(hosp, DIAGNOSES[0], "--mimic-iv", HOSP_DIRS)
    diagnoses = read_csv(path, DIAGNOSES[1], keep=keep, desc="diagnoses_icd")
    codes_by_hadm: dict[int, set[tuple[int, str]]] = defaultdict(set)
    for hadm, code, version in zip(*(diagnoses.column(c).to_pylist() for c in ("hadm_id", "icd_code", "icd_version"))):
        if version not in (9, 10):
            raise LauncherError(
                f"{path}: column 'icd_version': unexpected value {version} for hadm_id {hadm} (expected 9 or 10)"
            )
        if code:
            codes_by_hadm[hadm].add((version, code.replace(".", "").strip().upper()))
    return codes_by_hadm


# --------------------------------------------------------------------------------------------- labs and vitals
def nearest_measurements(
    studies: list[Study], opts: BuildOptions, ehr_report: dict
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(labs, vitals) per study: labevents and ED vitalsign streamed, reduced to one best row per (study, item)."""
    hosp = Path(opts.mimic_iv)
    study_subject = np.array([s.subject_id for s in studies], np.int64)
    study_time = np.array([s.time_s for s in studies], np.int64)
    items, lab_names, missing_labs = resolve_lab_panel(locate(hosp, D_LABITEMS[0], "--mimic-iv", HOSP_DIRS))
    ehr_report["lab_panel_not_in_d_labitems"] = missing_labs
    labs_reducer, lab_stats = nearest_labs(
        locate(hosp, LABEVENTS[0], "--mimic-iv", HOSP_DIRS),
        items,
        len(lab_names),
        study_subject,
        study_time,
        opts.lab_window_hours,
    )
    labs = labs_reducer.results(lab_names, with_range=True)
    ehr_report["labevents"] = lab_stats
    if opts.mimic_iv_ed:
        vit_path = locate(opts.mimic_iv_ed, VITALSIGN[0], "--mimic-iv-ed", ED_DIRS)
        vit_reducer, vit_stats = nearest_vitals(vit_path, study_subject, study_time, opts.vital_window_hours)
        vitals = vit_reducer.results([name for name, _ in VITALS.values()], with_range=False)
        ehr_report["vitalsign"] = vit_stats
    else:
        vitals = [{} for _ in studies]
        ehr_report["vitalsign"] = "not given (--mimic-iv-ed)"
    return labs, vitals


def resolve_lab_panel(d_labitems: Path) -> tuple[dict[int, int], list[str], list[str]]:
    """(itemid -> panel index, panel names, names with no itemid) from d_labitems by label and fluid."""
    table = read_csv(d_labitems, D_LABITEMS[1])
    names = list(LAB_PANEL)
    wanted = {
        (label.lower(), fluid.lower()): i for i, (labels, fluid) in enumerate(LAB_PANEL.values()) for label in labels
    }
    items: dict[int, int] = {}
    for itemid, label, fluid in zip(*(table.column(c).to_pylist() for c in ("itemid", "label", "fluid"))):
        i = wanted.get(((label or "").strip().lower(), (fluid or "").strip().lower()))
        if i is not None:
            items[itemid] = i
    missing = [n for i, n in enumerate(names) if i not in set(items.values())]
    return items, names, missing


def nearest_labs(
    labevents: Path,
    items: dict[int, int],
    n_items: int,
    study_subject: np.ndarray,
    study_time: np.ndarray,
    window_hours: float,
    *,
    desc: str | None = "labevents",
    block_size: int = 1 << 20,
) -> tuple[NearestBefore, dict[str, int]]:
    """Stream labevents, keeping rows of the chosen subjects and panel items with a numeric value."""
    reducer = NearestBefore(study_subject, study_time, n_items, window_hours * 3600)
    subjects = pa.array(np.unique(study_subject), pa.int64())
    itemids = np.array(sorted(items), np.int64)
    itemid_set = pa.array(itemids)
    item_index = np.array([items[i] for i in itemids], np.int64)
    stats = Counter()

    def keep(batch: pa.RecordBatch) -> pa.Array:
        stats["blocks_read"] += 1
        stats["rows_scanned"] += batch.num_rows
        mask = pc.and_(
            pc.is_in(batch.column("subject_id"), value_set=subjects),
            pc.is_in(batch.column("itemid"), value_set=itemid_set),
        )
        return pc.and_(mask, pc.and_(pc.is_valid(batch.column("valuenum")), pc.is_valid(batch.column("charttime"))))

    for batch in stream_csv(labevents, LABEVENTS[1], keep=keep, desc=desc, block_size=block_size):
        stats["rows_kept"] += batch.num_rows
        ids = batch.column("itemid").to_numpy()
        reducer.update(
            subject=batch.column("subject_id").to_numpy(),
            item=item_index[np.searchsorted(itemids, ids)],
            time_s=ts_seconds(batch.column("charttime")),
            value=batch.column("valuenum").to_numpy(zero_copy_only=False),
            unit=reducer.unit_codes(batch.column("valueuom")),
            lo=batch.column("ref_range_lower").to_numpy(zero_copy_only=False),
            hi=batch.column("ref_range_upper").to_numpy(zero_copy_only=False),
            tie=batch.column("labevent_id").fill_null(np.iinfo(np.int64).max).to_numpy(),
        )
    stats["pairs_in_window"] = reducer.pairs_in_window
    return reducer, dict(stats)


def nearest_vitals(
    vitalsign: Path, study_subject: np.ndarray, study_time: np.ndarray, window_hours: float
) -> tuple[NearestBefore, dict[str, int]]:
    """Stream ED vitalsign (wide: one column per vital) into the same reducer, one item per vital."""
    reducer = NearestBefore(study_subject, study_time, len(VITALS), window_hours * 3600)
    unit_codes = [reducer.unit_code(unit) for _, unit in VITALS.values()]
    subjects = pa.array(np.unique(study_subject), pa.int64())
    stats = Counter()

    def keep(batch: pa.RecordBatch) -> pa.Array:
        stats["blocks_read"] += 1
        stats["rows_scanned"] += batch.num_rows
        return pc.and_(pc.is_in(batch.column("subject_id"), value_set=subjects), pc.is_valid(batch.column("charttime")))

    for batch in stream_csv(vitalsign, VITALSIGN[1], keep=keep, desc="vitalsign"):
        stats["rows_kept"] += batch.num_rows
        subject = batch.column("subject_id").to_numpy()
        time_s = ts_seconds(batch.column("charttime"))
        tie = batch.column("stay_id").fill_null(np.iinfo(np.int64).max).to_numpy()  # same charttime: lowest stay
        for i, column in enumerate(VITALS):
            values = batch.column(column).to_numpy(zero_copy_only=False)
            present = ~np.isnan(values)
            n = int(present.sum())
            if not n:
                continue
            nan = np.full(n, np.nan)
            reducer.update(
                subject[present],
                np.full(n, i, np.int64),
                time_s[present],
                values[present],
                np.full(n, unit_codes[i], np.int32),
                nan,
                nan,
                tie[present],
            )
    stats["pairs_in_window"] = reducer.pairs_in_window
    return reducer, dict(stats)
