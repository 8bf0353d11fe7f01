"""The curriculum record: its templates, its validation and the target parser.

One module owns the format (see README "Data format"), so training, evaluation, inference and the synthetic
generator all agree on it. Templates are exactly the seed's:

    Stage A prompt:  Image:<image>\\nAnswer Impression & CheXpert.
    Stage A target:  Impression: {impression}\\n\\nCheXpert:\\n{chexpert_json}
    Stage B prompt:  Patient Data:\\n{ehr_json}\\n\\nImage:<image>\\nAnswer Impression, CheXpert & ICD.
    Stage B target:  the Stage A target + \\n\\nICD:\\n{icd_json}

JSON blocks are ``json.dumps(obj, indent=2)``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

IMAGE_TOKEN = "<image>"

CHEXPERT_LABELS: tuple[str, ...] = (
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Lesion",
    "Lung Opacity",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)
CHEXPERT_5: tuple[str, ...] = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")
CHEXPERT_VALUES: tuple[str, ...] = ("Positive", "Negative", "Uncertain")

# ICD flags this project's data uses (the original had pneumonia, pulmonary_edema, lung_mass, chf_exacerbation
# "and a few others of the same kind"). Readers accept any flag name.
ICD_FLAGS: tuple[str, ...] = (
    "pneumonia",
    "pulmonary_edema",
    "lung_mass",
    "chf_exacerbation",
    "copd_exacerbation",
    "sepsis",
    "acute_kidney_injury",
)
ICD_NONE = {"findings": "None"}

STAGE_MODES = {"A": "image_only", "B": "image_ehr"}
REQUIRED_KEYS: dict[str, type] = {
    "study_id": str,
    "image": str,
    "prompt": str,
    "target": str,
    "mode": str,
    "stage": str,
}

PROMPT_A = "Image:<image>\nAnswer Impression & CheXpert."
PROMPT_B_TAIL = "\n\nImage:<image>\nAnswer Impression, CheXpert & ICD."


class RecordError(ValueError):
    """A bad record: says where (file:line), which field and why."""

    def __init__(self, where: str, field_name: str, reason: str):
        self.where, self.field, self.reason = where, field_name, reason
        super().__init__(f"{where}: field '{field_name}': {reason}")


@dataclass(frozen=True)
class Record:
    study_id: str
    image: str
    prompt: str
    target: str
    mode: str
    stage: str
    where: str = ""  # "file:line", for error messages downstream

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in REQUIRED_KEYS}


@dataclass
class ParsedTarget:
    """What a target (or a generated report) says. `valid` is False when a block is missing or malformed."""

    impression: str | None = None
    chexpert: dict[str, str] | None = None
    icd: dict[str, bool] | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def valid(self) -> bool:
        return not self.problems


# --------------------------------------------------------------------------------------------- rendering
def dump_block(obj: Any) -> str:
    return json.dumps(obj, indent=2)


def prompt_a() -> str:
    return PROMPT_A


def prompt_b(ehr: dict[str, Any] | None) -> str:
    """Stage B prompt. `ehr=None` or `{}` renders the emptied Patient Data block used for EHR-off / EHR dropout."""
    return "Patient Data:\n" + dump_block(ehr or {}) + PROMPT_B_TAIL


def target_a(impression: str, chexpert: dict[str, str]) -> str:
    return f"Impression: {impression}\n\nCheXpert:\n{dump_block(chexpert)}"


def target_b(impression: str, chexpert: dict[str, str], icd_flags: dict[str, bool]) -> str:
    icd = {k: True for k, v in icd_flags.items() if v} or dict(ICD_NONE)
    return target_a(impression, chexpert) + "\n\nICD:\n" + dump_block(icd)


def ehr_from_prompt(prompt: str) -> dict[str, Any] | None:
    """The Patient Data block of a Stage B prompt (None when the prompt has none or it does not parse)."""
    if not prompt.startswith("Patient Data:\n") or PROMPT_B_TAIL not in prompt:
        return None
    body = prompt[len("Patient Data:\n") : prompt.rindex(PROMPT_B_TAIL)]
    try:
        value = json.loads(body)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def with_empty_ehr(prompt: str) -> str:
    """The same Stage B prompt with the Patient Data block emptied (the EHR-off arm and EHR dropout)."""
    if ehr_from_prompt(prompt) is None:
        raise ValueError("not a Stage B prompt with a Patient Data block")
    return prompt_b({})


# --------------------------------------------------------------------------------------------- parsing
_BLOCK_RE = re.compile(r"(?:^|\n)\s*(Impression|CheXpert|ICD)\s*:", re.IGNORECASE)


def _first_json_object(text: str) -> tuple[Any, str | None]:
    """Decode the first JSON object in `text`; returns (value, problem)."""
    start = text.find("{")
    if start < 0:
        return None, "no JSON object"
    try:
        value, _ = json.JSONDecoder().raw_decode(text[start:])
    except json.JSONDecodeError as e:
        return None, f"malformed JSON ({e.msg})"
    if not isinstance(value, dict):
        return None, "not a JSON object"
    return value, None


def parse_target(text: str, *, expect_icd: bool) -> ParsedTarget:
    """Parse Impression / CheXpert / ICD blocks. Never raises: problems are listed (generated text is often broken).

    Accepts any subset of CheXpert labels and extra labels; values other than Positive/Negative/Uncertain are
    problems. ICD values must be booleans, or the `{"findings": "None"}` marker (parsed as no flags).
    """
    out = ParsedTarget()
    if not isinstance(text, str) or not text.strip():
        out.problems.append("empty text")
        return out
    marks = [(m.group(1).lower(), m.start(1), m.end()) for m in _BLOCK_RE.finditer(text)]
    blocks: dict[str, str] = {}
    for i, (name, _, body_start) in enumerate(marks):
        end = marks[i + 1][1] if i + 1 < len(marks) else len(text)
        blocks.setdefault(name, text[body_start:end])

    if "impression" in blocks and blocks["impression"].strip():
        out.impression = blocks["impression"].strip()
    else:
        out.problems.append("missing Impression block")

    if "chexpert" not in blocks:
        out.problems.append("missing CheXpert block")
    else:
        value, problem = _first_json_object(blocks["chexpert"])
        if problem:
            out.problems.append(f"CheXpert: {problem}")
        else:
            bad = {k: v for k, v in value.items() if v not in CHEXPERT_VALUES}
            if bad:
                out.problems.append(f"CheXpert: values not in {CHEXPERT_VALUES}: {sorted(bad)}")
            out.chexpert = {str(k): v for k, v in value.items() if v in CHEXPERT_VALUES}

    if expect_icd:
        if "icd" not in blocks:
            out.problems.append("missing ICD block")
        else:
            value, problem = _first_json_object(blocks["icd"])
            if problem:
                out.problems.append(f"ICD: {problem}")
            elif value == ICD_NONE:
                out.icd = {}
            else:
                bad = sorted(k for k, v in value.items() if not isinstance(v, bool))
                if bad:
                    out.problems.append(f"ICD: non-boolean flags {bad}")
                out.icd = {str(k): v for k, v in value.items() if isinstance(v, bool)}
    return out


# --------------------------------------------------------------------------------------------- validation
def validate_record(obj: Any, where: str) -> Record:
    """Check one decoded JSON line; raise RecordError naming the field. (Image existence is checked by the reader.)"""
    if not isinstance(obj, dict):
        raise RecordError(where, "<record>", f"expected a JSON object, got {type(obj).__name__}")
    for key, typ in REQUIRED_KEYS.items():
        if key not in obj:
            raise RecordError(where, key, "missing required key")
        if not isinstance(obj[key], typ):
            raise RecordError(where, key, f"expected {typ.__name__}, got {type(obj[key]).__name__}")
    if not obj["study_id"].isdigit():
        raise RecordError(where, "study_id", f"expected a string of digits, got {obj['study_id']!r}")
    stage, mode = obj["stage"], obj["mode"]
    if stage not in STAGE_MODES:
        raise RecordError(where, "stage", f"expected 'A' or 'B', got {stage!r}")
    if mode not in STAGE_MODES.values():
        raise RecordError(where, "mode", f"expected 'image_only' or 'image_ehr', got {mode!r}")
    if STAGE_MODES[stage] != mode:
        raise RecordError(where, "mode", f"stage {stage} goes with mode {STAGE_MODES[stage]!r}, got {mode!r}")
    n_image = obj["prompt"].count(IMAGE_TOKEN)
    if n_image != 1:
        raise RecordError(where, "prompt", f"expected exactly one {IMAGE_TOKEN} placeholder, found {n_image}")
    if stage == "B" and ehr_from_prompt(obj["prompt"]) is None:
        raise RecordError(where, "prompt", "Stage B prompt has no parseable 'Patient Data:' JSON block")
    if not obj["target"].strip():
        raise RecordError(where, "target", "empty target")
    parsed = parse_target(obj["target"], expect_icd=stage == "B")
    if not parsed.valid:
        raise RecordError(where, "target", "; ".join(parsed.problems))
    if not obj["image"].strip():
        raise RecordError(where, "image", "empty image path")
    return Record(**{k: obj[k] for k in REQUIRED_KEYS}, where=where)
