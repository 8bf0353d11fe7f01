"""The record format: templates, parser and validation (one test per bad-input kind)."""

import json

import pytest

from datasets_io.records import (
    CHEXPERT_LABELS,
    RecordError,
    ehr_from_prompt,
    parse_target,
    prompt_a,
    prompt_b,
    target_a,
    target_b,
    validate_record,
    with_empty_ehr,
)

CHEX = {label: "Negative" for label in CHEXPERT_LABELS} | {"Cardiomegaly": "Positive", "Edema": "Uncertain"}
EHR = {"Age": 65, "Sex": "M", "Labs": {"BNP": {"value": 1240.0, "unit": "pg/mL", "reference_range": [0, 100]}}}


def row(kind="A", **kw):
    stage = kind
    base = {
        "study_id": "54951608",
        "image": "files/p10/p10074434/s54951608/x.jpg",
        "prompt": prompt_a() if stage == "A" else prompt_b(EHR),
        "target": target_a("Enlarged heart.", CHEX)
        if stage == "A"
        else target_b("Enlarged heart.", CHEX, {"chf_exacerbation": True}),
        "mode": "image_only" if stage == "A" else "image_ehr",
        "stage": stage,
    }
    base.update(kw)
    return base


def test_templates_are_exactly_the_seed_format():
    assert prompt_a() == "Image:<image>\nAnswer Impression & CheXpert."
    assert (
        prompt_b(EHR)
        == "Patient Data:\n" + json.dumps(EHR, indent=2) + "\n\nImage:<image>\nAnswer Impression, CheXpert & ICD."
    )
    assert target_a("X.", {"Edema": "Positive"}) == 'Impression: X.\n\nCheXpert:\n{\n  "Edema": "Positive"\n}'
    assert target_b("X.", {}, {}).endswith('ICD:\n{\n  "findings": "None"\n}')
    assert target_b("X.", {}, {"pneumonia": True, "sepsis": False}).endswith('ICD:\n{\n  "pneumonia": true\n}')


def test_parse_target_roundtrip_and_subsets():
    p = parse_target(target_b("Enlarged heart.", CHEX, {"chf_exacerbation": True}), expect_icd=True)
    assert p.valid and p.impression == "Enlarged heart." and p.chexpert == CHEX and p.icd == {"chf_exacerbation": True}
    p = parse_target(target_a("ok", {"Made Up Label": "Positive"}), expect_icd=False)
    assert p.valid and p.chexpert == {"Made Up Label": "Positive"}  # extra labels accepted
    assert parse_target(target_b("ok", {}, {}), expect_icd=True).icd == {}


@pytest.mark.parametrize(
    "text, problem",
    [
        ("", "empty text"),
        ('Impression: x\n\nCheXpert:\n{"Edema": "Positive"', "CheXpert: malformed JSON"),
        ("CheXpert:\n{}", "missing Impression"),
        ("Impression: x", "missing CheXpert"),
        ('Impression: x\nCheXpert:\n{"Edema": "Maybe"}', "values not in"),
        ('Impression: x\nCheXpert:\n{}\nICD:\n{"pneumonia": "yes"}', "non-boolean"),
    ],
)
def test_parse_target_reports_problems_never_raises(text, problem):
    p = parse_target(text, expect_icd=True)
    assert not p.valid and any(problem in x for x in p.problems), p.problems


def test_ehr_block_roundtrip_and_emptying():
    assert ehr_from_prompt(prompt_b(EHR)) == EHR
    assert ehr_from_prompt(with_empty_ehr(prompt_b(EHR))) == {}
    assert with_empty_ehr(prompt_b(EHR)).endswith("Answer Impression, CheXpert & ICD.")


@pytest.mark.parametrize(
    "change, field, reason",
    [
        ({"study_id": 123}, "study_id", "expected str"),
        ({"study_id": "s123"}, "study_id", "string of digits"),
        ({"stage": "C"}, "stage", "expected 'A' or 'B'"),
        ({"mode": "image_ehr"}, "mode", "stage A goes with mode 'image_only'"),
        ({"prompt": "no placeholder"}, "prompt", "exactly one <image>"),
        ({"prompt": "<image><image>"}, "prompt", "found 2"),
        ({"target": "  "}, "target", "empty target"),
        ({"target": "Impression: only"}, "target", "missing CheXpert"),
    ],
)
def test_validate_record_names_field_and_reason(change, field, reason):
    with pytest.raises(RecordError) as e:
        validate_record(row("A", **change), "f.jsonl:7")
    assert e.value.field == field and reason in e.value.reason and str(e.value).startswith("f.jsonl:7: field")


def test_validate_record_stage_b_needs_icd_and_patient_data():
    assert validate_record(row("B"), "f:1").stage == "B"
    with pytest.raises(RecordError, match="missing ICD"):
        validate_record(row("B", target=target_a("x", CHEX)), "f:1")
    with pytest.raises(RecordError, match="Patient Data"):
        validate_record(row("B", prompt="Image:<image>\nAnswer Impression, CheXpert & ICD."), "f:1")
    with pytest.raises(RecordError, match="missing required key"):
        validate_record({k: v for k, v in row("A").items() if k != "image"}, "f:1")
