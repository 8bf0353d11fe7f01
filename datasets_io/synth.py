"""A synthetic MIMIC-like curriculum with real, learnable signal.

    launcher data synth --out data/synth --studies 1200 --seed 0 [--image-size 3056 2544] [--ehr-detail mimic]

What carries the signal (so "it learns" can be measured):
- pixels -> CheXpert: the findings are drawn (enlarged heart shadow, blunted/filled costophrenic angle, a lung apex
  without markings for pneumothorax, patchy opacities, bright tube lines for support devices, perihilar haze for
  edema, a dense lower-zone blob for consolidation, a band for atelectasis, a round nodule for a lung lesion);
- impression text is consistent with the labels (varied templates, negation and uncertainty phrases);
- EHR -> ICD: most ICD flags are decided by EHR values the image does not show (BNP for CHF exacerbation,
  temperature and white cells for pneumonia, creatinine for AKI, lactate + heart rate for sepsis, COPD history +
  low SpO2 for a COPD exacerbation). pulmonary_edema and lung_mass follow image findings.

`--ehr-detail mimic` writes Patient Data blocks as large as `launcher data build`'s (15 labs with unit, reference
range and hours before the study, 6 ED vitals, admission type), so real prompt lengths are exercised here.

Deterministic for a given seed: every study draws from its own `np.random.default_rng([seed, index])`.
Split by patient (about 10% of patients go to validation).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image
from tqdm import tqdm

from datasets_io.records import (
    CHEXPERT_LABELS,
    prompt_a,
    prompt_b,
    target_a,
    target_b,
)

if TYPE_CHECKING:  # the styles import this module's Study
    from datasets_io.synth_styles import Style

# Per-finding (P(positive), P(uncertain)) -- roughly MIMIC-CXR prevalences, common ones raised a bit for learnability.
PREVALENCE = {
    "Enlarged Cardiomediastinum": (0.05, 0.03),
    "Cardiomegaly": (0.22, 0.03),
    "Lung Lesion": (0.05, 0.01),
    "Lung Opacity": (0.25, 0.03),
    "Edema": (0.14, 0.04),
    "Consolidation": (0.07, 0.03),
    "Pneumonia": (0.08, 0.05),
    "Atelectasis": (0.20, 0.04),
    "Pneumothorax": (0.08, 0.01),
    "Pleural Effusion": (0.24, 0.03),
    "Pleural Other": (0.02, 0.01),
    "Fracture": (0.03, 0.01),
    "Support Devices": (0.25, 0.0),
}

# The findings render_xray draws (faintly when Uncertain). Pneumonia is not drawn: a Positive one makes Lung Opacity
# Positive (draw_labels), so the image shows the opacity, not the pneumonia. No Finding is Positive when nothing is.
DRAWN_FINDINGS = tuple(label for label in PREVALENCE if label != "Pneumonia")

POSITIVE_PHRASES = {
    "Enlarged Cardiomediastinum": ["Widened mediastinal contour.", "The cardiomediastinal silhouette is enlarged."],
    "Cardiomegaly": ["Moderate cardiomegaly.", "The heart is enlarged.", "Enlarged cardiac silhouette."],
    "Lung Lesion": ["Rounded nodular opacity in the right mid lung.", "A pulmonary nodule is seen."],
    "Lung Opacity": ["Patchy opacities in the lung bases.", "Scattered airspace opacities."],
    "Edema": ["Mild pulmonary edema.", "Perihilar haziness consistent with interstitial edema."],
    "Consolidation": ["Left lower lobe consolidation.", "Dense consolidation in the left base."],
    "Pneumonia": ["Findings concerning for pneumonia.", "Consolidation may reflect pneumonia."],
    "Atelectasis": ["Bibasilar atelectasis.", "Linear atelectasis at the right base."],
    "Pneumothorax": ["Small right apical pneumothorax.", "Right pneumothorax is present."],
    "Pleural Effusion": ["Small bilateral pleural effusions.", "Blunting of the costophrenic angles from effusion."],
    "Pleural Other": ["Pleural thickening at the apex."],
    "Fracture": ["Healed right rib fracture.", "Old rib fracture deformity."],
    "Support Devices": ["Endotracheal tube and enteric tube in standard position.", "Lines and tubes are in place."],
}
UNCERTAIN_PREFIX = ["Possible", "Cannot exclude", "Questionable"]
UNCERTAIN_NOUN = {
    "Enlarged Cardiomediastinum": "mediastinal widening",
    "Cardiomegaly": "mild cardiomegaly",
    "Lung Lesion": "a small nodule",
    "Lung Opacity": "a subtle opacity",
    "Edema": "mild edema",
    "Consolidation": "early consolidation",
    "Pneumonia": "early pneumonia",
    "Atelectasis": "subsegmental atelectasis",
    "Pneumothorax": "a tiny pneumothorax",
    "Pleural Effusion": "a trace effusion",
    "Pleural Other": "pleural thickening",
    "Fracture": "a rib fracture",
    "Support Devices": "a support device",
}
NEGATIVE_PHRASES = {
    "Pneumothorax": ["No pneumothorax.", "There is no pneumothorax."],
    "Pleural Effusion": ["No pleural effusion.", "No effusion."],
    "Consolidation": ["No focal consolidation."],
    "Edema": ["No pulmonary edema."],
    "Cardiomegaly": ["Heart size is normal.", "Normal cardiac silhouette."],
}
NORMAL_PHRASES = [
    "No acute cardiopulmonary process.",
    "No acute intrathoracic abnormality.",
    "Normal chest radiograph.",
]

CHRONIC = ["hypertension", "diabetes", "chf", "copd", "ckd", "afib", "cad", "asthma"]


@dataclass(frozen=True)
class Study:
    subject_id: int
    study_id: int
    dicom_id: str
    chexpert: dict[str, str]
    impression: str
    ehr: dict
    icd: dict[str, bool]

    @property
    def image_rel(self) -> str:
        s = str(self.subject_id)
        return f"files/p{s[:2]}/p{s}/s{self.study_id}/{self.dicom_id}.jpg"


# --------------------------------------------------------------------------------------------- labels and text
def draw_labels(rng: np.random.Generator) -> dict[str, str]:
    labels = {}
    for name, (p_pos, p_unc) in PREVALENCE.items():
        u = rng.random()
        labels[name] = "Positive" if u < p_pos else "Uncertain" if u < p_pos + p_unc else "Negative"
    # Clinically coupled findings: pneumonia mostly with opacity/consolidation, opacity with consolidation.
    if labels["Consolidation"] == "Positive" or labels["Pneumonia"] == "Positive":
        labels["Lung Opacity"] = "Positive"
    any_finding = any(v != "Negative" for k, v in labels.items() if k != "Support Devices")
    labels = {"No Finding": "Negative" if any_finding else "Positive", **labels}
    return {k: labels[k] for k in CHEXPERT_LABELS}


def write_impression(labels: dict[str, str], rng: np.random.Generator) -> str:
    parts = []
    for name, value in labels.items():
        if name == "No Finding":
            continue
        if value == "Positive":
            parts.append(str(rng.choice(POSITIVE_PHRASES[name])))
        elif value == "Uncertain":
            parts.append(f"{rng.choice(UNCERTAIN_PREFIX)} {UNCERTAIN_NOUN[name]}.")
    if not parts:
        return str(rng.choice(NORMAL_PHRASES))
    for name, options in NEGATIVE_PHRASES.items():  # pertinent negatives, sometimes
        if labels[name] == "Negative" and rng.random() < 0.3:
            parts.append(str(rng.choice(options)))
    return " ".join(parts)


# --------------------------------------------------------------------------------------------- EHR and ICD
def _q(x: float, digits: int = 1) -> float:
    return round(float(x), digits)


def draw_ehr_and_icd(labels: dict[str, str], patient: dict, rng: np.random.Generator) -> tuple[dict, dict[str, bool]]:
    pos = {k for k, v in labels.items() if v == "Positive"}
    chronic = patient["chronic"]
    # Latent conditions, partly correlated with the image but decided independently: the EHR tells them apart.
    chf = rng.random() < (0.45 if ("Edema" in pos or "Cardiomegaly" in pos) else 0.08) + (
        0.1 if "chf" in chronic else 0
    )
    pneumonia = rng.random() < (0.55 if ("Lung Opacity" in pos or "Consolidation" in pos) else 0.07)
    aki = rng.random() < 0.15 + (0.15 if "ckd" in chronic else 0)
    sepsis = rng.random() < (0.25 if pneumonia else 0.05)
    copd_ex = "copd" in chronic and rng.random() < 0.5

    bnp = rng.uniform(450, 3000) if chf else rng.uniform(10, 300)
    wbc = rng.uniform(12.5, 22) if pneumonia else rng.uniform(4.5, 10.5)
    temp = rng.uniform(38.2, 39.8) if pneumonia else rng.uniform(36.2, 37.6)
    creat = rng.uniform(1.8, 4.5) if aki else rng.uniform(0.6, 1.3)
    lactate = rng.uniform(2.5, 6.0) if sepsis else rng.uniform(0.5, 1.8)
    hr = rng.uniform(105, 140) if sepsis else rng.uniform(60, 98)
    spo2 = rng.uniform(84, 90) if copd_ex else rng.uniform(93, 99)
    vitals = {
        "heart_rate": {"value": _q(hr), "unit": "bpm"},
        "temperature": {"value": _q(temp), "unit": "C"},
        "spo2": {"value": _q(spo2), "unit": "%"},
    }
    labs = {
        "BNP": {"value": _q(bnp, 0), "unit": "pg/mL", "reference_range": [0, 100]},
        "WBC": {"value": _q(wbc), "unit": "K/uL", "reference_range": [4.0, 11.0]},
        "Creatinine": {"value": _q(creat), "unit": "mg/dL", "reference_range": [0.5, 1.2]},
        "Lactate": {"value": _q(lactate), "unit": "mmol/L", "reference_range": [0.5, 2.0]},
    }
    # Real EHR extracts are incomplete: drop some fields (never the one that decides a positive flag).
    for key in list(labs):
        if rng.random() < 0.05 and not {"BNP": chf, "WBC": pneumonia, "Creatinine": aki, "Lactate": sepsis}[key]:
            del labs[key]
    support = "Support Devices" in pos
    o2 = (
        "ventilator"
        if support and rng.random() < 0.6
        else ("nasal cannula" if spo2 < 92 or rng.random() < 0.15 else None)
    )
    ehr = {
        "Age": patient["age"],
        "Sex": patient["sex"],
        "Vitals": vitals,
        "Labs": labs,
        "O2_device": o2,
        "Chronic_conditions": sorted(chronic),
    }
    icd = {
        "pneumonia": bool(pneumonia),
        "pulmonary_edema": "Edema" in pos,
        "lung_mass": "Lung Lesion" in pos,
        "chf_exacerbation": bool(chf),
        "copd_exacerbation": bool(copd_ex),
        "sepsis": bool(sepsis),
        "acute_kidney_injury": bool(aki),
    }
    return ehr, icd


# Normal ranges of the MIMIC build's lab panel (mimic_build.ehr.LAB_PANEL): name -> (unit, lo, hi, digits).
# The values that carry the ICD signal (NT-proBNP, WBC, Creatinine, Lactate) come from the basic draw.
MIMIC_LABS: dict[str, tuple[str, float, float, int]] = {
    "NT-proBNP": ("pg/mL", 0.0, 300.0, 0),
    "Troponin T": ("ng/mL", 0.0, 0.01, 2),
    "Creatinine": ("mg/dL", 0.5, 1.2, 1),
    "BUN": ("mg/dL", 6.0, 20.0, 0),
    "Sodium": ("mEq/L", 133.0, 145.0, 0),
    "Potassium": ("mEq/L", 3.3, 5.1, 1),
    "Glucose": ("mg/dL", 70.0, 100.0, 0),
    "WBC": ("K/uL", 4.0, 11.0, 1),
    "Hemoglobin": ("g/dL", 12.0, 16.0, 1),
    "Platelets": ("K/uL", 150.0, 440.0, 0),
    "Lactate": ("mmol/L", 0.5, 2.0, 1),
    "CRP": ("mg/L", 0.0, 5.0, 1),
    "pH": ("units", 7.35, 7.45, 2),
    "pO2": ("mm Hg", 85.0, 105.0, 0),
    "pCO2": ("mm Hg", 35.0, 45.0, 0),
}
MIMIC_VITALS: dict[str, tuple[str, float, float]] = {  # MIMIC-IV-ED vitalsign conventions (mimic_build.ehr.VITALS)
    "temperature": ("degF", 97.0, 99.5),
    "heart_rate": ("bpm", 60, 100),
    "resp_rate": ("breaths/min", 12, 20),
    "o2_sat": ("%", 94, 100),
    "sbp": ("mmHg", 100, 140),
    "dbp": ("mmHg", 60, 90),
}
ADMISSION_TYPES = ("EW EMER.", "URGENT", "OBSERVATION ADMIT", "ELECTIVE", "DIRECT EMER.")


def mimic_detail_ehr(ehr: dict, rng: np.random.Generator) -> dict:
    """The basic EHR widened to what `launcher data build` writes: the whole lab panel with unit, reference range
    and hours before the study, six ED vitals with hours before, and the admission type. The signal values of the
    basic block are kept (BNP becomes NT-proBNP, temperature is given in degF, SpO2 as o2_sat)."""
    signal = {
        "NT-proBNP": ehr["Labs"].get("BNP"),
        "WBC": ehr["Labs"].get("WBC"),
        "Creatinine": ehr["Labs"].get("Creatinine"),
        "Lactate": ehr["Labs"].get("Lactate"),
    }
    labs = {}
    for name, (unit, lo, hi, digits) in MIMIC_LABS.items():
        if signal.get(name) is None and rng.random() < 0.12:  # real panels are incomplete
            continue
        value = signal[name]["value"] if signal.get(name) else rng.normal((lo + hi) / 2, (hi - lo) / 3)
        if name == "NT-proBNP" and signal[name]:
            value *= 3.0  # NT-proBNP runs ~3x BNP
        labs[name] = {
            "value": _q(max(value, 0.0), digits),
            "unit": unit,
            "reference_range": [lo, hi],
            "hours_before": _q(rng.uniform(0.2, 24.0)),
        }
    basic = ehr["Vitals"]
    known = {
        "temperature": basic["temperature"]["value"] * 9 / 5 + 32,
        "heart_rate": basic["heart_rate"]["value"],
        "o2_sat": basic["spo2"]["value"],
    }
    vitals = {
        name: {
            "value": _q(known.get(name, rng.uniform(lo, hi))),
            "unit": unit,
            "hours_before": _q(rng.uniform(0.1, 12.0)),
        }
        for name, (unit, lo, hi) in MIMIC_VITALS.items()
    }
    return {
        "Age": ehr["Age"],
        "Sex": ehr["Sex"],
        "Admission_type": str(rng.choice(ADMISSION_TYPES)),
        "Vitals": vitals,
        "Labs": labs,
        "O2_device": ehr["O2_device"],
        "Chronic_conditions": ehr["Chronic_conditions"],
    }


# --------------------------------------------------------------------------------------------- pixels
def render_xray(labels: dict[str, str], height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """A frontal chest film as uint8 (H, W). Geometry is in relative coordinates so any size works.

    Uncertain findings are drawn faintly. Costs ~O(H*W) numpy work per finding.
    """
    h, w = height, width
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    y, x = yy / h, xx / w  # relative coordinates in [0, 1)
    strength = {k: (1.0 if v == "Positive" else 0.45 if v == "Uncertain" else 0.0) for k, v in labels.items()}
    jitter = lambda s=0.02: float(rng.normal(0, s))  # noqa: E731

    img = np.full((h, w), 0.18, np.float32)
    body = ((x - 0.5) / 0.46) ** 2 + ((y - 0.55) / 0.55) ** 2 < 1.0
    img[body] = 0.55
    # Lungs: two dark ellipses with vessel-like markings (fine texture) inside.
    cy = 0.45 + jitter()
    lungs = []
    for cx in (0.31 + jitter(), 0.69 + jitter()):
        lung = ((x - cx) / 0.16) ** 2 + ((y - cy) / 0.3) ** 2 < 1.0
        lungs.append(lung)
        img[lung] = 0.22
    lung_any = lungs[0] | lungs[1]
    markings = (np.sin(xx * (40.0 / w) * math.pi + rng.uniform(0, 6)) * np.sin(yy * (55.0 / h) * math.pi)) > 0.7
    img[lung_any & markings] += 0.07
    # Diaphragm: a bright dome below each lung.
    img[y > cy + 0.3 - 0.04 * np.cos((x - 0.5) * 6)] = np.maximum(img[y > cy + 0.3 - 0.04 * np.cos((x - 0.5) * 6)], 0.6)

    # Heart: the width of the bright shadow is the cardiomegaly signal.
    heart_w = 0.11 + 0.09 * strength["Cardiomegaly"] + jitter(0.008)
    heart = ((x - 0.53) / heart_w) ** 2 + ((y - (cy + 0.16)) / 0.13) ** 2 < 1.0
    img[heart] = 0.7
    med_w = 0.045 + 0.04 * strength["Enlarged Cardiomediastinum"]
    img[(np.abs(x - 0.5) < med_w) & (y < cy) & (y > 0.08)] = 0.65

    if strength["Pleural Effusion"]:  # fill the costophrenic angles: a bright meniscus at each lung base
        level = cy + 0.3 - 0.16 * strength["Pleural Effusion"]
        img[lung_any & (y > level)] = 0.62
    if strength["Pneumothorax"]:  # right apex: a black region with no markings, and a thin pleural edge
        ptx = lungs[0] & (y < cy - 0.05) & (x < 0.3)
        img[ptx] = 0.05 + 0.1 * (1 - strength["Pneumothorax"])
        edge = lungs[0] & (np.abs(x - 0.3) < 0.006) & (y < cy - 0.05)
        img[edge] = 0.6
    if strength["Lung Opacity"]:  # patchy opacities
        for _ in range(int(rng.integers(3, 6))):
            side = lungs[int(rng.integers(0, 2))]
            py, px = rng.uniform(cy - 0.05, cy + 0.22), (0.31 if side is lungs[0] else 0.69) + rng.normal(0, 0.05)
            blob = ((x - px) / 0.05) ** 2 + ((y - py) / 0.04) ** 2 < 1.0
            img[blob & side] += 0.28 * strength["Lung Opacity"]
    if strength["Consolidation"]:
        blob = ((x - 0.7) / 0.09) ** 2 + ((y - (cy + 0.17)) / 0.08) ** 2 < 1.0
        img[blob & lungs[1]] = 0.58
    if strength["Edema"]:  # bilateral perihilar haze
        haze = np.exp(-(((x - 0.5) / 0.22) ** 2 + ((y - cy) / 0.18) ** 2))
        img += 0.22 * strength["Edema"] * haze * lung_any
    if strength["Atelectasis"]:  # a bright horizontal band at the right base
        band = lungs[0] & (np.abs(y - (cy + 0.2)) < 0.012)
        img[band] += 0.3 * strength["Atelectasis"]
    if strength["Lung Lesion"]:
        nod = ((x - 0.28) / 0.025) ** 2 + ((y - (cy - 0.02)) / 0.02) ** 2 < 1.0
        img[nod] = 0.75
    if strength["Support Devices"]:  # bright lines: an endotracheal tube and a line crossing the chest
        img[(np.abs(x - 0.5 - 0.03 * y) < 0.007) & (y < cy + 0.05)] = 0.97
        img[(np.abs(y - (0.2 + 0.6 * x)) < 0.006) & (x > 0.55) & (x < 0.85)] = 0.95
    if strength["Fracture"]:
        img[(np.abs(y - (cy - 0.15 + 0.2 * (x - 0.2))) < 0.004) & (x > 0.15) & (x < 0.3)] = 0.1
    if strength["Pleural Other"]:
        img[lungs[1] & (y < cy - 0.22)] = 0.5

    # Film grain: mostly low-frequency mottle (a coarse noise field upsampled) plus a little per-pixel noise, so a
    # MIMIC-size JPEG is ~1 MB like the real ones rather than a high-entropy noise file.
    coarse = rng.normal(0, 0.03, size=(max(2, h // 12), max(2, w // 12))).astype(np.float32)
    img += np.asarray(Image.fromarray(coarse, mode="F").resize((w, h), Image.BILINEAR))
    img += rng.normal(0, 0.008, size=(h, w)).astype(np.float32)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------- the curriculum
EHR_DETAILS = ("basic", "mimic")


def make_studies(n_studies: int, seed: int, ehr_detail: str = "basic") -> list[Study]:
    """Patients with 1-3 studies each; every study draws from its own generator (deterministic by index).

    `ehr_detail="mimic"` widens each Patient Data block to the MIMIC build's size (mimic_detail_ehr) from a separate
    generator, so ids, labels, impressions and ICD flags are the same as with "basic"."""
    if ehr_detail not in EHR_DETAILS:
        raise ValueError(f"ehr_detail={ehr_detail!r}: expected one of {EHR_DETAILS}")
    studies: list[Study] = []
    subject_rng = np.random.default_rng([seed, 0])
    k = 0
    while len(studies) < n_studies:
        subject_id = 10_000_000 + int(subject_rng.integers(0, 9_999_999))
        prng = np.random.default_rng([seed, 1, subject_id])
        n_chronic = int(prng.integers(0, 3))
        patient = {
            "age": int(prng.integers(25, 92)),
            "sex": str(prng.choice(["M", "F"])),
            "chronic": set(prng.choice(CHRONIC, size=n_chronic, replace=False).tolist()),
        }
        for _ in range(int(prng.integers(1, 4))):
            if len(studies) >= n_studies:
                break
            rng = np.random.default_rng([seed, 2, k])
            labels = draw_labels(rng)
            ehr, icd = draw_ehr_and_icd(labels, patient, rng)
            if ehr_detail == "mimic":
                ehr = mimic_detail_ehr(ehr, np.random.default_rng([seed, 5, k]))
            dicom = "-".join(f"{int(v):08x}" for v in rng.integers(0, 2**32, size=5))
            studies.append(
                Study(
                    subject_id,
                    50_000_000 + int(rng.integers(0, 9_999_999)),
                    dicom,
                    labels,
                    write_impression(labels, rng),
                    ehr,
                    icd,
                )
            )
            k += 1
    return studies


def study_rows(study: Study) -> list[dict]:
    common = {"study_id": str(study.study_id), "image": study.image_rel}
    return [
        {
            **common,
            "prompt": prompt_a(),
            "target": target_a(study.impression, study.chexpert),
            "mode": "image_only",
            "stage": "A",
        },
        {
            **common,
            "prompt": prompt_b(study.ehr),
            "target": target_b(study.impression, study.chexpert, study.icd),
            "mode": "image_ehr",
            "stage": "B",
        },
    ]


def write_synthetic(
    out: str | Path,
    n_studies: int,
    seed: int,
    image_size: tuple[int, int] = (256, 256),
    val_fraction: float = 0.1,
    progress: bool = True,
    ehr_detail: str = "basic",
    style: Style | None = None,
) -> dict:
    """Write curriculum_{train,val}.jsonl and the JPEGs under `out`. Returns a summary dict.
    `ehr_detail`: "basic" (the demo's short Patient Data) or "mimic" (MIMIC-build-size blocks, see mimic_detail_ehr).
    `style` (datasets_io/synth_styles.py) swaps in another generator's studies and renderer; None = this module's."""
    out = Path(out)
    if not 0.0 <= val_fraction <= 1.0:
        raise ValueError(f"val_fraction={val_fraction}: expected a fraction of the patients, 0 to 1")
    if style is not None and ehr_detail != "basic":
        raise ValueError("ehr_detail applies to the default generator only, not to a --style")
    studies = style.make_studies(n_studies, seed) if style else make_studies(n_studies, seed, ehr_detail)
    render = style.render if style else render_xray
    subjects = sorted({s.subject_id for s in studies})
    split_rng = np.random.default_rng([seed, 3])
    n_val = max(1, round(len(subjects) * val_fraction)) if len(subjects) > 1 else 0
    val_subjects = set(split_rng.choice(subjects, size=n_val, replace=False).tolist()) if n_val else set()
    h, w = image_size
    counts = {"train": 0, "val": 0}
    out.mkdir(parents=True, exist_ok=True)
    files = {name: open(out / f"curriculum_{name}.jsonl.tmp", "w") for name in counts}
    try:
        for i, study in enumerate(tqdm(studies, desc="synth studies", unit="study", disable=not progress)):
            path = out / study.image_rel
            path.parent.mkdir(parents=True, exist_ok=True)
            pixels = render(study.chexpert, h, w, np.random.default_rng([seed, 4, i]))
            Image.fromarray(pixels, mode="L").save(path, quality=90)
            split = "val" if study.subject_id in val_subjects else "train"
            for row in study_rows(study):
                files[split].write(json.dumps(row) + "\n")
                counts[split] += 1
    finally:
        for f in files.values():
            f.close()
    for name in counts:  # atomic: a half-written curriculum never looks complete
        os.replace(out / f"curriculum_{name}.jsonl.tmp", out / f"curriculum_{name}.jsonl")
    return {
        "studies": len(studies),
        "patients": len(subjects),
        "val_patients": len(val_subjects),
        "rows": counts,
        "image_size": [h, w],
        "seed": seed,
        "ehr_detail": ehr_detail,
        **({"style": style.name} if style else {}),
    }
