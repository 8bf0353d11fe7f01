"""Other synthetic generators in the same record format: test beds for "does the recipe learn data it was not tuned on".

    launcher data synth --out data/blocks --studies 1200 --seed 0 --style blocks

The default generator (datasets_io/synth.py) is the one the tiny recipe was tuned on. Each style here writes the same
record format and Patient Data layout (Age, Sex, Vitals {name: {value, unit}}, Labs {name: {value, unit,
reference_range}}, O2_device, Chronic_conditions) but:
- draws a different set of findings, differently (shapes, positions, polarity, contrast, noise, image size); only the
  style's `pixel_labels` are ever Positive, so every CheXpert label is a function of what is drawn;
- puts other fields, units and thresholds into the Patient Data block; every ICD flag is decided by exactly one EHR
  value against a threshold (`IcdRule`), the image never shows it.

Styles:
- `blocks`: 160 px, bright geometric shapes on a plain thorax, the lesion anywhere in either lung, strong pixel noise;
  SI-free US units (NT-proBNP, procalcitonin, BUN, respiratory rate).
- `inverted`: 224 x 192 (portrait), negative polarity (lungs bright, bone dark), one-sided findings on a random side,
  edema as Kerley-like stripes; SI units (BNP in pmol/L, creatinine in umol/L, temperature in F, pCO2 in kPa) and a
  "below threshold" rule (mean arterial pressure).
- `faint`: 96 px, low contrast (findings differ by ~0.1 of the range), the whole thorax shifted and scaled at
  random, a random gamma; lactate in mg/dL, CRP, eGFR (below threshold), NT-proBNP in ng/L.

Deterministic for a given (style, seed): every study draws from its own `np.random.default_rng`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from datasets_io.records import CHEXPERT_LABELS
from datasets_io.synth import NORMAL_PHRASES, POSITIVE_PHRASES, Study

Renderer = Callable[[dict[str, str], int, int, np.random.Generator], np.ndarray]


@dataclass(frozen=True)
class IcdRule:
    """One ICD flag decided by one EHR value: positive iff the value is above (or below) `threshold`.

    Values are drawn uniformly from `negative` or `positive` (both exclude the threshold by a margin, as lab reports
    of a clear case would), positive with probability `prevalence`.
    """

    flag: str
    section: str  # "Vitals" or "Labs"
    field: str
    unit: str
    threshold: float
    negative: tuple[float, float]
    positive: tuple[float, float]
    prevalence: float = 0.25
    below: bool = False  # True: the flag is positive when the value is BELOW the threshold
    digits: int = 1
    reference_range: tuple[float, float] | None = None  # Labs only

    def decides(self, value: float) -> bool:
        return value < self.threshold if self.below else value > self.threshold


@dataclass(frozen=True)
class Distractor:
    """An EHR value that decides nothing (so the model must find the field that matters)."""

    section: str
    field: str
    unit: str
    low: float
    high: float
    digits: int = 1
    reference_range: tuple[float, float] | None = None
    p_missing: float = 0.1


@dataclass(frozen=True)
class Style:
    name: str
    image_size: tuple[int, int]  # (H, W), the default when --image-size is not given
    pixel_labels: tuple[str, ...]
    prevalence: float
    render: Renderer
    icd_rules: tuple[IcdRule, ...]
    distractors: tuple[Distractor, ...]

    def make_studies(self, n_studies: int, seed: int) -> list[Study]:
        return make_studies(self, n_studies, seed)


# --------------------------------------------------------------------------------------------- labels, text, EHR
def draw_labels(style: Style, rng: np.random.Generator) -> dict[str, str]:
    """Each of the style's pixel labels Positive with `style.prevalence`; every other finding Negative; No Finding
    Positive when nothing is drawn."""
    labels = {name: "Negative" for name in CHEXPERT_LABELS}
    for name in style.pixel_labels:
        if rng.random() < style.prevalence:
            labels[name] = "Positive"
    if any(v == "Positive" for k, v in labels.items() if k not in ("No Finding", "Support Devices")):
        labels["No Finding"] = "Negative"
    else:
        labels["No Finding"] = "Positive"
    return labels


def write_impression(labels: dict[str, str], rng: np.random.Generator) -> str:
    parts = [str(rng.choice(POSITIVE_PHRASES[k])) for k, v in labels.items() if v == "Positive" and k != "No Finding"]
    return " ".join(parts) if parts else str(rng.choice(NORMAL_PHRASES))


def _entry(section: str, value: float, unit: str, reference_range) -> dict:
    entry = {"value": value, "unit": unit}
    if section == "Labs" and reference_range is not None:
        entry["reference_range"] = list(reference_range)
    return entry


def draw_ehr_and_icd(style: Style, patient: dict, rng: np.random.Generator) -> tuple[dict, dict[str, bool]]:
    """The Patient Data block and the ICD flags it decides (field order fixed per style, as in a real extract)."""
    sections: dict[str, dict] = {"Vitals": {}, "Labs": {}}
    icd = {}
    for rule in style.icd_rules:
        positive = rng.random() < rule.prevalence
        low, high = rule.positive if positive else rule.negative
        value = round(float(rng.uniform(low, high)), rule.digits)
        icd[rule.flag] = rule.decides(value)
        sections[rule.section][rule.field] = _entry(rule.section, value, rule.unit, rule.reference_range)
    for d in style.distractors:
        if rng.random() >= d.p_missing:
            value = round(float(rng.uniform(d.low, d.high)), d.digits)
            sections[d.section][d.field] = _entry(d.section, value, d.unit, d.reference_range)
    ehr = {
        "Age": patient["age"],
        "Sex": patient["sex"],
        "Vitals": dict(sorted(sections["Vitals"].items())),
        "Labs": dict(sorted(sections["Labs"].items())),
        "O2_device": "nasal cannula" if rng.random() < 0.2 else None,
        "Chronic_conditions": patient["chronic"],
    }
    return ehr, icd


def make_studies(style: Style, n_studies: int, seed: int) -> list[Study]:
    """Patients with 1-3 studies each, as in the default generator; seeds are salted with the style's name so two
    styles with one seed do not share draws."""
    salt = sum(ord(c) * 31**i for i, c in enumerate(style.name)) % 2**31
    studies: list[Study] = []
    subject_rng = np.random.default_rng([seed, salt, 0])
    k = 0
    while len(studies) < n_studies:
        subject_id = 10_000_000 + int(subject_rng.integers(0, 9_999_999))
        prng = np.random.default_rng([seed, salt, 1, subject_id])
        patient = {
            "age": int(prng.integers(20, 95)),
            "sex": str(prng.choice(["M", "F"])),
            "chronic": sorted(
                prng.choice(
                    ["hypertension", "diabetes", "copd", "ckd", "afib"], size=int(prng.integers(0, 3)), replace=False
                ).tolist()
            ),
        }
        for _ in range(int(prng.integers(1, 4))):
            if len(studies) >= n_studies:
                break
            rng = np.random.default_rng([seed, salt, 2, k])
            labels = draw_labels(style, rng)
            ehr, icd = draw_ehr_and_icd(style, patient, rng)
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


# --------------------------------------------------------------------------------------------- pixels
def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    return yy / h, xx / w  # relative coordinates in [0, 1)


def _ellipse(x, y, cx, cy, rx, ry) -> np.ndarray:
    return ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 < 1.0


def _to_uint8(img: np.ndarray) -> np.ndarray:
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def render_blocks(labels: dict[str, str], h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """Plain thorax; findings are bright or dark geometric shapes; strong per-pixel noise."""
    y, x = _grid(h, w)
    pos = {k for k, v in labels.items() if v == "Positive"}
    img = np.full((h, w), 0.1, np.float32)
    img[(x > 0.08) & (x < 0.92) & (y > 0.05)] = 0.45
    lungs = [(x > 0.15) & (x < 0.45) & (y > 0.15) & (y < 0.8), (x > 0.55) & (x < 0.85) & (y > 0.15) & (y < 0.8)]
    for lung in lungs:
        img[lung] = 0.2
    heart_half = 0.2 if "Cardiomegaly" in pos else 0.1
    img[(np.abs(x - 0.5) < heart_half) & (y > 0.5) & (y < 0.78)] = 0.75
    if "Pleural Effusion" in pos:  # a fluid level at a random height in both lower lungs
        level = rng.uniform(0.6, 0.68)
        img[(lungs[0] | lungs[1]) & (y > level)] = 0.65
    if "Pneumothorax" in pos:  # a black triangle at the top of a random lung
        side = int(rng.integers(0, 2))
        x0 = 0.15 if side == 0 else 0.55
        img[lungs[side] & ((y - 0.15) < 0.35 * (1 - (x - x0) / 0.3))] = 0.0
    if "Lung Lesion" in pos:  # a bright disc anywhere in either lung
        side = lungs[int(rng.integers(0, 2))]
        ys, xs = np.nonzero(side)
        i = int(rng.integers(0, len(ys)))
        img[_ellipse(x, y, xs[i] / w, ys[i] / h, 0.06, 0.06)] = 0.9
    if "Support Devices" in pos:  # a bright diagonal line
        img[np.abs(y - (0.1 + 0.8 * x)) < 0.012] = 1.0
    img += rng.normal(0, 0.08, size=(h, w)).astype(np.float32)
    return _to_uint8(img)


def render_inverted(labels: dict[str, str], h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """Negative polarity (air bright, tissue dark); findings on a random side; smooth background gradient."""
    y, x = _grid(h, w)
    pos = {k for k, v in labels.items() if v == "Positive"}
    img = np.full((h, w), 0.85, np.float32) - 0.15 * y
    img[_ellipse(x, y, 0.5, 0.55, 0.47, 0.5)] = 0.45
    centers = (0.3, 0.7)
    lungs = [_ellipse(x, y, cx, 0.48, 0.15, 0.32) for cx in centers]
    for lung in lungs:
        img[lung] = 0.8
    heart_rx = 0.22 if "Cardiomegaly" in pos else 0.12
    img[_ellipse(x, y, 0.5, 0.68, heart_rx, 0.13)] = 0.3
    side = int(rng.integers(0, 2))
    if "Pleural Effusion" in pos:  # one side only: the lower third of that lung goes dark
        img[lungs[side] & (y > 0.6)] = 0.35
    if "Edema" in pos:  # horizontal Kerley-like stripes in both lungs
        stripes = (np.sin(y * h * 0.9) > 0.3) & (y > 0.3)
        img[(lungs[0] | lungs[1]) & stripes] -= 0.35
    if "Consolidation" in pos:  # a dark blob in the middle of a random lung
        cy = rng.uniform(0.4, 0.6)
        img[lungs[side] & _ellipse(x, y, centers[side], cy, 0.09, 0.09)] = 0.25
    if "Atelectasis" in pos:  # a dark wedge from the hilum outwards
        wedge = lungs[1 - side] & (np.abs(y - 0.45) < 0.12 * np.abs(x - 0.5) / 0.35) & (np.abs(x - 0.5) > 0.05)
        img[wedge] = 0.4
    coarse = rng.normal(0, 0.05, size=(-(-h // 16), -(-w // 16)))  # blocky low-frequency mottle
    img += np.kron(coarse, np.ones((16, 16)))[:h, :w].astype(np.float32)
    img += rng.normal(0, 0.03, size=(h, w)).astype(np.float32)
    return _to_uint8(img)


def render_faint(labels: dict[str, str], h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """Low contrast; the thorax shifted and scaled at random; random gamma; findings ~0.1 of the range."""
    y, x = _grid(h, w)
    pos = {k for k, v in labels.items() if v == "Positive"}
    s = rng.uniform(0.85, 1.1)
    x = (x - 0.5 - rng.uniform(-0.06, 0.06)) / s + 0.5  # the thorax, moved and scaled
    y = (y - 0.5 - rng.uniform(-0.06, 0.06)) / s + 0.5
    img = np.full((h, w), 0.45, np.float32)
    img[_ellipse(x, y, 0.5, 0.55, 0.45, 0.5)] = 0.55
    lungs = [_ellipse(x, y, cx, 0.45, 0.17, 0.3) for cx in (0.31, 0.69)]
    for lung in lungs:
        img[lung] = 0.42
    heart_rx = 0.19 if "Cardiomegaly" in pos else 0.11
    img[_ellipse(x, y, 0.53, 0.63, heart_rx, 0.12)] = 0.6
    if "Lung Opacity" in pos:  # 2-4 soft blobs, +0.1
        for _ in range(int(rng.integers(2, 5))):
            side = int(rng.integers(0, 2))
            blob = _ellipse(x, y, (0.31, 0.69)[side] + rng.normal(0, 0.04), rng.uniform(0.35, 0.62), 0.07, 0.06)
            img[blob & lungs[side]] += 0.1
    if "Pleural Effusion" in pos:
        img[(lungs[0] | lungs[1]) & (y > 0.63)] = 0.56
    if "Pneumothorax" in pos:  # the left apex a little darker
        img[lungs[1] & (y < 0.35)] -= 0.1
    if "Fracture" in pos:  # a dark oblique line across a rib
        img[(np.abs(y - (0.25 + 0.4 * (x - 0.12))) < 0.015) & (x > 0.12) & (x < 0.4)] = 0.3
    img += rng.normal(0, 0.035, size=(h, w)).astype(np.float32)
    img = np.clip(img, 0, 1) ** rng.uniform(0.8, 1.25)
    return _to_uint8(img)


# --------------------------------------------------------------------------------------------- the styles
def _lab(flag, field, unit, thr, neg, posr, ref, digits=1, below=False, prevalence=0.25) -> IcdRule:
    return IcdRule(flag, "Labs", field, unit, thr, neg, posr, prevalence, below, digits, ref)


def _vital(flag, field, unit, thr, neg, posr, digits=0, below=False, prevalence=0.25) -> IcdRule:
    return IcdRule(flag, "Vitals", field, unit, thr, neg, posr, prevalence, below, digits)


STYLES: dict[str, Style] = {
    "blocks": Style(
        "blocks",
        (160, 160),
        ("Cardiomegaly", "Pleural Effusion", "Pneumothorax", "Lung Lesion", "Support Devices"),
        0.3,
        render_blocks,
        (
            _lab("chf_exacerbation", "NT-proBNP", "pg/mL", 900, (20, 700), (1100, 9000), (0, 125), digits=0),
            _lab("pneumonia", "Procalcitonin", "ng/mL", 0.5, (0.01, 0.4), (0.6, 8.0), (0, 0.1), digits=2),
            _vital("sepsis", "resp_rate", "breaths/min", 24, (12, 21), (26, 40)),
            _lab("acute_kidney_injury", "BUN", "mg/dL", 40, (8, 30), (45, 110), (7, 20), digits=0),
        ),
        (
            Distractor("Labs", "Sodium", "mmol/L", 128, 148, 0, (135, 145)),
            Distractor("Vitals", "sbp", "mmHg", 95, 170, 0),
        ),
    ),
    "inverted": Style(
        "inverted",
        (224, 192),
        ("Cardiomegaly", "Pleural Effusion", "Edema", "Consolidation", "Atelectasis"),
        0.3,
        render_inverted,
        (
            _vital("pneumonia", "temp_f", "F", 100.4, (97.0, 99.8), (101.0, 104.0), digits=1),
            _lab("chf_exacerbation", "BNP", "pmol/L", 100, (3, 80), (130, 900), (0, 29), digits=0),
            _lab("acute_kidney_injury", "Creatinine", "umol/L", 180, (50, 150), (200, 450), (45, 110), digits=0),
            _lab("copd_exacerbation", "pCO2", "kPa", 6.5, (4.5, 6.0), (7.0, 9.5), (4.7, 6.0)),
            _vital("sepsis", "map", "mmHg", 65, (70, 100), (45, 60), below=True),
        ),
        (Distractor("Labs", "Hemoglobin", "g/L", 90, 160, 0, (120, 170)),),
    ),
    "faint": Style(
        "faint",
        (96, 96),
        ("Cardiomegaly", "Lung Opacity", "Pleural Effusion", "Pneumothorax", "Fracture"),
        0.3,
        render_faint,
        (
            _lab("sepsis", "Lactate", "mg/dL", 36, (5, 30), (40, 90), (4.5, 19.8)),
            _lab("pneumonia", "CRP", "mg/L", 100, (1, 70), (120, 350), (0, 5), digits=0),
            _lab("chf_exacerbation", "NT-proBNP", "ng/L", 2000, (50, 1500), (2500, 15000), (0, 300), digits=0),
            _lab(
                "acute_kidney_injury", "eGFR", "mL/min/1.73m2", 30, (45, 110), (5, 25), (90, 120), digits=0, below=True
            ),
        ),
        (
            Distractor("Vitals", "heart_rate", "bpm", 55, 120, 0),
            Distractor("Vitals", "spo2", "%", 88, 100, 0),
            Distractor("Labs", "Potassium", "mmol/L", 3.2, 5.4, 1, (3.5, 5.0)),
        ),
    ),
}


def get_style(name: str) -> Style:
    """The named style; a clear error listing the known ones otherwise."""
    if name not in STYLES:
        raise ValueError(f"unknown synth style {name!r}; known: default, {', '.join(STYLES)}")
    return STYLES[name]
