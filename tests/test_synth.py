"""The synthetic generator: determinism, patient-disjoint split, exact templates, signal in pixels and EHR."""

import hashlib
import json

import numpy as np
import pytest
from PIL import Image

from datasets_io.jsonl import read_records
from datasets_io.records import CHEXPERT_LABELS, ehr_from_prompt, parse_target
from datasets_io.synth import DRAWN_FINDINGS, make_studies, render_xray, write_synthetic


def digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(root).as_posix().encode() + p.read_bytes())
    return h.hexdigest()


def test_deterministic_for_a_seed(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for out, seed in ((a, 3), (b, 3), (c, 4)):
        write_synthetic(out, 12, seed=seed, image_size=(64, 64), progress=False)
    assert digest(a) == digest(b) != digest(c)


def test_split_by_patient_and_both_stages_per_study(synth_dir):
    subjects = {}
    for split in ("train", "val"):
        records, _ = read_records(str(synth_dir / f"curriculum_{split}.jsonl"), str(synth_dir), check_images="decode")
        subjects[split] = {r.image.split("/")[2] for r in records}
        by_study = {}
        for r in records:
            by_study.setdefault(r.study_id, set()).add((r.stage, r.image))
        assert all(
            len(v) == 2 and {s for s, _ in v} == {"A", "B"} and len({i for _, i in v}) == 1 for v in by_study.values()
        )
        assert all(len(parse_target(r.target, expect_icd=r.stage == "B").chexpert) == 14 for r in records)
    assert subjects["val"] and not (subjects["train"] & subjects["val"])


def test_image_layout_is_mimic_like(synth_dir):
    row = json.loads((synth_dir / "curriculum_train.jsonl").read_text().splitlines()[0])
    parts = row["image"].split("/")
    assert (
        parts[0] == "files"
        and parts[1] == "p" + parts[2][1:3]
        and parts[3].startswith("s")
        and parts[4].endswith(".jpg")
    )
    assert Image.open(synth_dir / row["image"]).mode == "L"


def test_pixels_carry_the_findings():
    """Cardiomegaly widens the bright heart shadow; effusion brightens the lung bases; devices add bright lines."""
    neg = {label: "Negative" for label in CHEXPERT_LABELS}
    base = render_xray(neg, 128, 128, np.random.default_rng(0)).astype(float)
    cardio = render_xray(neg | {"Cardiomegaly": "Positive"}, 128, 128, np.random.default_rng(0)).astype(float)
    effusion = render_xray(neg | {"Pleural Effusion": "Positive"}, 128, 128, np.random.default_rng(0)).astype(float)
    devices = render_xray(neg | {"Support Devices": "Positive"}, 128, 128, np.random.default_rng(0)).astype(float)
    heart_band = slice(70, 85)
    assert (cardio[heart_band] > 160).sum() > 1.3 * (base[heart_band] > 160).sum()
    assert effusion[60:90, 20:60].mean() > base[60:90, 20:60].mean() + 20
    assert (devices > 235).sum() > (base > 235).sum() + 50


def test_drawn_findings_are_the_ones_the_renderer_draws():
    """DRAWN_FINDINGS (what benchmarks/styles.py scores as 'drawn in the pixels') is exactly what render_xray draws:
    each of them, toggled alone with the same random draws, changes the image; pneumonia changes nothing."""
    neg = {label: "Negative" for label in CHEXPERT_LABELS}
    base = render_xray(neg, 256, 256, np.random.default_rng(7)).astype(float)
    changed = {
        label: int(
            (np.abs(render_xray(neg | {label: "Positive"}, 256, 256, np.random.default_rng(7)) - base) > 12).sum()
        )
        for label in CHEXPERT_LABELS
        if label != "No Finding"
    }
    assert {label for label, n in changed.items() if n > 0} == set(DRAWN_FINDINGS), changed
    assert changed["Pneumonia"] == 0 and len(DRAWN_FINDINGS) == 12


def test_ehr_values_decide_icd_flags():
    studies = make_studies(400, seed=1)
    bnp_chf = [s.ehr["Labs"]["BNP"]["value"] for s in studies if s.icd["chf_exacerbation"]]
    bnp_no = [
        s.ehr["Labs"]["BNP"]["value"] for s in studies if not s.icd["chf_exacerbation"] and "BNP" in s.ehr["Labs"]
    ]
    assert min(bnp_chf) > 400 > max(bnp_no)
    fever = [s.ehr["Vitals"]["temperature"]["value"] > 38.0 for s in studies]
    assert fever == [s.icd["pneumonia"] for s in studies]
    prevalence = {k: np.mean([s.icd[k] for s in studies]) for k in studies[0].icd}
    assert 0.1 < prevalence["chf_exacerbation"] < 0.4 and 0.1 < prevalence["pneumonia"] < 0.4


def test_impression_consistent_with_labels():
    for s in make_studies(100, seed=2):
        if s.chexpert["No Finding"] == "Positive" and s.chexpert["Support Devices"] == "Negative":
            assert any(p in s.impression for p in ("No acute", "Normal chest"))
        if s.chexpert["Pneumothorax"] == "Positive":
            assert "pneumothorax" in s.impression.lower() and "No pneumothorax" not in s.impression


def test_ehr_block_has_the_seed_fields(synth_dir):
    rows = [json.loads(l) for l in (synth_dir / "curriculum_train.jsonl").read_text().splitlines()]
    ehr = ehr_from_prompt(next(r for r in rows if r["stage"] == "B")["prompt"])
    assert set(ehr) == {"Age", "Sex", "Vitals", "Labs", "O2_device", "Chronic_conditions"}
    assert ehr["Labs"]["BNP"]["unit"] == "pg/mL" and ehr["Labs"]["BNP"]["reference_range"] == [0, 100]


def test_ehr_detail_mimic_is_the_builds_size_with_the_same_studies_and_labels():
    from datasets_io.mimic_build.ehr import LAB_PANEL, VITALS
    from datasets_io.records import prompt_b

    basic, mimic = make_studies(40, 0), make_studies(40, 0, "mimic")
    assert [(s.study_id, s.impression, s.icd) for s in basic] == [(s.study_id, s.impression, s.icd) for s in mimic]
    ehr = mimic[0].ehr
    assert list(ehr) == ["Age", "Sex", "Admission_type", "Vitals", "Labs", "O2_device", "Chronic_conditions"]
    assert set(ehr["Vitals"]) == {name for name, _ in VITALS.values()} and set(ehr["Labs"]) <= set(LAB_PANEL)
    lab = next(iter(ehr["Labs"].values()))
    assert set(lab) == {"value", "unit", "reference_range", "hours_before"} and 0 < lab["hours_before"] <= 24
    sizes = sorted(len(prompt_b(s.ehr)) for s in mimic)
    assert sizes[len(sizes) // 2] > 3 * sorted(len(prompt_b(s.ehr)) for s in basic)[len(sizes) // 2]
    for b, m in zip(basic, mimic):  # the signal of the basic block survives (BNP -> NT-proBNP, degC -> degF)
        if "BNP" in b.ehr["Labs"]:
            assert m.ehr["Labs"]["NT-proBNP"]["value"] == round(b.ehr["Labs"]["BNP"]["value"] * 3.0, 0)
        assert (
            abs(m.ehr["Vitals"]["temperature"]["value"] - (b.ehr["Vitals"]["temperature"]["value"] * 9 / 5 + 32)) < 0.06
        )
    with pytest.raises(ValueError, match="ehr_detail"):
        make_studies(2, 0, "full")


# --------------------------------------------------------------------------------------------- the other styles

from datasets_io.synth_styles import STYLES, get_style  # noqa: E402
from datasets_io.validate import summarize_files  # noqa: E402


@pytest.mark.parametrize("name", sorted(STYLES))
def test_style_writes_valid_records_in_the_same_layout(tmp_path, name):
    summary = write_synthetic(tmp_path, 40, seed=1, image_size=(48, 40), progress=False, style=get_style(name))
    assert summary["style"] == name
    files = [str(tmp_path / f"curriculum_{s}.jsonl") for s in ("train", "val")]
    report = summarize_files(files, str(tmp_path), images="decode")
    assert report["bad_records"] == 0 and report["rows"] == 80 and report["per_stage"] == {"A": 40, "B": 40}
    for r in read_records(files[0], str(tmp_path))[0]:
        if r.stage == "B":
            ehr = ehr_from_prompt(r.prompt)
            assert list(ehr) == ["Age", "Sex", "Vitals", "Labs", "O2_device", "Chronic_conditions"]
            assert all(set(v) >= {"value", "unit"} for section in ("Vitals", "Labs") for v in ehr[section].values())
    with Image.open(tmp_path / read_records(files[0], str(tmp_path))[0][0].image) as im:
        assert im.size == (40, 48) and im.mode == "L"


@pytest.mark.parametrize("name", sorted(STYLES))
def test_style_labels_are_drawn_in_the_pixels(name):
    """Toggling one of the style's pixel labels (same random draws otherwise) changes the image; toggling a label the
    style does not draw changes nothing. So every CheXpert label is a function of the pixels."""
    style = get_style(name)
    h, w = style.image_size
    neg = {label: "Negative" for label in CHEXPERT_LABELS}
    base = style.render(neg, h, w, np.random.default_rng(7)).astype(float)
    for label in CHEXPERT_LABELS:
        img = style.render(neg | {label: "Positive"}, h, w, np.random.default_rng(7)).astype(float)
        changed = (np.abs(img - base) > 12).mean()
        if label in style.pixel_labels:
            assert changed > 0.005, f"{name}: {label} is not visible"
        else:
            assert changed == 0, f"{name}: {label} is drawn but never Positive"


@pytest.mark.parametrize("name", sorted(STYLES))
def test_style_icd_flags_are_decided_by_ehr_values(name):
    style = get_style(name)
    studies = style.make_studies(300, seed=2)
    for rule in style.icd_rules:
        values = [s.ehr[rule.section][rule.field]["value"] for s in studies]
        flags = [s.icd[rule.flag] for s in studies]
        assert flags == [rule.decides(v) for v in values]
        assert 0.1 < np.mean(flags) < 0.45, f"{name}: {rule.flag} prevalence"
    for s in studies:  # only the pixel labels are ever Positive, and No Finding means none of them is
        positive = {k for k, v in s.chexpert.items() if v == "Positive"} - {"No Finding"}
        assert positive <= set(style.pixel_labels)
        assert (s.chexpert["No Finding"] == "Positive") == (positive <= {"Support Devices"})


def test_styles_differ_from_the_default_and_from_each_other():
    fields = {}
    for name, style in STYLES.items():
        ehr = style.make_studies(5, seed=0)[0].ehr
        fields[name] = frozenset(ehr["Vitals"]) | frozenset(ehr["Labs"])
    default = make_studies(5, seed=0)[0].ehr
    fields["default"] = frozenset(default["Vitals"]) | frozenset(default["Labs"])
    assert len(set(fields.values())) == len(fields)
    assert len({s.image_size for s in STYLES.values()} | {(256, 256)}) == len(STYLES) + 1


def test_unknown_style_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown synth style 'nope'; known: default, blocks"):
        get_style("nope")


def test_synth_command_style_and_its_image_size(tmp_path, capsys):
    from launcher.cli import main

    assert main(["data", "synth", "--out", str(tmp_path / "f"), "--studies", "6", "--style", "faint"]) == 0
    assert json.loads(capsys.readouterr().out)["image_size"] == [96, 96]
    assert main(["data", "synth", "--out", str(tmp_path / "x"), "--studies", "6", "--style", "nope"]) == 2
    assert "unknown synth style 'nope'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_synth_val_fraction_out_of_range_is_a_clear_error(tmp_path, capsys):
    from launcher.cli import main

    assert main(["data", "synth", "--out", str(tmp_path / "x"), "--studies", "6", "--val-fraction", "1.5"]) == 2
    assert "--val-fraction 1.5: expected a fraction of the patients, 0 to 1" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    with pytest.raises(ValueError, match="val_fraction=-0.1"):
        write_synthetic(tmp_path / "y", 6, seed=0, val_fraction=-0.1, progress=False)


def test_val_fraction_one_writes_an_evaluation_only_set(tmp_path):
    summary = write_synthetic(tmp_path, 12, seed=0, image_size=(32, 32), val_fraction=1.0, progress=False)
    assert summary["rows"] == {"train": 0, "val": 24} and summary["val_patients"] == summary["patients"]
