"""The tiny default learns a curriculum it was not tuned on: a reduced run of the README's own commands
(`launcher data synth --style inverted`, `launcher local --config configs/tiny.yaml`, `launcher evaluate --ehr both`)
on a held-out synth style, through benchmarks/styles.py (the same code that measures the README's table).

The recipe was tuned on the default generator, and its prompt loss and step count on `faint` and `default`; `inverted`
draws other findings (negative polarity, one-sided, a portrait image) and decides its ICD flags by other
EHR fields, units and a below-threshold rule. The reduced run (600 steps instead of 1500) must still be far above what
a model that never looked at the pixels or the EHR gets: the majority baseline scores CheXpert F1 0 on these labels
(each is Positive in a minority of studies) and the EHR-OFF arm is the model itself without the Patient Data block.
"""

import sys
from pathlib import Path

import pytest

from datasets_io.errors import LauncherError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

STEPS = 600


@pytest.mark.slow
def test_tiny_recipe_learns_pixels_and_ehr_on_a_held_out_style(tmp_path):
    import styles

    row = styles.one_run("inverted", seed=0, work=tmp_path, extra=[f"train.max_steps={STEPS}"])
    # pixels -> labels: the style's five drawn findings (majority baseline: 0); the target for the full run
    assert row["chexpert_pixel_macro_f1"] >= 0.8, row
    # EHR -> ICD: the paired A/B of the same model with and without the Patient Data block
    assert row["icd_on_minus_off"] >= 0.15 and row["icd_p_value"] < 0.01, row
    # both arms write well-formed reports, so the A/B measures the EHR, not a broken prompt
    assert row["validity_on"] >= 0.98 and row["validity_off"] >= 0.98, row


def test_evaluation_file_is_other_patients_of_the_same_generator(tmp_path, monkeypatch):
    """The benchmark scores each run on its own evaluation file (data seed 1, every patient in it), not on the
    training file's 10% split; a file sharing a patient with the training file is refused, naming it."""
    import styles

    monkeypatch.setattr(styles, "TRAIN_STUDIES", 20)
    data, eval_file = styles.style_data("blocks", tmp_path, eval_studies=15)
    assert data == tmp_path / "data" / "blocks" and (data / "curriculum_train.jsonl").stat().st_size > 0
    assert len(eval_file.read_text().splitlines()) == 2 * 15  # every study, both stages
    assert (eval_file.parent / "curriculum_train.jsonl").read_text() == ""

    monkeypatch.setattr(styles, "EVAL_DATA_SEED", styles.TRAIN_DATA_SEED)  # the training file's own patients
    with pytest.raises(LauncherError, match=r"patient leakage: \d+ subject\(s\) of .*curriculum_val.jsonl"):
        styles.style_data("blocks", tmp_path / "same", eval_studies=15)
