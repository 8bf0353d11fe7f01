"""A small raw-format MIMIC fixture: the real releases' file names, columns and value conventions, made-up content.

    python -m datasets_io.mimic_fixture --out /tmp/mimic_raw [--extra-subjects 50]
    launcher data build --cxr-jpg /tmp/mimic_raw/mimic-cxr-jpg --reports /tmp/mimic_raw/mimic-cxr \\
        --mimic-iv /tmp/mimic_raw/mimiciv --mimic-iv-ed /tmp/mimic_raw/mimic-iv-ed --out /tmp/mimic_curriculum

Layout (as PhysioNet ships it):

    mimic-cxr-jpg/mimic-cxr-2.0.0-{metadata,chexpert,split}.csv.gz   files/pXX/p<subject>/s<study>/<dicom_id>.jpg
    mimic-cxr/files/pXX/p<subject>/s<study>.txt                        (free-text reports)
    mimiciv/hosp/{patients,admissions,diagnoses_icd,labevents,d_labitems}.csv.gz
    mimic-iv-ed/ed/vitalsign.csv.gz

Conventions copied from the releases: StudyDate is a YYYYMMDD integer and StudyTime an HHMMSS.fff float that loses
its leading zeros (91503.5 is 09:15:03.5); CheXpert labels are 1.0 / 0.0 / -1.0 / blank; ICD codes have no dots;
times are "YYYY-MM-DD HH:MM:SS" in MIMIC's shifted years (2100-2200); blank CSV fields are nulls; reports are
indented by one space with " \\n" blank lines. The hand-written SCENARIO below gives every case the build must
handle a named subject/study, so tests assert on exact values; `extra_subjects` adds seeded random filler.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import hashlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from PIL import Image

# ----------------------------------------------------------------------------------------------- scenario ids
CHF = 10000032  # train: study inside an admission with undotted ICD-10 codes; an ED study before admittime
PNA9 = 10000764  # train: ICD-9 admission; report with FINDINGS and no IMPRESSION
OUTSIDE = 10000898  # validate: study outside every admission (the previous one had pneumonia); no section headers
SEPSIS = 10001122  # test: sepsis admission; a report with no usable text; a missing report
NOPAT = 10002000  # train: not in patients.csv; a study without CheXpert row; a JPEG missing on disk
P11 = 11000011  # train, folder p11 (dropped by --subjects p10); a study missing from the split file

S_CHF_ADM, S_CHF_ED, S_PNA9, S_OUT, S_LATERAL_ONLY = 50000001, 50000002, 50000003, 50000004, 50000005
S_NO_TEXT, S_SEPSIS, S_NO_REPORT = 50000006, 50000007, 50000008
S_NO_CHEXPERT, S_NO_IMAGE, S_NOPAT = 50000009, 50000010, 50000011
S_P11, S_P11_NO_SPLIT = 50000012, 50000013

SPLIT_OF = {CHF: "train", PNA9: "train", OUTSIDE: "validate", SEPSIS: "test", NOPAT: "train", P11: "train"}

PATIENTS = [  # subject_id, gender, anchor_age, anchor_year, anchor_year_group, dod
    (CHF, "F", 52, 2180, "2014 - 2016", None),
    (PNA9, "M", 70, 2150, "2008 - 2010", "2158-04-02"),
    (OUTSIDE, "F", 45, 2160, "2017 - 2019", None),
    (SEPSIS, "M", 80, 2140, "2011 - 2013", None),
    (P11, "M", 33, 2175, "2017 - 2019", None),
]

# study_id: subject, "YYYY-MM-DD HH:MM:SS.fff", [views], chexpert {label: value}, report text (None = no file)
_IMPRESSION_CHF = (
    " Moderate cardiomegaly with mild pulmonary edema.  Right basilar opacity,\n atelectasis versus early pneumonia.\n"
)
REPORTS: dict[int, str | None] = {
    S_CHF_ADM: (
        "                                 FINAL REPORT\n"
        " EXAMINATION:  CHEST (PA AND LAT)\n \n"
        " INDICATION:  ___F with worsening dyspnea, history of CHF.  // eval for edema\n \n"
        " TECHNIQUE:  Chest PA and lateral\n \n"
        " COMPARISON:  ___\n \n"
        " FINDINGS: \n \n"
        " The heart is moderately enlarged.  There is mild interstitial pulmonary edema.\n"
        " Hazy opacity at the right base could reflect atelectasis or early pneumonia.  No\n"
        " pleural effusion or pneumothorax.\n \n"
        " IMPRESSION: \n \n" + _IMPRESSION_CHF
    ),
    S_CHF_ED: (
        "                                 FINAL REPORT\n"
        " EXAMINATION:  CHEST (PORTABLE AP)\n \n"
        " INDICATION:  ___ with shortness of breath\n \n"
        " FINDINGS: \n \n"
        " Portable AP view.  Enlarged cardiac silhouette.  Small right pleural effusion.\n \n"
        " IMPRESSION: \n \n"
        " Cardiomegaly and small right effusion, possible mild edema.\n \n"
        " ADDENDUM:\n \n"
        " Wet read discussed with the ED.\n \n"
        " IMPRESSION: \n \n"
        " Cardiomegaly with small right pleural effusion; mild edema cannot be excluded.\n"
    ),
    S_PNA9: (
        "                                 FINAL REPORT\n"
        " EXAMINATION:  CHEST (PA AND LAT)\n \n"
        " INDICATION:  Fever and cough.\n \n"
        " FINDINGS: \n \n"
        " Dense consolidation in the left lower lobe, consistent with pneumonia.  No\n"
        " pleural effusion.  Heart size is normal.\n"
    ),
    S_OUT: (
        "                                 FINAL REPORT\n"
        " CHEST RADIOGRAPH PERFORMED ON ___\n \n"
        " Comparison is made to prior study from ___.\n \n"
        " The lungs are clear.  The cardiomediastinal silhouette is normal.  No acute\n"
        " cardiopulmonary process.\n"
    ),
    S_LATERAL_ONLY: " FINAL REPORT\n IMPRESSION:  Lateral view only.\n",
    S_NO_TEXT: " FINAL REPORT\n EXAMINATION:  CHEST (PORTABLE AP)\n \n IMPRESSION: \n \n ___\n",
    S_SEPSIS: (
        "                                 FINAL REPORT\n"
        " INDICATION:  ___M with fever and hypotension.\n \n"
        " FINDINGS:  Endotracheal tube terminates 4 cm above the carina.  Patchy left basilar\n"
        " opacity.\n \n"
        " IMPRESSION:  Left basilar atelectasis; infection is not excluded.  Endotracheal tube\n"
        " in standard position.\n"
    ),
    S_NO_REPORT: None,
    S_NO_CHEXPERT: " FINAL REPORT\n IMPRESSION:  No acute process.\n",
    S_NO_IMAGE: " FINAL REPORT\n IMPRESSION:  No acute process.\n",
    S_NOPAT: " FINAL REPORT\n FINDINGS:  Lungs are clear.\n \n IMPRESSION:  No acute cardiopulmonary process.\n",
    S_P11: " FINAL REPORT\n IMPRESSION:  Normal chest radiograph.\n",
    S_P11_NO_SPLIT: " FINAL REPORT\n IMPRESSION:  Normal chest radiograph.\n",
}

STUDIES: dict[int, tuple[int, str, list[str], dict[str, float] | None]] = {
    S_CHF_ADM: (
        CHF,
        "2183-05-14 09:15:03.5",
        ["AP", "LATERAL", "PA"],
        {"Cardiomegaly": 1.0, "Edema": 1.0, "Pneumonia": -1.0, "Pleural Effusion": 0.0, "Pneumothorax": 0.0},
    ),
    S_CHF_ED: (
        CHF,
        "2183-05-10 14:20:00",
        ["AP", "LATERAL"],
        {"Cardiomegaly": 1.0, "Edema": -1.0, "Pleural Effusion": 1.0, "Lung Opacity": 1.0},
    ),
    S_PNA9: (
        PNA9,
        "2152-01-05 14:30:00",
        ["PA", "LATERAL"],
        {"Consolidation": 1.0, "Pneumonia": 1.0, "Lung Opacity": 1.0, "Pleural Effusion": 0.0},
    ),
    S_OUT: (OUTSIDE, "2161-06-20 08:00:00", ["PA", "LL"], {"No Finding": 1.0}),
    S_LATERAL_ONLY: (OUTSIDE, "2161-06-21 08:00:00", ["LATERAL"], {"No Finding": 1.0}),
    S_NO_TEXT: (SEPSIS, "2141-03-02 10:00:00", ["PA"], {"No Finding": 1.0}),
    S_SEPSIS: (
        SEPSIS,
        "2141-07-15 22:45:10",
        ["AP"],
        {"Atelectasis": 1.0, "Lung Opacity": -1.0, "Support Devices": 1.0, "Pneumonia": 0.0},
    ),
    S_NO_REPORT: (SEPSIS, "2141-07-16 06:00:00", ["AP"], {"Support Devices": 1.0}),
    S_NO_CHEXPERT: (NOPAT, "2170-01-01 12:00:00", ["PA"], None),
    S_NO_IMAGE: (NOPAT, "2170-02-01 12:00:00", ["PA"], {"No Finding": 1.0}),
    S_NOPAT: (NOPAT, "2170-03-01 12:00:00", ["PA", "LATERAL"], {"No Finding": 1.0, "Fracture": 0.0}),
    S_P11: (P11, "2175-01-01 07:30:00", ["PA"], {"Edema": 0.0}),
    S_P11_NO_SPLIT: (P11, "2175-02-01 07:30:00", ["PA"], {"Edema": 0.0}),
}

# hadm_id: subject, admittime, dischtime, admission_type, edregtime, [(icd_code, icd_version)]
ADMISSIONS: dict[int, tuple[int, str, str, str, str | None, list[tuple[str, int]]]] = {
    20000001: (CHF, "2180-03-01 10:00:00", "2180-03-05 14:00:00", "URGENT", None, [("4019", 9), ("25000", 9)]),
    20000002: (
        CHF,
        "2183-05-10 18:00:00",
        "2183-05-16 12:00:00",
        "EW EMER.",
        "2183-05-10 12:00:00",
        [("I5023", 10), ("J189", 10), ("N179", 10), ("I10", 10)],
    ),
    20000003: (
        PNA9,
        "2152-01-03 08:00:00",
        "2152-01-09 16:00:00",
        "EW EMER.",
        "2152-01-03 02:00:00",
        [("486", 9), ("5849", 9), ("49121", 9), ("4280", 9)],
    ),
    20000004: (OUTSIDE, "2161-02-01 09:00:00", "2161-02-04 12:00:00", "URGENT", None, [("J189", 10)]),
    20000005: (OUTSIDE, "2162-01-10 08:00:00", "2162-01-15 12:00:00", "ELECTIVE", None, [("C3490", 10)]),
    20000006: (
        SEPSIS,
        "2141-07-15 20:00:00",
        "2141-07-25 10:00:00",
        "EW EMER.",
        "2141-07-15 18:30:00",
        [("A419", 10), ("R6521", 10), ("J9601", 10)],
    ),
    20000007: (NOPAT, "2170-02-28 09:00:00", "2170-03-04 09:00:00", "OBSERVATION ADMIT", None, [("Z20822", 10)]),
    20000008: (P11, "2174-12-31 22:00:00", "2175-01-03 10:00:00", "URGENT", None, [("J440", 10)]),
}

D_LABITEMS = [  # itemid, label, fluid, category
    (50963, "NTproBNP", "Blood", "Chemistry"),
    (51003, "Troponin T", "Blood", "Chemistry"),
    (50912, "Creatinine", "Blood", "Chemistry"),
    (51006, "Urea Nitrogen", "Blood", "Chemistry"),
    (50983, "Sodium", "Blood", "Chemistry"),
    (50971, "Potassium", "Blood", "Chemistry"),
    (50931, "Glucose", "Blood", "Chemistry"),
    (51301, "White Blood Cells", "Blood", "Hematology"),
    (51222, "Hemoglobin", "Blood", "Hematology"),
    (50811, "Hemoglobin", "Blood", "Blood Gas"),
    (51265, "Platelet Count", "Blood", "Hematology"),
    (50813, "Lactate", "Blood", "Blood Gas"),
    (50889, "C-Reactive Protein", "Blood", "Chemistry"),
    (50820, "pH", "Blood", "Blood Gas"),
    (51491, "pH", "Urine", "Hematology"),
    (50821, "pO2", "Blood", "Blood Gas"),
    (50818, "pCO2", "Blood", "Blood Gas"),
    (50868, "Anion Gap", "Blood", "Chemistry"),
]
_UNITS = {
    50963: "pg/mL",
    51003: "ng/mL",
    50912: "mg/dL",
    51006: "mg/dL",
    50983: "mEq/L",
    50971: "mEq/L",
    50931: "mg/dL",
    51301: "K/uL",
    51222: "g/dL",
    50811: "g/dL",
    51265: "K/uL",
    50813: "mmol/L",
    50889: "mg/L",
    50820: "units",
    51491: "units",
    50821: "mm Hg",
    50818: "mm Hg",
    50868: "mEq/L",
}

# subject, hadm_id, itemid, charttime, value (str), valuenum, ref_lo, ref_hi   -- what each row tests, to its right
LABS: list[tuple[int, int | None, int, str, str, float | None, float | None, float | None]] = [
    (CHF, 20000002, 50963, "2183-05-14 06:30:00", "4120", 4120.0, 0.0, 353.0),  # nearest before S_CHF_ADM
    (CHF, 20000002, 50963, "2183-05-13 07:00:00", "3900", 3900.0, 0.0, 353.0),  # older: not the nearest
    (CHF, 20000002, 50912, "2183-05-14 11:00:00", "2.9", 2.9, 0.5, 1.2),  # AFTER S_CHF_ADM: excluded
    (CHF, 20000002, 50912, "2183-05-13 20:00:00", "1.4", 1.4, 0.5, 1.2),  # 13.25 h before: used
    (CHF, 20000002, 51301, "2183-05-12 06:00:00", "9.1", 9.1, 4.0, 11.0),  # 51.25 h before: outside the window
    (CHF, 20000002, 51003, "2183-05-14 06:30:00", "<0.01", None, 0.0, 0.01),  # non-numeric: skipped
    (CHF, 20000002, 50868, "2183-05-14 06:30:00", "14", 14.0, 8.0, 20.0),  # not in the lab panel
    (CHF, 20000002, 51222, "2183-05-14 06:30:00", "10.1", 10.1, 12.0, 16.0),  # Hemoglobin tie: lower labevent_id
    (CHF, 20000002, 50811, "2183-05-14 06:30:00", "10.4", 10.4, 12.0, 16.0),  # ... wins over this one
    (CHF, None, 50963, "2183-05-10 13:00:00", "3650", 3650.0, 0.0, 353.0),  # S_CHF_ED, ED lab without hadm_id
    (CHF, None, 50813, "2183-05-10 15:10:00", "3.0", 3.0, 0.5, 2.0),  # after S_CHF_ED: excluded
    (CHF, None, 50813, "2183-05-10 12:40:00", "2.1", 2.1, 0.5, 2.0),  # before S_CHF_ED
    (PNA9, 20000003, 51301, "2152-01-05 16:00:00", "17.2", 17.2, 4.0, 11.0),  # after S_PNA9: excluded
    (PNA9, 20000003, 51301, "2152-01-03 09:00:00", "15.8", 15.8, 4.0, 11.0),  # 53.5 h before: outside window
    (PNA9, 20000003, 50813, "2152-01-05 14:30:00", "1.9", 1.9, 0.5, 2.0),  # exactly at the study: used (0.0 h)
    (PNA9, 20000003, 51491, "2152-01-05 10:00:00", "6.0", 6.0, 5.0, 8.0),  # urine pH: not the blood pH
    (SEPSIS, 20000006, 50813, "2141-07-15 21:00:00", "4.2", 4.2, 0.5, 2.0),
    (SEPSIS, 20000006, 51265, "2141-07-15 21:00:00", "95", 95.0, 150.0, 440.0),
    (SEPSIS, 20000006, 50889, "2141-07-15 21:00:00", "88.5", 88.5, None, None),  # no reference range
    (19999999, None, 50963, "2141-07-15 21:00:00", "100", 100.0, 0.0, 353.0),  # another patient
]

# ED vitalsign: subject, stay_id, charttime, temperature, heartrate, resprate, o2sat, sbp, dbp, rhythm, pain
VITALSIGN = [
    (CHF, 30000001, "2183-05-10 12:30:00", 100.9, 118.0, 26.0, 89.0, 102.0, 64.0, None, "5"),
    (CHF, 30000001, "2183-05-10 13:02:00", None, 112.0, 24.0, 91.0, 98.0, 60.0, "Sinus Tachycardia", "4"),
    (CHF, 30000001, "2183-05-10 15:00:00", 99.1, 130.0, 30.0, 86.0, 90.0, 55.0, None, "UTA"),  # after: excluded
    (SEPSIS, 30000002, "2141-07-15 19:30:00", 102.2, 125.0, 28.0, 93.0, 85.0, 50.0, None, "0"),
]

METADATA_COLUMNS = [
    "dicom_id",
    "subject_id",
    "study_id",
    "PerformedProcedureStepDescription",
    "ViewPosition",
    "Rows",
    "Columns",
    "StudyDate",
    "StudyTime",
    "ProcedureCodeSequence_CodeMeaning",
    "ViewCodeSequence_CodeMeaning",
    "PatientOrientationCodeSequence_CodeMeaning",
]
CHEXPERT_FILE_COLUMNS = [
    "subject_id",
    "study_id",
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Edema",
    "Enlarged Cardiomediastinum",
    "Fracture",
    "Lung Lesion",
    "Lung Opacity",
    "No Finding",
    "Pleural Effusion",
    "Pleural Other",
    "Pneumonia",
    "Pneumothorax",
    "Support Devices",
]
ADMISSIONS_COLUMNS = [
    "subject_id",
    "hadm_id",
    "admittime",
    "dischtime",
    "deathtime",
    "admission_type",
    "admit_provider_id",
    "admission_location",
    "discharge_location",
    "insurance",
    "language",
    "marital_status",
    "race",
    "edregtime",
    "edouttime",
    "hospital_expire_flag",
]
LABEVENTS_COLUMNS = [
    "labevent_id",
    "subject_id",
    "hadm_id",
    "specimen_id",
    "itemid",
    "charttime",
    "storetime",
    "value",
    "valuenum",
    "valueuom",
    "ref_range_lower",
    "ref_range_upper",
    "flag",
    "priority",
    "comments",
]
VITALSIGN_COLUMNS = [
    "subject_id",
    "stay_id",
    "charttime",
    "temperature",
    "heartrate",
    "resprate",
    "o2sat",
    "sbp",
    "dbp",
    "rhythm",
    "pain",
]
_VIEW_MEANING = {
    "PA": ("postero-anterior", "Erect"),
    "AP": ("antero-posterior", "Recumbent"),
    "LATERAL": ("lateral", "Erect"),
    "LL": ("left lateral", "Erect"),
}


@dataclass(frozen=True)
class FixturePaths:
    root: Path
    cxr_jpg: Path
    reports: Path
    mimic_iv: Path
    mimic_iv_ed: Path

    def build_argv(self, out: str | Path, *extra: str) -> list[str]:
        """The `launcher data build` arguments for this fixture."""
        return [
            "--cxr-jpg",
            str(self.cxr_jpg),
            "--reports",
            str(self.reports),
            "--mimic-iv",
            str(self.mimic_iv),
            "--mimic-iv-ed",
            str(self.mimic_iv_ed),
            "--out",
            str(out),
            *extra,
        ]


# ----------------------------------------------------------------------------------------------- writers
def _cell(v: Any) -> str:
    return "" if v is None else str(v)


def write_csv_gz(path: Path, header: list[str], rows: Iterable[Iterable[Any]]) -> None:
    """CSV as the releases write it: unquoted header, blank = null, quotes only where needed; gzip with mtime 0
    so the same fixture is the same bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow([_cell(v) for v in row])
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as f:
        f.write(text.getvalue().encode())


def dicom_id(study_id: int, k: int) -> str:
    h = hashlib.sha1(f"{study_id}-{k}".encode()).hexdigest()[:40]
    return "-".join(h[i : i + 8] for i in range(0, 40, 8))


def write_jpeg(path: Path, seed: int, size: tuple[int, int] = (64, 80)) -> None:
    """A small real grayscale JPEG that looks vaguely like a chest film (bright mediastinum, dark lungs)."""
    w, h = size
    rng = np.random.default_rng(seed)
    x = np.linspace(-1, 1, w)[None, :]
    y = np.linspace(-1, 1, h)[:, None]
    lungs = np.exp(-(((np.abs(x) - 0.45) / 0.28) ** 2) - ((y + 0.05) / 0.6) ** 2)
    img = 200 - 130 * lungs + rng.normal(0, 8, (h, w))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), mode="L").save(path, "JPEG", quality=85)


def _date_time(stamp: str) -> tuple[int, float]:
    """'2183-05-14 09:15:03.5' -> (21830514, 91503.5): StudyDate int and StudyTime float as in the metadata."""
    day, clock = stamp.split(" ")
    hh, mm, ss = clock.split(":")
    return int(day.replace("-", "")), float(f"{int(hh)}{mm}{ss}")


def _folder(subject: int) -> str:
    return f"p{str(subject)[:2]}/p{subject}"


# ----------------------------------------------------------------------------------------------- random filler
_SENTENCES = [
    "No acute cardiopulmonary process.",
    "Mild cardiomegaly.",
    "Small left pleural effusion.",
    "Right lower lobe opacity concerning for pneumonia.",
    "Mild pulmonary vascular congestion.",
    "Lungs are clear.",
    "No pneumothorax.",
    "Stable support devices.",
    "Bibasilar atelectasis.",
]
_CODES = [
    ("486", 9),
    ("J189", 10),
    ("I5023", 10),
    ("42823", 9),
    ("J441", 10),
    ("A419", 10),
    ("N179", 10),
    ("5849", 9),
    ("4019", 9),
    ("I10", 10),
    ("E119", 10),
    ("Z20822", 10),
    ("C3490", 10),
    ("J810", 10),
]


def _random_filler(n_subjects: int, seed: int) -> tuple[dict, dict, dict, list, list, list, dict]:
    """Seeded extra subjects in groups p12..p19: studies, reports, admissions, patients, labs, vitals, splits."""
    rng = np.random.default_rng(seed)
    studies, reports, admissions, patients, labs, vitals, splits = {}, {}, {}, [], [], [], {}
    study_id, hadm = 51000000, 21000000
    panel = [50963, 50912, 51301, 51222, 50813, 51265, 50983]
    for i in range(n_subjects):
        subject = int(12000000 + i * 1_000_003 % 8_000_000)
        splits[subject] = ("train", "train", "train", "validate", "test")[i % 5]
        year = int(rng.integers(2110, 2190))
        patients.append((subject, ("M", "F")[i % 2], int(rng.integers(20, 90)), year, "2014 - 2016", None))
        base = np.datetime64(f"{year}-01-01T00:00:00") + np.timedelta64(int(rng.integers(0, 300 * 86400)), "s")
        for k in range(int(rng.integers(1, 4))):
            study_id += 1
            t = base + np.timedelta64(int(k * 20 * 86400 + rng.integers(0, 86400)), "s")
            stamp = str(t).replace("T", " ")
            labels = {
                lab: float(rng.choice([1.0, 0.0, -1.0]))
                for lab in rng.choice(CHEXPERT_FILE_COLUMNS[2:], size=int(rng.integers(0, 5)), replace=False)
            }
            views = ["PA", "LATERAL"] if rng.random() < 0.6 else ["AP"]
            studies[study_id] = (subject, stamp, views, labels)
            text = " ".join(rng.choice(_SENTENCES, size=2, replace=False))
            reports[study_id] = f" FINAL REPORT\n FINDINGS:  {_SENTENCES[5]}\n \n IMPRESSION:  {text}\n"
            if rng.random() < 0.7:
                hadm += 1
                start = t - np.timedelta64(int(rng.integers(3600, 3 * 86400)), "s")
                end = t + np.timedelta64(int(rng.integers(3600, 5 * 86400)), "s")
                codes = [_CODES[j] for j in rng.choice(len(_CODES), size=int(rng.integers(1, 4)), replace=False)]
                admissions[hadm] = (
                    subject,
                    str(start).replace("T", " "),
                    str(end).replace("T", " "),
                    "EW EMER.",
                    None,
                    codes,
                )
            for item in rng.choice(panel, size=3, replace=False):
                when = t - np.timedelta64(int(rng.integers(-6 * 3600, 30 * 3600)), "s")
                v = round(float(rng.uniform(0.5, 20)), 1)
                labs.append((subject, None, int(item), str(when).replace("T", " "), str(v), v, 0.5, 15.0))
            if rng.random() < 0.5:
                when = t - np.timedelta64(int(rng.integers(0, 10 * 3600)), "s")
                vitals.append(
                    (
                        subject,
                        39000000 + study_id % 1000000,
                        str(when).replace("T", " "),
                        98.6,
                        float(rng.integers(60, 120)),
                        18.0,
                        96.0,
                        120.0,
                        80.0,
                        None,
                        "0",
                    )
                )
    return studies, reports, admissions, patients, labs, vitals, splits


# ----------------------------------------------------------------------------------------------- the fixture
def write_fixture(root: str | Path, *, extra_subjects: int = 0, seed: int = 0) -> FixturePaths:
    """Write the raw-format fixture under `root` (the SCENARIO, plus `extra_subjects` seeded random ones)."""
    root = Path(root)
    paths = FixturePaths(root, root / "mimic-cxr-jpg", root / "mimic-cxr", root / "mimiciv", root / "mimic-iv-ed")
    studies, reports, admissions = dict(STUDIES), dict(REPORTS), dict(ADMISSIONS)
    patients, labs, vitals, splits = list(PATIENTS), list(LABS), list(VITALSIGN), dict(SPLIT_OF)
    if extra_subjects:
        s, r, a, p, lb, v, sp = _random_filler(extra_subjects, seed)
        studies.update(s)
        reports.update(r)
        admissions.update(a)
        splits.update(sp)
        patients += p
        labs += lb
        vitals += v

    metadata, split_rows, chexpert_rows = [], [], []
    for study, (subject, stamp, views, labels) in sorted(studies.items()):
        date, time = _date_time(stamp)
        for k, view in enumerate(views):
            dicom = dicom_id(study, k)
            w, h = (64, 80) if view != "LATERAL" else (72, 80)
            meaning, orientation = _VIEW_MEANING[view]
            description = "CHEST (PA AND LAT)" if "PA" in views else "CHEST (PORTABLE AP)"
            metadata.append(
                (dicom, subject, study, description, view, h, w, date, time, description, meaning, orientation)
            )
            if study != S_P11_NO_SPLIT:
                split_rows.append((dicom, study, subject, splits[subject]))
            if study != S_NO_IMAGE:
                write_jpeg(
                    paths.cxr_jpg / "files" / _folder(subject) / f"s{study}" / f"{dicom}.jpg",
                    seed=int(hashlib.sha1(dicom.encode()).hexdigest()[:8], 16),
                )
        if labels is not None:
            chexpert_rows.append([subject, study] + [labels.get(c) for c in CHEXPERT_FILE_COLUMNS[2:]])
        if reports.get(study) is not None:
            path = paths.reports / "files" / _folder(subject) / f"s{study}.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(reports[study])

    # the releases list rows in no promised order; shuffle a little so the build cannot rely on it
    write_csv_gz(paths.cxr_jpg / "mimic-cxr-2.0.0-metadata.csv.gz", METADATA_COLUMNS, metadata[::-1])
    write_csv_gz(
        paths.cxr_jpg / "mimic-cxr-2.0.0-split.csv.gz", ["dicom_id", "study_id", "subject_id", "split"], split_rows
    )
    write_csv_gz(paths.cxr_jpg / "mimic-cxr-2.0.0-chexpert.csv.gz", CHEXPERT_FILE_COLUMNS, chexpert_rows)

    hosp = paths.mimic_iv / "hosp"
    write_csv_gz(
        hosp / "patients.csv.gz",
        ["subject_id", "gender", "anchor_age", "anchor_year", "anchor_year_group", "dod"],
        patients,
    )
    write_csv_gz(
        hosp / "admissions.csv.gz",
        ADMISSIONS_COLUMNS,
        [
            (
                subject,
                hadm,
                admit,
                disch,
                None,
                kind,
                "P12345",
                "EMERGENCY ROOM",
                "HOME",
                "Medicare",
                "ENGLISH",
                "MARRIED",
                "WHITE",
                edreg,
                None if edreg is None else admit,
                0,
            )
            for hadm, (subject, admit, disch, kind, edreg, _) in sorted(admissions.items())
        ],
    )
    write_csv_gz(
        hosp / "diagnoses_icd.csv.gz",
        ["subject_id", "hadm_id", "seq_num", "icd_code", "icd_version"],
        [
            (subject, hadm, seq, code, version)
            for hadm, (subject, *_, codes) in sorted(admissions.items())
            for seq, (code, version) in enumerate(codes, 1)
        ],
    )
    write_csv_gz(hosp / "d_labitems.csv.gz", ["itemid", "label", "fluid", "category"], D_LABITEMS)
    write_csv_gz(
        hosp / "labevents.csv.gz",
        LABEVENTS_COLUMNS,
        [
            (
                i,
                subject,
                hadm,
                90000000 + i,
                item,
                when,
                when,
                value,
                valuenum,
                _UNITS[item],
                lo,
                hi,
                "abnormal" if valuenum is not None and hi is not None and valuenum > hi else None,
                "STAT",
                None,
            )
            for i, (subject, hadm, item, when, value, valuenum, lo, hi) in enumerate(labs, start=1)
        ],
    )
    write_csv_gz(paths.mimic_iv_ed / "ed" / "vitalsign.csv.gz", VITALSIGN_COLUMNS, vitals)
    return paths


# ----------------------------------------------------------------------------------------------- big labevents
def write_labevents(
    path: str | Path,
    n_rows: int,
    *,
    subjects: np.ndarray,
    itemids: np.ndarray,
    start: str = "2150-01-01",
    days: int = 3650,
    seed: int = 0,
    chunk_rows: int = 500_000,
    subject_share: float = 0.05,
) -> int:
    """A raw-format labevents.csv.gz of `n_rows` rows, written in chunks (flat memory) with gzip level 1.

    `subject_share` of the rows belong to `subjects` (the studies' patients), the rest to other patients; itemids
    are drawn from `itemids` plus as many unrelated ones. Returns the file size in bytes.
    """
    import pyarrow as pa
    import pyarrow.csv as pacsv

    rng = np.random.default_rng(seed)
    t0 = np.datetime64(f"{start}T00:00:00").astype("datetime64[s]").astype(np.int64)
    all_items = np.concatenate([itemids, np.arange(51500, 51500 + len(itemids))])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=1) as f:
        f.write((",".join(LABEVENTS_COLUMNS) + "\n").encode())
        done = 0
        while done < n_rows:
            n = min(chunk_rows, n_rows - done)
            ours = rng.random(n) < subject_share
            subject = np.where(ours, rng.choice(subjects, n), rng.integers(10000000, 20000000, n))
            valuenum = np.round(rng.uniform(0.1, 200.0, n), 1)
            charttime = t0 + rng.integers(0, days * 86400, n)
            table = pa.table(
                {
                    "labevent_id": np.arange(done + 1, done + n + 1),
                    "subject_id": subject,
                    "hadm_id": pa.array(
                        np.where(rng.random(n) < 0.6, rng.integers(20000000, 30000000, n), 0), mask=rng.random(n) >= 0.6
                    ),
                    "specimen_id": rng.integers(1, 99999999, n),
                    "itemid": rng.choice(all_items, n),
                    "charttime": pa.array(charttime, pa.timestamp("s")),
                    "storetime": pa.array(charttime + 3600, pa.timestamp("s")),
                    "value": pa.array(valuenum).cast(pa.string()),
                    "valuenum": valuenum,
                    "valueuom": pa.array(np.array(["mg/dL", "mEq/L", "K/uL", "g/dL"])[rng.integers(0, 4, n)]),
                    "ref_range_lower": np.full(n, 1.0),
                    "ref_range_upper": np.full(n, 100.0),
                    "flag": pa.array(np.where(valuenum > 100, "abnormal", ""), mask=valuenum <= 100),
                    "priority": pa.array(np.array(["ROUTINE", "STAT"])[rng.integers(0, 2, n)]),
                    "comments": pa.nulls(n, pa.string()),
                }
            )
            pacsv.write_csv(table, f, pacsv.WriteOptions(include_header=False, quoting_style="none"))
            done += n
    return path.stat().st_size


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder to write the raw-format releases into")
    parser.add_argument("--extra-subjects", type=int, default=0, help="seeded random subjects added to the scenario")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    paths = write_fixture(args.out, extra_subjects=args.extra_subjects, seed=args.seed)
    print("launcher data build " + " ".join(paths.build_argv(Path(args.out) / "curriculum")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
