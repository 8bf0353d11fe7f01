"""Tests of training/metrics: report text, CheXpert and ICD scores, the `evaluate` modules, bootstrap and A/B test.

HF_HUB_OFFLINE=1 python -m pytest tests/test_metrics.py -q
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from datasets_io import records
from datasets_io.records import CHEXPERT_5, CHEXPERT_LABELS, ICD_FLAGS
from training.metrics import scores, stats

REPO = Path(__file__).resolve().parents[1]

# Varied report-like sentences: punctuation, digits, case, repeats, short and long, partial overlaps.
PREDICTIONS = [
    "No acute cardiopulmonary process.",
    "Mild pulmonary edema, and small bilateral pleural effusions.",
    "The heart size is normal. Lungs are clear.",
    "Right lower lobe opacity, concerning for pneumonia.",
    "Stable cardiomegaly",
    "ET tube terminates 3.5 cm above the carina; NG tube in the stomach.",
    "no pneumothorax no pneumothorax",
    "Left basilar atelectasis. No effusion.",
    "Moderate cardiomegaly with interstitial edema, unchanged from prior study of 2150-03-01.",
    "Lungs clear",
]
REFERENCES = [
    "No acute cardiopulmonary process.",
    "Small bilateral pleural effusions with mild pulmonary edema.",
    "Heart size is normal. The lungs are clear without consolidation.",
    "Right lower lobe consolidation concerning for pneumonia.",
    "Cardiomegaly is stable.",
    "Endotracheal tube terminates 4 cm above the carina. NG tube tip in the stomach.",
    "No pneumothorax.",
    "Left basilar atelectasis, no pleural effusion.",
    "Moderate cardiomegaly and interstitial edema, unchanged.",
    "The lungs are clear; no focal consolidation, effusion or pneumothorax is seen.",
]


def _joined(texts: list[str]) -> list[str]:
    return [" ".join(scores.tokenize(t)) for t in texts]


# --------------------------------------------------------------------------------------------- text metrics
def test_tokenize_lowercases_and_splits_punctuation():
    assert scores.tokenize("ET Tube, 3.5cm.") == ["et", "tube", ",", "3", ".", "5cm", "."]
    assert scores.tokenize("ET Tube, 3.5cm.", punctuation=False) == ["et", "tube", "3", "5cm"]
    assert scores.tokenize("") == []


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_bleu_matches_sacrebleu_on_pretokenized_text(order):
    from sacrebleu.metrics import BLEU

    ours = scores.bleu(PREDICTIONS, REFERENCES)
    # Same tokens (tokenize="none" splits on whitespace), same corpus statistics, no smoothing on either side.
    ref = BLEU(max_ngram_order=order, tokenize="none", smooth_method="none", force=True)
    theirs = ref.corpus_score(_joined(PREDICTIONS), [_joined(REFERENCES)])
    assert ours[f"bleu_{order}"] == pytest.approx(theirs.score / 100, abs=1e-9)
    assert ours["brevity_penalty"] == pytest.approx(theirs.bp, abs=1e-9)
    assert 0.0 < ours[f"bleu_{order}"] < 1.0


def test_bleu_brevity_penalty_is_corpus_level_and_case_insensitive():
    from sacrebleu.metrics import BLEU

    preds = ["THE LUNGS ARE CLEAR .", "mild edema"]  # shorter than the references: BP < 1
    refs = ["the lungs are clear without effusion .", "mild interstitial pulmonary edema"]
    ours = scores.bleu(preds, refs)
    theirs = BLEU(max_ngram_order=2, tokenize="none", smooth_method="none", force=True)
    assert ours["bleu_2"] == pytest.approx(theirs.corpus_score(_joined(preds), [_joined(refs)]).score / 100, abs=1e-9)
    assert ours["brevity_penalty"] == pytest.approx(math.exp(1 - 11 / 7))
    assert ours["length_ratio"] == pytest.approx(7 / 11)
    # Longer hypotheses are not penalized.
    assert scores.bleu(["the lungs are clear . clear ."], ["the lungs are clear ."])["brevity_penalty"] == 1.0


def test_bleu_edge_cases():
    perfect = scores.bleu(REFERENCES, REFERENCES)
    assert all(perfect[f"bleu_{k}"] == pytest.approx(1.0) for k in range(1, 5))
    assert scores.bleu(["", ""], REFERENCES[:2])["bleu_1"] == 0.0  # empty outputs
    # No 4-gram anywhere (3-token hypothesis): BLEU-4 is 0 without smoothing, BLEU-1..3 are not.
    short = scores.bleu(["lungs are clear"], ["lungs are clear"])
    assert short["bleu_3"] == pytest.approx(1.0) and short["bleu_4"] == 0.0
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        scores.bleu(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="no samples"):
        scores.bleu([], [])
    with pytest.raises(TypeError, match=r"predictions\[1\] is NoneType"):
        scores.bleu(["a", None], ["a", "b"])  # type: ignore[list-item]


def test_rouge_l_matches_rouge_score_per_sample():
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"])
    preds = PREDICTIONS + ["", "Clear."]
    refs = REFERENCES + ["No acute process.", ""]
    expected = [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(preds, refs, strict=True)]
    np.testing.assert_allclose(scores.rouge_l_per_sample(preds, refs), expected, rtol=0, atol=1e-12)
    assert scores.rouge_l(preds, refs) == pytest.approx(np.mean(expected), abs=1e-12)
    assert scores.rouge_l(["The Lungs, clear."], ["the lungs clear"]) == 1.0  # case and punctuation ignored


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_comparable_bleu_is_sacrebleu_with_its_defaults(order):
    """The comparable figure is sacrebleu's default corpus BLEU (13a, case-sensitive, exp smoothing), / 100."""
    from sacrebleu.metrics import BLEU

    expected = BLEU(max_ngram_order=order).corpus_score(PREDICTIONS, [REFERENCES]).score / 100
    assert scores.sacrebleu_bleu(PREDICTIONS, REFERENCES)[f"bleu_{order}_13a"] == pytest.approx(expected, abs=1e-12)
    assert 0.0 < expected < 1.0
    # Case-sensitive (unlike the project's own BLEU), and it differs from the project's tokenization.
    upper = [p.upper() for p in PREDICTIONS]
    assert (
        scores.sacrebleu_bleu(upper, REFERENCES)["bleu_1_13a"]
        < scores.sacrebleu_bleu(PREDICTIONS, REFERENCES)["bleu_1_13a"]
    )
    assert scores.bleu(upper, REFERENCES)["bleu_1"] == scores.bleu(PREDICTIONS, REFERENCES)["bleu_1"]


def test_comparable_bleu_per_study_stats_recompute_sacrebleu_on_any_resample():
    """The bootstrap's resamples (repeats included) score exactly what sacrebleu scores on that resampled corpus."""
    from sacrebleu.metrics import BLEU

    metric = scores.sacrebleu_metric(PREDICTIONS, REFERENCES, order=4)
    rng = np.random.default_rng(3)
    for idx in [np.arange(10), rng.integers(0, 10, 10), np.array([5, 5, 1]), np.array([6])]:
        expected = BLEU().corpus_score([PREDICTIONS[i] for i in idx], [[REFERENCES[i] for i in idx]]).score / 100
        assert metric(idx) == pytest.approx(expected, abs=1e-12)
    weights = np.stack([np.bincount(rng.integers(0, 10, 10), minlength=10) for _ in range(4)])
    assert metric.from_weights(weights).shape == (4,)
    assert scores.sacrebleu_bleu(["", "x"], ["a b", "x"])["bleu_1_13a"] >= 0.0  # an empty output is scorable


def test_holm_known_answer():
    # m = 4 defined: sorted 0.01, 0.02, 0.03, 0.04 -> x4, x3, x2, x1 = 0.04, 0.06, 0.06, 0.04 -> running max
    # 0.04, 0.06, 0.06, 0.06; the NaN (an undefined comparison) stays NaN and does not count in m.
    adjusted = stats.holm_adjust([0.03, float("nan"), 0.01, 0.04, 0.02])
    np.testing.assert_allclose(adjusted, [0.06, np.nan, 0.04, 0.06, 0.06], rtol=0, atol=1e-15)
    np.testing.assert_allclose(stats.holm_adjust([0.5, 0.9]), [1.0, 1.0])  # capped at 1
    assert stats.holm_adjust([0.2]).tolist() == [0.2]  # one test: unchanged
    assert np.isnan(stats.holm_adjust([float("nan")])).all() and stats.holm_adjust([]).size == 0


# --------------------------------------------------------------------------------------------- CheXpert
REFS_CX = [
    {"Cardiomegaly": "Positive", "Edema": "Uncertain", "No Finding": "Negative"},
    {"No Finding": "Positive"},
    {"Pleural Effusion": "Positive", "Atelectasis": "Positive", "Support Devices": "Positive"},
    {"Lung Opacity": "Positive", "Pneumonia": "Uncertain"},
]


def test_chexpert_perfect_prediction():
    out = scores.chexpert_scores(REFS_CX, REFS_CX)
    assert out["valid_rate"] == 1.0 and out["n"] == 4
    for conv in scores.CONVENTIONS:
        for key in ("micro_f1", "macro_f1", "micro_f1_5", "macro_f1_5"):
            assert out[f"{conv}/{key}"] == 1.0
    # Labels positive nowhere have no F1 by default (and are left out of macro); zero_division fills them in.
    assert math.isnan(out["u_pos/f1/Fracture"]) and out["u_pos/support/Fracture"] == 0
    assert scores.chexpert_scores(REFS_CX, REFS_CX, zero_division=1.0)["u_pos/f1/Fracture"] == 1.0


def test_chexpert_uncertain_conventions():
    refs = [{"Edema": "Uncertain", "Cardiomegaly": "Positive"}]
    preds = [{"Edema": "Positive", "Cardiomegaly": "Uncertain"}]
    out = scores.chexpert_scores(preds, refs)
    # u_pos: both labels positive on both sides. u_neg: Edema is a FP, Cardiomegaly a FN.
    assert out["u_pos/micro_f1"] == 1.0 and out["u_pos/f1/Edema"] == 1.0
    assert out["u_neg/f1/Edema"] == 0.0 and out["u_neg/f1/Cardiomegaly"] == 0.0 and out["u_neg/micro_f1"] == 0.0
    assert out["u_pos/support/Edema"] == 1 and out["u_neg/support/Edema"] == 0


def test_chexpert_partial_missing_extra_and_invalid_predictions():
    preds = [
        {"Cardiomegaly": "Positive", "Made Up Label": "Positive"},  # Edema, No Finding missing; extra label ignored
        None,  # invalid (e.g. no CheXpert block): all labels not positive
        {"Pleural Effusion": "Positive", "Atelectasis": "Maybe"},  # value outside the vocabulary: invalid
        {"Lung Opacity": "Positive", "Pneumonia": "Uncertain", "Fracture": "Positive"},  # one false positive
    ]
    out = scores.chexpert_scores(preds, REFS_CX)
    assert out["valid_rate"] == 0.5
    # u_neg positives: refs {Cardiomegaly, No Finding, PE, Atelectasis, Support Devices, Lung Opacity} = 6,
    # preds {Cardiomegaly, Lung Opacity, Fracture}: TP 2, FP 1, FN 4.
    assert out["u_neg/micro_f1"] == pytest.approx(4 / (4 + 1 + 4))
    assert out["u_neg/f1/Fracture"] == 0.0 and out["u_neg/f1/Pleural Effusion"] == 0.0
    # CHEXPERT_5 u_neg: Cardiomegaly TP; PE, Atelectasis FN -> micro 2/4; macro over the 3 defined labels.
    assert out["u_neg/micro_f1_5"] == pytest.approx(2 / 4)
    assert out["u_neg/macro_f1_5"] == pytest.approx((1 + 0 + 0) / 3)


def test_chexpert_all_negative_and_empty_predictions():
    out = scores.chexpert_scores([{}, {}, {}, {"No Finding": "Negative"}], REFS_CX)
    assert out["valid_rate"] == 1.0 and out["u_pos/micro_f1"] == 0.0 and out["u_pos/macro_f1"] == 0.0
    with pytest.raises(ValueError, match="no samples"):
        scores.chexpert_scores([], [])
    with pytest.raises(ValueError, match=r"references\[1\]"):
        scores.chexpert_scores([{}, {}], [{}, None])  # type: ignore[list-item]


def test_chexpert_f1_matches_sklearn():
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(0)
    values = np.array(["Positive", "Negative", "Uncertain", None], dtype=object)

    def draw() -> list[dict[str, str]]:
        rows = [
            dict(zip(CHEXPERT_LABELS, rng.choice(values, 14, p=[0.2, 0.3, 0.1, 0.4]), strict=True)) for _ in range(50)
        ]
        # Fracture and Pleural Other never positive on either side: their F1 is undefined.
        return [{k: v for k, v in r.items() if v and k not in ("Fracture", "Pleural Other")} for r in rows]

    refs, preds = draw(), draw()
    five = [CHEXPERT_LABELS.index(k) for k in CHEXPERT_5]
    for conv in scores.CONVENTIONS:
        y_true, y_pred = scores.chexpert_positive(refs, conv), scores.chexpert_positive(preds, conv)
        for zd in (0.0, 1.0):  # sklearn's conventions, over all labels of the set
            out = scores.chexpert_scores(preds, refs, zero_division=zd)
            for avg in ("micro", "macro"):
                assert out[f"{conv}/{avg}_f1"] == pytest.approx(f1_score(y_true, y_pred, average=avg, zero_division=zd))
            assert out[f"{conv}/macro_f1_5"] == pytest.approx(
                f1_score(y_true[:, five], y_pred[:, five], average="macro", zero_division=zd)
            )
        # Default: undefined labels left out = sklearn over the defined labels only.
        out = scores.chexpert_scores(preds, refs)
        defined = (y_true | y_pred).any(axis=0)
        assert defined.sum() == 12
        expected = f1_score(y_true[:, defined], y_pred[:, defined], average="macro")
        assert out[f"{conv}/macro_f1"] == pytest.approx(expected)
        assert math.isnan(out[f"{conv}/f1/Fracture"])


def test_chexpert_majority_baseline():
    train = [
        {"Support Devices": "Positive", "Edema": "Negative"},
        {"Support Devices": "Positive", "Edema": "Uncertain"},
        {"Support Devices": "Negative", "Edema": "Uncertain"},
        {"Edema": "Negative"},  # Edema: Negative 2, Uncertain 2 -> tie goes to Negative
    ]
    baseline = scores.chexpert_majority_baseline(train)
    assert baseline == {"Support Devices": "Positive", "Edema": "Negative"}
    out = scores.chexpert_scores([baseline] * len(REFS_CX), REFS_CX)
    assert out["u_pos/f1/Support Devices"] == pytest.approx(2 / (2 + 3 + 0))  # TP 1, FP 3


def test_chexpert_from_text_parses_reports_and_flags_broken_ones():
    good = records.target_a("Cardiomegaly.", {"Cardiomegaly": "Positive"})
    assert scores.chexpert_from_text(good) == {"Cardiomegaly": "Positive"}
    truncated = good[: good.rindex("}")]  # generation stopped before the closing brace: malformed JSON
    assert scores.chexpert_from_text(truncated) is None
    assert scores.chexpert_from_text("Impression: Cardiomegaly.") is None  # missing CheXpert block
    assert scores.chexpert_from_text("") is None and scores.chexpert_from_text(None) is None
    with pytest.raises(ValueError, match="missing CheXpert block"):
        scores.chexpert_from_text("Impression: x", strict=True)
    # A report without an Impression still has a usable CheXpert block, but the report as a whole is invalid.
    no_impression = good.split("\n\n", 1)[1]
    assert scores.chexpert_from_text(no_impression) == {"Cardiomegaly": "Positive"}
    assert scores.report_validity([good, no_impression, truncated], expect_icd=False).tolist() == [True, False, False]
    assert scores.impression_from_text(good) == "Cardiomegaly." and scores.impression_from_text(no_impression) == ""


# --------------------------------------------------------------------------------------------- ICD
def test_icd_scores_flag_set_validity_and_none_marker():
    refs = [{"pneumonia": True}, {}, {"sepsis": True, "hypoxia": True}]
    preds = [{"pneumonia": True}, {"findings": "None"}, {"sepsis": "yes"}]  # the last is invalid
    assert scores.icd_flag_set(refs) == ICD_FLAGS + ("hypoxia",)
    out = scores.icd_scores(preds, refs)
    assert out["valid_rate"] == pytest.approx(2 / 3)
    assert out["f1/pneumonia"] == 1.0 and out["f1/sepsis"] == 0.0 and out["f1/hypoxia"] == 0.0
    assert out["micro_f1"] == pytest.approx(2 / (2 + 0 + 2))
    assert out["macro_f1"] == pytest.approx(1 / 3)  # pneumonia, sepsis, hypoxia defined; the rest NaN
    assert math.isnan(out["f1/lung_mass"])
    # Flags outside the set (not in ICD_FLAGS nor in the references) are ignored.
    assert scores.icd_scores([{"pneumonia": True, "gout": True}], [{"pneumonia": True}])["micro_f1"] == 1.0
    assert scores.icd_scores([None], [{"pneumonia": True}])["valid_rate"] == 0.0


def test_icd_from_text():
    target = records.target_b("Edema.", {"Edema": "Positive"}, {"pulmonary_edema": True, "sepsis": False})
    assert scores.icd_from_text(target) == {"pulmonary_edema": True}
    assert scores.icd_from_text(records.target_b("Normal.", {}, {})) == {}  # {"findings": "None"}
    assert scores.icd_from_text(records.target_a("Edema.", {"Edema": "Positive"})) is None  # missing ICD block
    assert scores.icd_from_text(target.replace("true", '"true"')) is None  # non-boolean flag
    with pytest.raises(ValueError, match="missing ICD block"):
        scores.icd_from_text("Impression: x", strict=True)


# --------------------------------------------------------------------------------------------- evaluate modules
_EVALUATE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from training.metrics.scores import load_metric
    preds, refs, reports, targets = json.loads(sys.stdin.read())
    out = {"report_text": load_metric("report_text").compute(predictions=preds, references=refs)}
    out["chexpert"] = load_metric("chexpert").compute(predictions=reports, references=targets)
    out["icd"] = load_metric("icd").compute(predictions=reports, references=targets)
    try:
        load_metric("chexpert").compute(predictions=["x"], references=["Impression: no blocks"])
    except ValueError as e:
        out["bad_reference"] = str(e)
    print(json.dumps(out))
    """
)


def test_evaluate_modules_load_offline_from_their_path(tmp_path):
    """One subprocess (importing `evaluate` costs ~8 s) with the hub off and a fresh HF cache."""
    targets = [
        records.target_b("Big heart.", {"Cardiomegaly": "Positive", "Edema": "Uncertain"}, {"chf_exacerbation": True}),
        records.target_b("Pneumonia.", {"Pneumonia": "Positive"}, {"pneumonia": True}),
        records.target_b("Normal.", {"No Finding": "Positive"}, {}),
        records.target_b("Edema.", {"Edema": "Positive"}, {"pulmonary_edema": True}),
    ]
    # ok, broken ICD (invalid JSON), no blocks, no output at all (None reaches _compute through arrow)
    reports = [targets[0], targets[1].replace("true", "TRUE"), "Impression: Normal.", None]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": str(REPO)}
    payload = json.dumps([PREDICTIONS, REFERENCES, reports, targets])
    proc = subprocess.run(
        [sys.executable, "-c", _EVALUATE_SCRIPT], input=payload, env=env, cwd=tmp_path, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])

    def same(a: dict, b: dict) -> None:
        assert a.keys() == b.keys()
        for k in a:
            assert (math.isnan(a[k]) and math.isnan(b[k])) or a[k] == pytest.approx(b[k], abs=1e-12), k

    text_scores = {
        **scores.bleu(PREDICTIONS, REFERENCES),
        **scores.sacrebleu_bleu(PREDICTIONS, REFERENCES),
        "rouge_l": scores.rouge_l(PREDICTIONS, REFERENCES),
    }
    same(out["report_text"], text_scores)
    cx_refs = [scores.chexpert_from_text(t) for t in targets]
    cx = scores.chexpert_scores([scores.chexpert_from_text(t) for t in reports], cx_refs)
    same(out["chexpert"], cx)
    icd = scores.icd_scores([scores.icd_from_text(t) for t in reports], [scores.icd_from_text(t) for t in targets])
    same(out["icd"], icd)
    assert out["chexpert"]["valid_rate"] == pytest.approx(2 / 4) and out["icd"]["valid_rate"] == pytest.approx(1 / 4)
    assert "references[0]" in out["bad_reference"] and "missing CheXpert block" in out["bad_reference"]


_CLINICAL_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from training.metrics.scores import load_metric
    preds, refs = json.loads(sys.stdin.read())
    print(json.dumps(load_metric("clinical_text").compute(predictions=preds, references=refs,
                                                          bertscore_model=sys.argv[1])))
    """
)


@pytest.mark.slow
def test_clinical_evaluate_module_runs_offline_on_a_local_model(tmp_path):
    """The clinical `evaluate` module calls the same code as the launcher; a metric without weights is skipped."""
    from training.metrics.clinical import bertscore_f1_per_sample

    bert = tiny_bert_dir(tmp_path / "tiny-bert")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", _CLINICAL_SCRIPT, str(bert)],
        input=json.dumps([PREDICTIONS, REFERENCES]),
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    expected = bertscore_f1_per_sample(PREDICTIONS, REFERENCES, bert).mean()
    assert out["bertscore_f1"] == pytest.approx(expected, abs=1e-6)
    assert [line.split(" skipped")[0] for line in out["skipped"]] == ["CheXbert F1", "RadGraph F1"]


def test_metric_path_lists_the_shipped_modules():
    for name in scores.METRIC_NAMES:
        assert scores.metric_path(name).is_file()
    with pytest.raises(ValueError, match="unknown metric 'bleu'"):
        scores.metric_path("bleu")


# --------------------------------------------------------------------------------------------- stats
def _labels(rng: np.random.Generator, n: int, prevalence: float = 0.2) -> np.ndarray:
    return rng.random((n, len(CHEXPERT_LABELS))) < prevalence  # (n, 14)


def _noisy(rng: np.random.Generator, truth: np.ndarray, error: float) -> np.ndarray:
    return truth ^ (rng.random(truth.shape) < error)


def _as_dicts(matrix: np.ndarray) -> list[dict[str, str]]:
    return [{k: "Positive" for k, v in zip(CHEXPERT_LABELS, row, strict=True) if v} for row in matrix]


def _micro_f1_arm(pred: np.ndarray, truth: np.ndarray) -> stats.SummedStats:
    return scores.chexpert_f1_metric(_as_dicts(pred), _as_dicts(truth), average="micro")


def test_summed_stats_recompute_corpus_metrics_on_subsets():
    bleu4 = scores.bleu_metric(PREDICTIONS, REFERENCES)
    assert bleu4.value == pytest.approx(scores.bleu(PREDICTIONS, REFERENCES)["bleu_4"])
    idx = np.array([1, 1, 3, 8, 8, 8])  # a resample with repeats = the corpus of those items
    subset = scores.bleu([PREDICTIONS[i] for i in idx], [REFERENCES[i] for i in idx])
    assert bleu4(idx) == pytest.approx(subset["bleu_4"])
    rng = np.random.default_rng(1)
    truth = _labels(rng, 30)
    pred = _noisy(rng, truth, 0.1)
    macro = scores.chexpert_f1_metric(_as_dicts(pred), _as_dicts(truth), average="macro", labels=CHEXPERT_5)
    sub = list(idx)
    expected = scores.chexpert_scores(_as_dicts(pred[sub]), _as_dicts(truth[sub]))["u_pos/macro_f1_5"]
    assert macro(idx) == pytest.approx(expected)


def test_bootstrap_ci_of_a_mean_is_close_to_the_normal_interval():
    values = np.random.default_rng(2).normal(0.5, 0.2, size=400)
    ci = stats.bootstrap_ci(scores.mean_metric(values), n_resamples=2000, seed=0)
    half = 1.96 * values.std() / math.sqrt(len(values))
    assert ci.estimate == pytest.approx(values.mean())
    assert ci.low == pytest.approx(values.mean() - half, abs=0.15 * half)
    assert ci.high == pytest.approx(values.mean() + half, abs=0.15 * half)


def test_vectorized_and_generic_paths_agree_and_are_deterministic():
    bleu2 = scores.bleu_metric(PREDICTIONS, REFERENCES, order=2)

    def generic(idx: np.ndarray) -> float:  # any callable over indices works, one call per resample
        return scores.bleu([PREDICTIONS[i] for i in idx], [REFERENCES[i] for i in idx], max_order=2)["bleu_2"]

    fast = stats.bootstrap_ci(bleu2, n_resamples=50, seed=3)
    slow = stats.bootstrap_ci(generic, 10, n_resamples=50, seed=3)
    assert (fast.estimate, fast.low, fast.high) == pytest.approx((slow.estimate, slow.low, slow.high), abs=1e-12)
    assert fast == stats.bootstrap_ci(bleu2, n_resamples=50, seed=3)
    assert fast != stats.bootstrap_ci(bleu2, n_resamples=50, seed=4)

    rng = np.random.default_rng(5)
    truth = _labels(rng, 40)
    a, b = _micro_f1_arm(_noisy(rng, truth, 0.1), truth), _micro_f1_arm(_noisy(rng, truth, 0.2), truth)
    pooled = stats.SummedStats.concat(a, b)

    def pooled_generic(idx: np.ndarray) -> float:  # a plain callable: takes the one-call-per-permutation path
        return pooled(idx)

    fast_test = stats.paired_randomization_test(pooled, n_permutations=200, seed=7)
    slow_test = stats.paired_randomization_test(pooled_generic, 40, n_permutations=200, seed=7)
    assert fast_test.p_value == slow_test.p_value
    assert fast_test.observed_diff == pytest.approx(slow_test.observed_diff, abs=1e-12)
    fast_diff = stats.paired_bootstrap_diff(pooled, n_resamples=200, seed=7)
    slow_diff = stats.paired_bootstrap_diff(pooled_generic, 40, n_resamples=200, seed=7)
    assert (fast_diff.low, fast_diff.high) == pytest.approx((slow_diff.low, slow_diff.high), abs=1e-12)


def test_ab_test_finds_a_planted_difference():
    rng = np.random.default_rng(10)
    truth = _labels(rng, 200)
    a, b = _micro_f1_arm(_noisy(rng, truth, 0.05), truth), _micro_f1_arm(_noisy(rng, truth, 0.10), truth)
    result = stats.compare_arms(a, b, seed=0)
    assert result.test.observed_diff == pytest.approx(a.value - b.value) and result.test.observed_diff > 0
    assert result.test.p_value < 0.05
    assert 0 < result.diff.low < result.diff.estimate < result.diff.high
    assert result.a.low < a.value < result.a.high


def test_ab_test_does_not_find_a_difference_in_null_data():
    """One seeded null experiment (~5% of seeds give p < 0.05 by design; the next test checks that rate)."""
    rng = np.random.default_rng(14)
    truth = _labels(rng, 200)
    a, b = _micro_f1_arm(_noisy(rng, truth, 0.1), truth), _micro_f1_arm(_noisy(rng, truth, 0.1), truth)
    result = stats.compare_arms(a, b, seed=0)
    assert result.test.p_value > 0.05
    assert result.diff.low < 0 < result.diff.high


def test_ab_test_false_positive_rate_is_near_five_percent():
    """Both arms from the same process on the same studies: p < 0.05 should happen in about 5% of experiments."""
    rng = np.random.default_rng(12)
    n_experiments, rejections = 200, 0
    for _ in range(n_experiments):
        truth = _labels(rng, 100)
        pooled = stats.SummedStats.concat(
            _counts_metric(_noisy(rng, truth, 0.15), truth), _counts_metric(_noisy(rng, truth, 0.15), truth)
        )
        rejections += stats.paired_randomization_test(pooled, n_permutations=200, seed=0).p_value < 0.05
    assert 0.01 <= rejections / n_experiments <= 0.10


def _counts_metric(pred: np.ndarray, truth: np.ndarray) -> stats.SummedStats:
    """Micro-F1 straight from matrices (skips building dicts, for the many-experiment test)."""
    counts = scores.f1_counts(pred, truth)  # (n, 14, 3)
    return stats.SummedStats(
        counts.reshape(len(pred), -1), lambda s: scores.f1_from_counts(s.reshape(s.shape[:-1] + (14, 3)), "micro")
    )


def test_stats_input_errors():
    with pytest.raises(ValueError, match="2n items"):
        stats.paired_randomization_test(scores.mean_metric([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="pass n"):
        stats.bootstrap_ci(lambda idx: 0.0)
    with pytest.raises(ValueError, match="same studies"):
        stats.compare_arms(scores.mean_metric([1.0]), scores.mean_metric([1.0, 2.0]))


def test_bootstrap_interval_ignores_resamples_where_the_metric_is_undefined():
    values = np.array([1.0] + [0.0] * 9)

    def share_of_ones_among_first(idx):  # undefined (NaN) when the resample misses item 0
        return float(values[idx].mean()) if 0 in idx else math.nan

    ci = stats.bootstrap_ci(share_of_ones_among_first, 10, n_resamples=300, seed=1)
    assert math.isfinite(ci.low) and math.isfinite(ci.high) and 0.0 < ci.low <= ci.high <= 1.0
    nowhere = stats.bootstrap_ci(lambda idx: math.nan, 10, n_resamples=20, seed=1)
    assert math.isnan(nowhere.low) and math.isnan(nowhere.high)


# --------------------------------------------------------------------------------------------- clinical metrics
# Tiny random-weight checkpoints of the real architectures, built here: the numbers mean nothing; loading, the file
# formats, the label mapping and the aggregation are what is tested.
TINY_VOCAB = [
    "[PAD]",
    "[UNK]",
    "[CLS]",
    "[SEP]",
    "[MASK]",
    "the",
    "lungs",
    "are",
    "clear",
    "no",
    "acute",
    "process",
    "edema",
    "effusion",
    ".",
    ",",
    "heart",
    "size",
    "normal",
    "mild",
    "pleural",
    "small",
    "right",
    "left",
]


def tiny_bert_dir(path: Path, seed: int = 0) -> Path:
    """A BERT directory as a hub download has it (config.json, model.safetensors, vocab.txt, tokenizer files)."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.txt").write_text("\n".join(TINY_VOCAB) + "\n")
    BertTokenizer(str(path / "vocab.txt"), model_max_length=512).save_pretrained(str(path))
    torch.manual_seed(seed)
    BertModel(
        BertConfig(
            vocab_size=len(TINY_VOCAB),
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=512,
        )
    ).save_pretrained(str(path))
    return path


def tiny_chexbert_dir(path: Path, forced_classes: list[int] | None = None) -> Path:
    """chexbert.pth in the original's format ({"model_state_dict": {"module.bert.*", "module.linear_heads.i.*"}}) next
    to bert-base-uncased-style config and vocab. With `forced_classes` every head's weights are 0 and its bias one-hot,
    so the labeler outputs exactly those classes for any text."""
    import torch
    from transformers import BertModel

    tiny_bert_dir(path)
    bert = BertModel.from_pretrained(str(path))
    state = {f"module.bert.{k}": v for k, v in bert.state_dict().items()}
    gen = torch.Generator().manual_seed(1)
    for i in range(14):
        n_classes = 4 if i < 13 else 2
        weight, bias = torch.randn(n_classes, 32, generator=gen), torch.randn(n_classes, generator=gen)
        if forced_classes is not None:
            weight, bias = (
                torch.zeros(n_classes, 32),
                torch.nn.functional.one_hot(torch.tensor(forced_classes[i]), n_classes).float() * 10,
            )
        state[f"module.linear_heads.{i}.weight"], state[f"module.linear_heads.{i}.bias"] = weight, bias
    torch.save({"model_state_dict": state}, path / "chexbert.pth")
    (path / "model.safetensors").unlink()  # the labeler's weights live in chexbert.pth only, as in the real download
    return path


def test_chexbert_class_mapping_known_answer():
    from training.metrics.clinical import CHEXBERT_HEADS, chexbert_dict

    classes = [0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1]  # blank, positive, negative, uncertain, ...; No Finding: pos
    d = chexbert_dict(classes)
    assert d == {
        "Cardiomegaly": "Positive",
        "Lung Opacity": "Negative",
        "Lung Lesion": "Uncertain",
        "Consolidation": "Positive",
        "Pneumonia": "Negative",
        "Atelectasis": "Uncertain",
        "Pleural Effusion": "Positive",
        "Pleural Other": "Negative",
        "Fracture": "Uncertain",
        "No Finding": "Positive",
    }
    assert set(CHEXBERT_HEADS) == set(CHEXPERT_LABELS)  # every head maps onto the project's 14 labels
    with pytest.raises(ValueError, match="14 outputs"):
        chexbert_dict([1, 2])


def test_chexbert_f1_aggregation_known_answer():
    from training.metrics.clinical import chexbert_stats

    preds = [{"Edema": "Positive"}, {"Edema": "Uncertain"}, {"Cardiomegaly": "Positive"}]
    refs = [{"Edema": "Positive"}, {"Edema": "Positive"}, {"Cardiomegaly": "Negative"}]
    s = {k: v.value for k, v in chexbert_stats(preds, refs).items()}
    # U+: Edema TP 2; Cardiomegaly FP 1 -> micro 2*2/(4+1) = 0.8; macro over defined labels (Edema 1, Cardio 0) = 0.5
    assert s["chexbert/u_pos/micro_f1"] == pytest.approx(0.8) and s["chexbert/u_pos/macro_f1"] == pytest.approx(0.5)
    # U-: Edema TP 1 FN 1, Cardiomegaly FP 1 -> micro 2/(2+1+1) = 0.5; macro (2/3 + 0) / 2
    assert s["chexbert/u_neg/micro_f1"] == pytest.approx(0.5)
    assert s["chexbert/u_neg/macro_f1_5"] == pytest.approx(1 / 3)


def test_chexbert_labeler_loads_a_local_checkpoint_end_to_end(tmp_path):
    from training.metrics.clinical import CheXbertLabeler, ClinicalScorers, chexbert_dict

    forced = [1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 0]
    labeler = CheXbertLabeler(tiny_chexbert_dir(tmp_path / "forced", forced))
    texts = ["The lungs are clear.", "", "mild edema " * 400]  # empty text and one past 512 tokens
    assert labeler.label(texts) == [chexbert_dict(forced)] * 3

    random_dir = tiny_chexbert_dir(tmp_path / "random")
    scorers = ClinicalScorers.load(str(random_dir), None, None)
    assert len(scorers.skipped) == 2 and "RadGraph" in scorers.skipped[0] and "BERTScore" in scorers.skipped[1]
    stats_ = scorers.stats(PREDICTIONS, REFERENCES)
    assert set(stats_) == {
        f"clinical/chexbert/{c}/{a}_f1{s}" for c in ("u_pos", "u_neg") for a in ("micro", "macro") for s in ("", "_5")
    }
    same = scorers.stats(REFERENCES, REFERENCES)  # a labeler agrees with itself: every defined F1 is 1
    assert all(math.isnan(v.value) or v.value == 1.0 for v in same.values())
    assert len(stats_["clinical/chexbert/u_neg/micro_f1"]) == len(PREDICTIONS)  # per study, for the bootstrap

    (random_dir / "chexbert.pth").write_bytes(b"")
    with pytest.raises(Exception):
        CheXbertLabeler(random_dir)
    import torch

    torch.save(
        {"model_state_dict": {"module.bert.pooler.dense.weight": torch.zeros(32, 32)}}, random_dir / "chexbert.pth"
    )
    with pytest.raises(ValueError, match="not a CheXbert checkpoint"):
        CheXbertLabeler(random_dir)
    with pytest.raises(FileNotFoundError, match="chexbert.pth"):
        CheXbertLabeler(tmp_path)


def test_bertscore_from_a_local_model_directory_matches_bert_score(tmp_path):
    from bert_score import BERTScorer

    from training.metrics.clinical import bertscore_f1_per_sample, bertscore_layer

    d = tiny_bert_dir(tmp_path / "tiny-bert")
    assert bertscore_layer(d) == 2  # not in bert-score's table: the model's last layer
    preds, refs = ["The lungs are clear.", "mild edema", "", "no effusion"], ["lungs clear", "mild edema .", "x", ""]
    f1 = bertscore_f1_per_sample(preds, refs, d)
    assert f1[2] == 0.0 and f1[3] == 0.0  # an empty side scores 0, as bert-score documents
    _, _, expected = BERTScorer(model_type=str(d), num_layers=2).score(preds[:2], refs[:2])
    np.testing.assert_allclose(f1[:2], expected.double().numpy(), rtol=0, atol=1e-6)
    assert bertscore_f1_per_sample(["mild edema"], ["mild edema"], d)[0] == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(FileNotFoundError, match="--bertscore-model"):
        bertscore_f1_per_sample(preds, refs, tmp_path)


def test_radgraph_is_refused_up_front_with_the_reason(tmp_path):
    """RadGraph F1 cannot run beside transformers 5 (radgraph's vendored allennlp needs tokenizer.encode_plus): a
    --radgraph directory is refused before any generation, naming what is missing or why it cannot run."""
    from training.metrics.clinical import ClinicalScorers, radgraph_unavailable

    with pytest.raises(FileNotFoundError, match=r"--radgraph .*no .*radgraph"):
        ClinicalScorers.load(None, str(tmp_path), None)
    (tmp_path / "radgraph").mkdir()
    (tmp_path / "radgraph" / "config.json").write_text("{}")
    why = radgraph_unavailable()
    assert why  # this stack: radgraph not installed, or transformers >= 5
    with pytest.raises(RuntimeError, match="cannot run here"):
        ClinicalScorers.load(None, str(tmp_path), None)
    with pytest.raises(FileNotFoundError, match="--bertscore-model"):
        ClinicalScorers.load(None, None, str(tmp_path))
