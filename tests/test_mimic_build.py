"""`launcher data build` on the raw-format MIMIC fixture (datasets_io/mimic_fixture.py): every step, exact values.

python -m pytest tests/test_mimic_build.py -q
"""

from __future__ import annotations

import argparse
import csv
import gzip
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datasets_io import mimic_fixture as fx
from datasets_io.jsonl import read_records
from datasets_io.mimic_build.build import build
from datasets_io.mimic_build.ehr import nearest_labs
from datasets_io.mimic_build.icd_map import load_icd_map
from datasets_io.mimic_build.report_sections import extract_impression
from datasets_io.mimic_build.time_alignment import NearestBefore
from launcher.commands.data import add_build_arguments, options_from_args, run_build
from datasets_io.records import CHEXPERT_LABELS, ICD_FLAGS, ehr_from_prompt, parse_target
from datasets_io.errors import LauncherError

SPLIT_FILES = ("curriculum_train.jsonl", "curriculum_val.jsonl", "curriculum_test.jsonl")


# ----------------------------------------------------------------------------------------------- helpers
def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_build_arguments(parser)
    return parser.parse_args(argv)


def run(raw: fx.FixturePaths, out: Path, *extra: str) -> dict:
    return build(options_from_args(parse_args(raw.build_argv(out, *extra))))


def rows(out: Path) -> dict[tuple[int, str], dict]:
    """(study_id, stage) -> record, over the three split files."""
    found = {}
    for name in SPLIT_FILES:
        for line in (out / name).read_text().splitlines():
            r = json.loads(line)
            found[(int(r["study_id"]), r["stage"])] = {**r, "file": name}
    return found


def read_gz_csv(path: Path) -> list[list[str]]:
    with gzip.open(path, "rt", newline="") as f:
        return list(csv.reader(f))


def write_gz_csv(path: Path, table: list[list[str]]) -> None:
    text = io.StringIO()
    csv.writer(text, lineterminator="\n").writerows(table)
    with gzip.open(path, "wt") as f:
        f.write(text.getvalue())


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> fx.FixturePaths:
    return fx.write_fixture(tmp_path_factory.mktemp("raw"))


@pytest.fixture(scope="module")
def built(raw, tmp_path_factory) -> tuple[Path, dict, dict]:
    out = tmp_path_factory.mktemp("out") / "curriculum"
    report = run(raw, out)
    return out, report, rows(out)


@pytest.fixture
def raw_copy(raw, tmp_path) -> fx.FixturePaths:
    """A private copy of the fixture for tests that corrupt it."""
    shutil.copytree(raw.root, tmp_path / "raw")
    r = tmp_path / "raw"
    return fx.FixturePaths(r, r / "mimic-cxr-jpg", r / "mimic-cxr", r / "mimiciv", r / "mimic-iv-ed")


# ----------------------------------------------------------------------------------------------- the fixture
def test_fixture_writes_the_release_formats(raw):
    meta = read_gz_csv(raw.cxr_jpg / "mimic-cxr-2.0.0-metadata.csv.gz")
    assert meta[0] == fx.METADATA_COLUMNS
    by_study = {int(r[2]): r for r in meta[1:] if r[4] == "PA"}
    assert by_study[fx.S_CHF_ADM][7:9] == ["21830514", "91503.5"]  # StudyDate int, StudyTime without leading zero
    chexpert = read_gz_csv(raw.cxr_jpg / "mimic-cxr-2.0.0-chexpert.csv.gz")
    row = dict(zip(chexpert[0], next(r for r in chexpert if r[1] == str(fx.S_CHF_ADM))))
    assert (row["Pneumonia"], row["Lung Lesion"], row["Cardiomegaly"]) == ("-1.0", "", "1.0")  # -1 vs blank
    dx = read_gz_csv(raw.mimic_iv / "hosp" / "diagnoses_icd.csv.gz")
    assert dx[0] == ["subject_id", "hadm_id", "seq_num", "icd_code", "icd_version"]
    codes = {(r[3], r[4]) for r in dx[1:]}
    assert ("I5023", "10") in codes and ("486", "9") in codes and not any("." in c for c, _ in codes)
    assert read_gz_csv(raw.mimic_iv / "hosp" / "labevents.csv.gz")[0] == fx.LABEVENTS_COLUMNS
    assert read_gz_csv(raw.mimic_iv_ed / "ed" / "vitalsign.csv.gz")[0] == fx.VITALSIGN_COLUMNS
    for r in meta[1:3]:
        subject, study, dicom = r[1], r[2], r[0]
        jpg = raw.cxr_jpg / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}" / f"{dicom}.jpg"
        with Image.open(jpg) as im:
            assert im.format == "JPEG" and im.size == (int(r[6]), int(r[5]))  # (Columns, Rows)
    assert (raw.reports / "files" / "p10" / f"p{fx.CHF}" / f"s{fx.S_CHF_ADM}.txt").is_file()
    assert not (raw.reports / "files" / "p10" / f"p{fx.SEPSIS}" / f"s{fx.S_NO_REPORT}.txt").exists()


# ----------------------------------------------------------------------------------------------- impression
@pytest.mark.parametrize(
    "text, expected",
    [
        (
            fx.REPORTS[fx.S_CHF_ADM],
            (
                "Moderate cardiomegaly with mild pulmonary edema. Right basilar opacity, "
                "atelectasis versus early pneumonia.",
                "impression",
            ),
        ),
        (
            fx.REPORTS[fx.S_CHF_ED],
            ("Cardiomegaly with small right pleural effusion; mild edema cannot be excluded.", "impression"),
        ),  # the LAST impression section
        (
            fx.REPORTS[fx.S_PNA9],
            (
                "Dense consolidation in the left lower lobe, consistent with pneumonia. No pleural "
                "effusion. Heart size is normal.",
                "findings",
            ),
        ),  # no IMPRESSION
        (
            fx.REPORTS[fx.S_OUT],
            (
                "The lungs are clear. The cardiomediastinal silhouette is normal. No acute cardiopulmonary process.",
                "last_paragraph",
            ),
        ),  # no headers at all
        (fx.REPORTS[fx.S_NO_TEXT], (None, "none")),  # only the ___ placeholder
        (" FINAL REPORT\n FINDINGS:  Clear lungs.\n \n IMPRESSION: \n \n", ("Clear lungs.", "findings")),  # empty IMPR.
        (" FINAL REPORT\n CONCLUSION:  Small effusion.\n", ("Small effusion.", "impression")),
        (" FINAL REPORT\n CHEST, PA AND LATERAL:  Heart normal.\n", ("Heart normal.", "findings")),
        ("", (None, "none")),
    ],
)
def test_impression_follows_the_mimic_cxr_sectioning_convention(text, expected):
    assert extract_impression(text) == expected


# ----------------------------------------------------------------------------------------------- the build
def test_report_counts_each_step_and_each_drop(built):
    out, report, _ = built
    assert report["dropped"] == {
        "no_preferred_view": 1,
        "not_in_split_file": 1,
        "no_chexpert_row": 1,
        "image_file_missing": 1,
        "report_file_missing": 1,
        "no_usable_report_text": 1,
    }
    assert report["metadata_studies"] == 13 and report["kept_studies"] == 7
    assert [s["studies"] for s in report["funnel"]] == [13, 12, 11, 10, 9, 8, 7]
    assert report["impression_source"] == {"findings": 1, "impression": 5, "last_paragraph": 1}
    assert report["studies_per_split"] == {"train": 5, "validate": 1, "test": 1}
    assert report["rows_written"] == {
        "curriculum_train.jsonl": {"A": 5, "B": 4},
        "curriculum_val.jsonl": {"A": 1},
        "curriculum_test.jsonl": {"A": 1, "B": 1},
    }
    assert report["stage_b_not_written_outside_every_admission"] == 2
    assert report["icd_map"]["version"] == "1.0" and len(report["icd_map"]["sha256"]) == 64
    assert report["chexpert_labels"]["Pneumonia"] == {"Positive": 1, "Negative": 1, "Uncertain": 1, "not_mentioned": 4}
    assert json.loads((out / "build_report.json").read_text()) == json.loads(json.dumps(report))


def test_built_curriculum_passes_validation_with_decoded_images(built):
    out, report, _ = built
    for name in SPLIT_FILES:
        records, read = read_records(str(out / name), str(out), policy="error", check_images="decode")
        assert dict(read.per_stage) == report["rows_written"][name]
        for r in records:
            assert parse_target(r.target, expect_icd=r.stage == "B").valid
            if r.stage == "B":
                assert ehr_from_prompt(r.prompt) is not None


def test_one_image_per_study_by_view_preference(built, raw, tmp_path):
    _, _, found = built
    pa_image = found[(fx.S_CHF_ADM, "A")]["image"]
    assert pa_image == f"files/p10/p{fx.CHF}/s{fx.S_CHF_ADM}/{fx.dicom_id(fx.S_CHF_ADM, 2)}.jpg"  # PA, not AP/LAT
    assert found[(fx.S_CHF_ED, "A")]["image"].endswith(fx.dicom_id(fx.S_CHF_ED, 0) + ".jpg")  # AP only: AP
    assert fx.S_LATERAL_ONLY not in {s for s, _ in found}
    run(raw, tmp_path / "ap", "--views", "AP,PA", "--max-studies", "1")
    assert rows(tmp_path / "ap")[(fx.S_CHF_ADM, "A")]["image"].endswith(fx.dicom_id(fx.S_CHF_ADM, 0) + ".jpg")


def test_chexpert_blank_is_not_mentioned_never_uncertain(built, raw, tmp_path):
    _, _, found = built
    block = parse_target(found[(fx.S_CHF_ADM, "A")]["target"], expect_icd=False).chexpert
    assert block == {
        "Cardiomegaly": "Positive",
        "Edema": "Positive",
        "Pneumonia": "Uncertain",
        "Pneumothorax": "Negative",
        "Pleural Effusion": "Negative",
    }  # blanks omitted, order = records
    assert list(block) == [k for k in CHEXPERT_LABELS if k in block]
    run(raw, tmp_path / "neg", "--unmentioned", "negative", "--max-studies", "1")
    block = parse_target(rows(tmp_path / "neg")[(fx.S_CHF_ADM, "A")]["target"], expect_icd=False).chexpert
    assert list(block) == list(CHEXPERT_LABELS)
    assert block["Lung Lesion"] == "Negative" and block["Pneumonia"] == "Uncertain"


def test_icd_flags_come_from_the_admission_containing_the_study(built, raw, tmp_path):
    _, _, found = built
    icd = lambda r: parse_target(r["target"], expect_icd=True).icd  # noqa: E731
    # undotted ICD-10 I5023 / J189 / N179; I10 is not a flag
    assert icd(found[(fx.S_CHF_ADM, "B")]) == {"pneumonia": True, "chf_exacerbation": True, "acute_kidney_injury": True}
    # ICD-9 486 / 5849 / 49121; 4280 (CHF unspecified) is not an exacerbation
    assert icd(found[(fx.S_PNA9, "B")]) == {"pneumonia": True, "copd_exacerbation": True, "acute_kidney_injury": True}
    assert icd(found[(fx.S_SEPSIS, "B")]) == {"sepsis": True}
    assert icd(found[(fx.S_NOPAT, "B")]) == {}  # {"findings": "None"}: the admission has no mapped code
    # outside every admission (the one before had pneumonia, the one after a lung mass): no Stage B row
    assert (fx.S_OUT, "A") in found and (fx.S_OUT, "B") not in found
    # an ED study taken before admittime is outside the admission ... unless the window starts at edregtime
    assert (fx.S_CHF_ED, "B") not in found
    run(raw, tmp_path / "ed", "--admission-start", "edregtime", "--subjects", f"p{fx.CHF}")
    assert icd(rows(tmp_path / "ed")[(fx.S_CHF_ED, "B")]) == icd(found[(fx.S_CHF_ADM, "B")])
    run(raw, tmp_path / "none", "--no-admission", "icd-none", "--subjects", f"p{fx.OUTSIDE}")
    b = rows(tmp_path / "none")[(fx.S_OUT, "B")]
    assert b["target"].endswith('ICD:\n{\n  "findings": "None"\n}')
    assert ehr_from_prompt(b["prompt"])["Admission_type"] is None


def test_icd_map_is_versioned_complete_and_matches_by_version(tmp_path):
    icd_map = load_icd_map(Path(__file__).resolve().parents[1] / "configs" / "icd_map.yaml")
    assert set(ICD_FLAGS) <= set(icd_map.flags) and icd_map.version
    assert icd_map.match(icd_map.flags, "J189", 10) == ["pneumonia"]
    assert icd_map.match(icd_map.flags, "486", 9) == ["pneumonia"]
    assert icd_map.match(icd_map.flags, "J189", 9) == []  # prefixes only match codes of their own version
    assert icd_map.match(icd_map.flags, "4280", 9) == []  # CHF unspecified: chronic, not an exacerbation
    assert icd_map.match(icd_map.chronic, "4280", 9) == ["heart_failure"]
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        'version: "x"\nextra: 1\nflags:\n  pneumonia: {icd9: ["48.6"], icd10: ["J18"]}\nchronic_conditions: {}\n'
    )
    with pytest.raises(LauncherError) as e:
        load_icd_map(bad)
    message = str(e.value)  # every problem at once, each naming its key
    assert "unknown key 'extra'" in message and "'48.6'" in message
    bad.write_text('version: "x"\nflags: {}\nchronic_conditions: {}\n')
    with pytest.raises(LauncherError, match="'flags' is empty"):
        load_icd_map(bad)


SEED_FLAGS = {
    "pneumonia",
    "pleural_effusion",
    "pneumothorax",
    "pulmonary_embolism",
    "chf_exacerbation",
    "pulmonary_edema",
    "rib_fracture",
    "lung_mass",
}


def test_seed_icd_map_has_the_original_eight_flags_undotted_by_version():
    seed = load_icd_map(Path(__file__).resolve().parents[1] / "configs" / "icd_map_seed.yaml")
    assert set(seed.flags) == SEED_FLAGS and seed.version == "seed-1.0"
    cases = [
        ("4280", 9, ["chf_exacerbation"]),
        ("I509", 10, ["chf_exacerbation"]),  # ANY heart failure
        ("42823", 9, ["chf_exacerbation"]),
        ("I5023", 10, ["chf_exacerbation"]),
        ("4281", 9, ["chf_exacerbation", "pulmonary_edema"]),
        ("J810", 10, ["pulmonary_edema"]),
        ("5119", 9, ["pleural_effusion"]),
        ("J910", 10, ["pleural_effusion"]),
        ("5110", 9, []),  # no effusion
        ("J9311", 10, ["pneumothorax"]),
        ("S270XXA", 10, ["pneumothorax"]),
        ("5121", 9, ["pneumothorax"]),
        ("41519", 9, ["pulmonary_embolism"]),
        ("I2699", 10, ["pulmonary_embolism"]),
        ("80703", 9, ["rib_fracture"]),
        ("S2241XA", 10, ["rib_fracture"]),
        ("S220", 10, []),  # vertebra
        ("C3490", 10, ["lung_mass"]),
        ("J189", 10, ["pneumonia"]),
        ("486", 9, ["pneumonia"]),
        ("A419", 10, []),
        ("N179", 10, []),
        ("J189", 9, []),
    ]  # the default map's extra flags are not labelled
    assert [sorted(seed.match(seed.flags, code, v)) for code, v, _ in cases] == [want for *_, want in cases]


def test_build_with_the_seed_icd_map_labels_the_eight_flags(raw, tmp_path):
    seed_map = Path(__file__).resolve().parents[1] / "configs" / "icd_map_seed.yaml"
    report = run(raw, tmp_path / "seed", "--icd-map", str(seed_map))
    assert set(report["icd_flags_positive"]) == SEED_FLAGS and report["icd_map"]["version"] == "seed-1.0"
    found = rows(tmp_path / "seed")
    icd = lambda r: parse_target(r["target"], expect_icd=True).icd  # noqa: E731
    for record in found.values():
        if record["stage"] == "B":
            assert set(icd(record)) <= SEED_FLAGS
    # I5023 + J189 (+ N179, I10: no seed flag); 486 + 4280 (CHF unspecified IS chf_exacerbation here) + 5849, 49121
    assert icd(found[(fx.S_CHF_ADM, "B")]) == {"pneumonia": True, "chf_exacerbation": True}
    assert icd(found[(fx.S_PNA9, "B")]) == {"pneumonia": True, "chf_exacerbation": True}
    assert icd(found[(fx.S_SEPSIS, "B")]) == {}  # A419, R6521, J9601: none of the eight


def test_ehr_block_age_sex_labs_vitals_before_the_study_only(built, raw, tmp_path):
    _, _, found = built
    ehr = ehr_from_prompt(found[(fx.S_CHF_ADM, "B")]["prompt"])
    assert (ehr["Age"], ehr["Sex"], ehr["Admission_type"], ehr["O2_device"]) == (55, "F", "EW EMER.", None)
    assert ehr["Labs"] == {
        "NT-proBNP": {"value": 4120.0, "unit": "pg/mL", "reference_range": [0.0, 353.0], "hours_before": 2.8},
        # 2.9 was drawn after the study (excluded); WBC is outside the 24 h window; Troponin has no number
        "Creatinine": {"value": 1.4, "unit": "mg/dL", "reference_range": [0.5, 1.2], "hours_before": 13.3},
        "Hemoglobin": {"value": 10.1, "unit": "g/dL", "reference_range": [12.0, 16.0], "hours_before": 2.8},
    }
    assert ehr["Vitals"] == {}  # the ED vitals are four days earlier
    # chronic conditions from the 2180 admission only: the current one's I50.23 would add heart_failure
    assert ehr["Chronic_conditions"] == ["hypertension", "diabetes"]
    pna = ehr_from_prompt(found[(fx.S_PNA9, "B")]["prompt"])
    assert pna["Age"] == 72 and pna["Sex"] == "M"
    assert pna["Labs"] == {
        "Lactate": {"value": 1.9, "unit": "mmol/L", "reference_range": [0.5, 2.0], "hours_before": 0.0}
    }  # WBC after / too early; urine pH is not pH
    sepsis = ehr_from_prompt(found[(fx.S_SEPSIS, "B")]["prompt"])
    assert sepsis["Labs"]["CRP"]["reference_range"] is None
    assert sepsis["Vitals"]["heart_rate"] == {"value": 125.0, "unit": "bpm", "hours_before": 3.3}
    nopat = ehr_from_prompt(found[(fx.S_NOPAT, "B")]["prompt"])
    assert (nopat["Age"], nopat["Sex"], nopat["Admission_type"]) == (None, None, "OBSERVATION ADMIT")
    run(raw, tmp_path / "ed", "--admission-start", "edregtime", "--subjects", f"p{fx.CHF}")
    ed = ehr_from_prompt(rows(tmp_path / "ed")[(fx.S_CHF_ED, "B")]["prompt"])
    assert ed["Vitals"]["heart_rate"] == {"value": 112.0, "unit": "bpm", "hours_before": 1.3}  # not 130 (after)
    assert ed["Vitals"]["temperature"] == {"value": 100.9, "unit": "degF", "hours_before": 1.8}  # 13:02 had none
    assert ed["Labs"]["Lactate"]["value"] == 2.1  # 3.0 was drawn after the study


def test_splits_are_official_and_patient_disjoint(built, raw_copy, tmp_path):
    _, report, found = built
    subjects_by_file: dict[str, set[str]] = {}
    for r in found.values():
        subjects_by_file.setdefault(r["file"], set()).add(r["image"].split("/")[2])
    files = list(subjects_by_file.values())
    assert all(not (a & b) for i, a in enumerate(files) for b in files[i + 1 :])
    assert found[(fx.S_OUT, "A")]["file"] == "curriculum_val.jsonl"  # official "validate"
    assert found[(fx.S_SEPSIS, "A")]["file"] == "curriculum_test.jsonl"
    assert report["split_check"]["subjects_in_two_or_more_splits"] == 0
    # move one study of a train patient to validate: the build must refuse
    path = raw_copy.cxr_jpg / "mimic-cxr-2.0.0-split.csv.gz"
    table = read_gz_csv(path)
    for r in table[1:]:
        if r[1] == str(fx.S_CHF_ED):
            r[3] = "validate"
    write_gz_csv(path, table)
    with pytest.raises(LauncherError, match=rf"patient\(s\) in more than one split.*{fx.CHF} \(train/validate\)"):
        run(raw_copy, tmp_path / "leak")


def test_subjects_and_max_studies(raw, tmp_path):
    report = run(raw, tmp_path / "p11", "--subjects", "p11")
    assert report["kept_studies"] == 1 and report["dropped"]["not_in_split_file"] == 1
    assert {s for s, _ in rows(tmp_path / "p11")} == {fx.S_P11}
    report = run(raw, tmp_path / "p10", "--subjects", "p10", "--max-studies", "2")
    assert report["kept_studies"] == 2 and report["stopped_at_max_studies"]
    assert {s for s, _ in rows(tmp_path / "p10")} == {fx.S_CHF_ADM, fx.S_CHF_ED}
    with pytest.raises(LauncherError, match="--subjects"):
        options_from_args(parse_args(raw.build_argv(tmp_path / "x", "--subjects", "10")))


def test_output_is_deterministic_and_images_land_under_out(built, raw, tmp_path):
    out, report, _ = built
    again = tmp_path / "again"
    run(raw, again, "--image-mode", "copy")
    for name in SPLIT_FILES:
        assert (again / name).read_bytes() == (out / name).read_bytes()
    image = rows(again)[(fx.S_CHF_ADM, "A")]["image"]
    assert (again / image).is_file() and not (again / image).is_symlink()
    assert (out / image).is_symlink() and (out / image).read_bytes() == (again / image).read_bytes()
    run(raw, out)  # rebuilding over an existing output replaces it with the same bytes
    assert json.loads((out / "build_report.json").read_text()) == json.loads(json.dumps(report))
    for name in SPLIT_FILES:
        assert (again / name).read_bytes() == (out / name).read_bytes()


@pytest.mark.parametrize(
    "file, edit, message",
    [
        (
            "mimiciv/hosp/patients.csv.gz",
            lambda t: [r[:2] + r[3:] for r in t],
            r"patients.csv.gz: missing column\(s\) \['anchor_age'\]",
        ),
        (
            "mimic-cxr-jpg/mimic-cxr-2.0.0-chexpert.csv.gz",
            lambda t: t[:1] + [t[1][:5] + ["2.0"] + t[1][6:]] + t[2:],
            r"chexpert.csv.gz: column 'Edema': unexpected value 2.0",
        ),
        (
            "mimiciv/hosp/admissions.csv.gz",
            lambda t: t[:1] + [["x" + t[1][0]] + t[1][1:]] + t[2:],
            r"admissions.csv.gz: .*column #0 \('subject_id'\).*invalid value 'x",
        ),
        (
            "mimic-cxr-jpg/mimic-cxr-2.0.0-split.csv.gz",
            lambda t: t[:1] + [t[1][:3] + ["val"]] + t[2:],
            r"split.csv.gz: column 'split': unexpected value 'val'",
        ),
        (
            "mimiciv/hosp/diagnoses_icd.csv.gz",
            lambda t: t[:1] + [t[1][:4] + ["11"]] + t[2:],
            r"diagnoses_icd.csv.gz: column 'icd_version': unexpected value 11",
        ),
        ("mimiciv/hosp/labevents.csv.gz", None, r"--mimic-iv .*labevents.csv.gz not found"),
    ],
)
def test_malformed_inputs_name_the_file_and_column(raw_copy, tmp_path, file, edit, message):
    path = raw_copy.root / file
    if edit is None:
        path.unlink()
    else:
        write_gz_csv(path, edit(read_gz_csv(path)))
    with pytest.raises(LauncherError, match=message):
        run(raw_copy, tmp_path / "out")


def test_uncompressed_files_and_folders_given_directly(raw_copy, tmp_path):
    hosp = raw_copy.mimic_iv / "hosp"
    gz = hosp / "patients.csv.gz"
    (hosp / "patients.csv").write_bytes(gzip.decompress(gz.read_bytes()))
    gz.unlink()
    argv = raw_copy.build_argv(tmp_path / "out", "--max-studies", "1")
    argv[argv.index("--mimic-iv") + 1] = str(hosp)  # the hosp folder itself
    argv[argv.index("--mimic-iv-ed") + 1] = str(raw_copy.mimic_iv_ed / "ed")
    report = build(options_from_args(parse_args(argv)))
    assert report["kept_studies"] == 1 and report["ehr"]["patient_row_found"] == 1


def test_cli_hooks_print_the_summary(raw, tmp_path, capsys):
    assert run_build(parse_args(raw.build_argv(tmp_path / "cli", "--max-studies", "3"))) == 0
    printed = capsys.readouterr().out
    assert "MIMIC curriculum build" in printed and "curriculum_train.jsonl" in printed and "labevents:" in printed
    with pytest.raises(LauncherError, match="MIMIC-CXR-JPG folder"):
        run(raw, raw.cxr_jpg)  # never write links over the source images


# ----------------------------------------------------------------------------------------------- streaming
def test_nearest_before_is_exact_and_order_independent():
    rng = np.random.default_rng(0)
    study_subject = rng.integers(0, 6, 25)  # any order
    study_time = rng.integers(100_000, 200_000, 25)
    n = 4000
    rows_ = dict(
        subject=rng.integers(0, 8, n),
        item=rng.integers(0, 3, n),
        time_s=rng.integers(50_000, 210_000, n),
        value=rng.normal(size=n),
        unit=np.zeros(n, np.int32),
        lo=np.zeros(n),
        hi=np.ones(n),
        tie=rng.permutation(n),
    )
    window = 20_000

    def reduce(order: np.ndarray, batches: int) -> np.ndarray:
        r = NearestBefore(study_subject, study_time, 3, window)
        for part in np.array_split(order, batches):
            r.update(**{k: v[part] for k, v in rows_.items()})
        return r.value.reshape(25, 3)

    expected = np.full((25, 3), np.nan)
    for s in range(25):
        for i in range(3):
            delta = study_time[s] - rows_["time_s"]
            ok = (rows_["subject"] == study_subject[s]) & (rows_["item"] == i) & (delta >= 0) & (delta <= window)
            if ok.any():
                best = min(np.flatnonzero(ok), key=lambda j: (delta[j], rows_["tie"][j]))
                expected[s, i] = rows_["value"][best]
    np.testing.assert_array_equal(reduce(np.arange(n), 1), expected)
    np.testing.assert_array_equal(reduce(rng.permutation(n), 7), expected)


def test_labevents_stream_gives_the_same_answer_in_small_blocks(tmp_path):
    subjects = np.array([10000032, 10000764, 10001122])
    itemids = np.array([50963, 50912, 51301])
    path = tmp_path / "labevents.csv.gz"
    fx.write_labevents(path, 20_000, subjects=subjects, itemids=itemids, days=30, subject_share=0.3)
    study_subject = np.repeat(subjects, 2)
    study_time = np.datetime64("2150-01-10T00:00:00").astype("datetime64[s]").astype(np.int64) + np.arange(6) * 86400
    items = {int(i): k for k, i in enumerate(itemids)}
    args = (path, items, 3, study_subject, study_time, 24.0)
    big, big_stats = nearest_labs(*args, desc=None)
    small, small_stats = nearest_labs(*args, desc=None, block_size=16 << 10)
    assert small_stats["blocks_read"] > 20 and big_stats["rows_scanned"] == small_stats["rows_scanned"] == 20_000
    assert np.isfinite(big.value).sum() > 0
    np.testing.assert_array_equal(big.value, small.value)
    np.testing.assert_array_equal(big.delta, small.delta)
