"""`launcher evaluate`: the studies and arms, scoring and the paired A/B on known outputs (fast), and the whole command
on a tiny trained checkpoint (slow: both arms, paired ids, metrics.json keys, report.md, no predictions file unless
asked, an MLflow run without patient data)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from conftest import REPO, tiny_overrides
from datasets_io.records import PROMPT_A, ehr_from_prompt, parse_target, target_b, with_empty_ehr
from datasets_io.errors import LauncherError


# --------------------------------------------------------------------------------------------- patient-data scan
def patient_data_needles(data_files: list[Path]) -> tuple[set[str], set[str], set[float]]:
    """What must never reach MLflow: impressions and prompt fragments (as substrings), EHR words (as whole words:
    "copd" may not appear alone, "copd_exacerbation" is a flag name) and EHR numbers."""
    strings = {"Patient Data", "reference_range", "Impression:", "Chronic_conditions"}
    words: set[str] = set()
    numbers: set[float] = set()
    for path in data_files:
        for line in Path(path).read_text().splitlines():
            row = json.loads(line)
            impression = parse_target(row["target"], expect_icd=row["stage"] == "B").impression
            if impression and len(impression) >= 12:
                strings.add(impression)
            ehr = ehr_from_prompt(row["prompt"])
            for value in _leaves(ehr or {}):
                if isinstance(value, str) and len(value) >= 3:
                    words.add(value)
                elif isinstance(value, float) and not value.is_integer() and abs(value) > 1:
                    numbers.add(value)  # vitals and labs, e.g. 79.9 (not 0.5: F1s and p-values live in [0, 1])
    return strings, words, numbers


def _leaves(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _leaves(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _leaves(v)
    else:
        yield obj


def assert_no_patient_data(tracking_uri: str, data_files: list[Path]) -> int:
    """Scan every run's params, tags and metrics (names and values) and every model version's tags. Returns #runs."""
    import mlflow

    strings, words, numbers = patient_data_needles(data_files)
    word_re = re.compile(r"\b(" + "|".join(map(re.escape, sorted(words))) + r")\b") if words else None
    numbers_text = {str(n) for n in numbers if len(str(n)) >= 4}
    client = mlflow.MlflowClient(tracking_uri)
    exps = client.search_experiments()
    runs = client.search_runs([e.experiment_id for e in exps], max_results=1000)
    texts: list[tuple[str, str]] = []
    for run in runs:
        texts += [(f"param {k}", f"{k}={v}") for k, v in run.data.params.items()]
        texts += [(f"tag {k}", f"{k}={v}") for k, v in run.data.tags.items()]
        texts += [(f"metric {k}", k) for k in run.data.metrics]
        for k, v in run.data.metrics.items():
            ehr_like = any(math.isclose(v, n, rel_tol=0, abs_tol=1e-9) for n in numbers)
            assert not ehr_like, f"metric {k}={v} is an EHR value"
        for k, v in {**run.data.params, **run.data.tags}.items():
            assert v not in numbers_text, f"{k}={v} is an EHR value"
    for rm in client.search_registered_models():
        for mv in client.search_model_versions(f"name='{rm.name}'"):
            texts += [(f"model version tag {k}", f"{k}={v}") for k, v in mv.tags.items()]
            for k, v in mv.tags.items():
                assert v not in numbers_text, f"model version tag {k}={v} is an EHR value"
    for where, text in texts:
        leaked = [s for s in strings if s in text] + (word_re.findall(text) if word_re else [])
        assert not leaked, f"{where} holds patient data: {leaked[:2]}"
    assert runs
    return len(runs)


# --------------------------------------------------------------------------------------------- fast: no model
@pytest.fixture(scope="module")
def train_file(synth_dir) -> str:
    return str(synth_dir / "curriculum_train.jsonl")


def test_studies_are_paired_and_arms_share_image_and_target(synth_dir, train_file):
    from training.evaluation.studies import arms_for, load_studies

    studies = load_studies(train_file, str(synth_dir), limit=5)
    assert len(studies) == 5 and len({s.study_id for s in studies}) == 5
    for s in studies:
        assert s.has_ehr
        assert s.prompt("ehr_on") == s.prompt_b and ehr_from_prompt(s.prompt("ehr_on"))
        assert s.prompt("ehr_off") == with_empty_ehr(s.prompt_b) and ehr_from_prompt(s.prompt("ehr_off")) == {}
        assert s.prompt("stage_a") == PROMPT_A
        assert parse_target(s.target, expect_icd=True).valid  # every arm scores against the Stage B target
    assert arms_for("both", studies) == ("ehr_on", "ehr_off", "stage_a")
    assert arms_for("off", studies) == ("ehr_off", "stage_a")
    with pytest.raises(LauncherError, match="--ehr"):
        arms_for("sometimes", studies)


def test_bad_inputs_are_user_errors(synth_dir, tmp_path):
    from training.evaluation.studies import load_studies

    with pytest.raises(LauncherError, match="not found"):
        load_studies(str(tmp_path / "nope.jsonl"), str(synth_dir))
    with pytest.raises(LauncherError, match="--limit"):
        load_studies(str(synth_dir / "curriculum_val.jsonl"), str(synth_dir), limit=0)
    with pytest.raises(LauncherError, match="image"):
        load_studies(str(synth_dir / "curriculum_val.jsonl"), str(tmp_path))


def _arms_from_targets(studies, drop_icd_in_off: bool):
    """Outputs of an oracle: ehr_on copies the target; ehr_off the same without ICD flags (what EHR would add)."""
    from training.evaluation.generation import ArmOutput

    on = [s.target for s in studies]
    off = []
    for s in studies:
        p = parse_target(s.target, expect_icd=True)
        off.append(target_b(p.impression, p.chexpert, {}) if drop_icd_in_off else s.target)
    stage_a = [s.target.split("\n\nICD:")[0] for s in studies]
    return {
        "ehr_on": ArmOutput("ehr_on", on),
        "ehr_off": ArmOutput("ehr_off", off),
        "stage_a": ArmOutput("stage_a", stage_a),
    }


def test_scores_and_paired_ab_on_known_outputs(synth_dir, train_file):
    from training.evaluation.options import EvalOptions
    from training.evaluation.scoring import References, score_model
    from training.evaluation.studies import load_studies

    studies = load_studies(train_file, str(synth_dir), limit=40)
    refs = References.of(studies)
    assert sum(any(r.values()) for r in refs.icd) >= 5, "need ICD positives for the A/B to mean something"
    opts = EvalOptions(data="", data_root="", out="", n_resamples=200)
    section, stats = score_model(_arms_from_targets(studies, drop_icd_in_off=True), studies, opts)

    on, off, a = (section["arms"][k] for k in ("ehr_on", "ehr_off", "stage_a"))
    assert on["validity"] == {"report": 1.0, "chexpert": 1.0, "icd": 1.0}
    assert a["validity"] == {"report": 1.0, "chexpert": 1.0} and "icd" not in a
    assert on["chexpert"]["u_pos/micro_f1"] == 1.0 and on["chexpert"]["u_neg/macro_f1_5"] == 1.0
    assert on["text"]["bleu_4"] == pytest.approx(1.0) and on["text"]["rouge_l"] == pytest.approx(1.0)
    assert on["icd"]["micro_f1"] == 1.0 and off["icd"]["micro_f1"] == 0.0
    assert on["ci"]["icd/micro_f1"] == {"estimate": 1.0, "low": 1.0, "high": 1.0}

    ab = section["ab"]["ehr_on-ehr_off"]
    assert ab["icd/micro_f1"]["diff"] == 1.0 and ab["icd/micro_f1"]["p_value"] < 0.01
    assert ab["chexpert/u_pos/macro_f1"]["diff"] == 0.0 and ab["chexpert/u_pos/macro_f1"]["p_value"] == 1.0
    assert set(ab["text/rouge_l"]) == {"a", "b", "diff", "diff_low", "diff_high", "p_value", "p_holm", "n"}
    assert ab["text/bleu_4_13a"]["a"] == pytest.approx(1.0) and ab["text/rouge_l"]["n"] == 40
    assert ab["icd/micro_f1"]["p_holm"] >= ab["icd/micro_f1"]["p_value"]  # Holm never lowers a p-value
    assert not any(k.startswith("icd/") for k in section["ab"]["ehr_on-stage_a"])  # Stage A answers no ICD
    assert section["ab"]["ehr_on-stage_a"]["chexpert/u_pos/micro_f1"]["diff"] == 0.0


def variant_file(synth_dir: Path, out: Path, *, no_icd: bool = False, drop_stage_b: int = 0) -> Path:
    """The val file, rewritten: with `no_icd` every Stage B target flags no ICD code (so ICD F1 is undefined when the
    model flags none either); the first `drop_stage_b` studies lose their Stage B row (no admission, as in MIMIC)."""
    rows = [json.loads(line) for line in (synth_dir / "curriculum_val.jsonl").read_text().splitlines()]
    dropped = list(dict.fromkeys(r["study_id"] for r in rows))[:drop_stage_b]
    kept = []
    for r in rows:
        if r["stage"] == "B" and r["study_id"] in dropped:
            continue
        if r["stage"] == "B" and no_icd:
            p = parse_target(r["target"], expect_icd=True)
            r = {**r, "target": target_b(p.impression, p.chexpert, {})}
        kept.append(r)
    out.write_text("".join(json.dumps(r) + "\n" for r in kept))
    return out


def test_limit_is_a_seeded_random_sample_in_file_order(synth_dir, train_file):
    from training.evaluation.studies import load_studies

    every = [s.study_id for s in load_studies(train_file, str(synth_dir))]
    picks = {
        seed: [s.study_id for s in load_studies(train_file, str(synth_dir), limit=5, seed=seed)] for seed in (0, 1)
    }
    assert picks[0] == [s.study_id for s in load_studies(train_file, str(synth_dir), limit=5, seed=0)]
    assert picks[0] != picks[1] and picks[0] != every[:5]  # not the file's first subjects
    for pick in picks.values():
        assert len(set(pick)) == 5 and pick == [sid for sid in every if sid in pick]  # kept in file order
    assert len(load_studies(train_file, str(synth_dir), limit=10_000)) == len(every)


def test_image_only_arm_covers_studies_without_a_stage_b_row(synth_dir, tmp_path):
    from training.evaluation.generation import ArmOutput
    from training.evaluation.options import EvalOptions
    from training.evaluation.scoring import score_model
    from training.evaluation.studies import arm_coverage, arm_indices, arms_for, load_studies

    data = variant_file(synth_dir, tmp_path / "val.jsonl", drop_stage_b=2)
    studies = load_studies(str(data), str(synth_dir))
    assert len(studies) == 7 and sum(s.has_ehr for s in studies) == 5
    arms = arms_for("both", studies)
    assert arms == ("ehr_on", "ehr_off", "stage_a")
    assert arm_indices("stage_a", studies) == list(range(7)) and arm_indices("ehr_on", studies) == list(range(2, 7))
    coverage = arm_coverage(arms, studies)
    assert coverage["stage_a"]["n"] == 7 and coverage["ehr_off"]["n"] == 5 and coverage["ehr_on"]["of"] == 7
    assert (
        coverage["ehr_on"]["studies_sha256"]
        == coverage["ehr_off"]["studies_sha256"]
        != coverage["stage_a"]["studies_sha256"]
    )

    outputs = {
        arm: ArmOutput(arm, [studies[i].target for i in arm_indices(arm, studies)], indices=arm_indices(arm, studies))
        for arm in arms
    }
    section, _ = score_model(outputs, studies, EvalOptions(data="", data_root="", out="", n_resamples=50))
    assert section["arms"]["stage_a"]["n"] == 7 and section["arms"]["ehr_on"]["n"] == 5
    # its 2 extra studies score against their Stage A target
    assert section["arms"]["stage_a"]["chexpert"]["u_pos/micro_f1"] == 1.0
    assert section["ab"]["ehr_on-stage_a"]["text/rouge_l"]["n"] == 5  # paired on the studies both arms cover
    assert section["ab"]["ehr_on-ehr_off"]["icd/micro_f1"]["n"] == 5


def test_predictions_pair_each_text_with_its_own_study(synth_dir, tmp_path):
    """An EHR arm covers only the studies with a Stage B row: its i-th text belongs to its i-th covered study, not to
    the i-th study of the file."""
    from training.evaluation.generation import ArmOutput
    from training.evaluation.report import write_predictions
    from training.evaluation.studies import arm_indices, load_studies

    studies = load_studies(str(variant_file(synth_dir, tmp_path / "val.jsonl", drop_stage_b=2)), str(synth_dir))
    outputs = {
        "model": {
            arm: ArmOutput(
                arm,
                [f"text of {studies[i].study_id}" for i in arm_indices(arm, studies)],
                indices=arm_indices(arm, studies),
            )
            for arm in ("ehr_on", "stage_a")
        }
    }
    write_predictions(tmp_path / "predictions.jsonl", studies, outputs)
    rows = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert [r["arm"] for r in rows] == ["ehr_on"] * 5 + ["stage_a"] * 7
    assert all(r["generated"] == f"text of {r['study_id']}" for r in rows)
    targets = {s.study_id: s.target for s in studies}
    assert all(r["target"] == targets[r["study_id"]] for r in rows)


def test_undefined_comparison_is_written_as_undefined(synth_dir, tmp_path):
    from training.evaluation.generation import ArmOutput
    from training.evaluation.options import EvalOptions
    from training.evaluation.report import json_safe
    from training.evaluation.scoring import score_model
    from training.evaluation.studies import load_studies

    studies = load_studies(str(variant_file(synth_dir, tmp_path / "val.jsonl", no_icd=True)), str(synth_dir))
    outputs = {arm: ArmOutput(arm, [s.target for s in studies]) for arm in ("ehr_on", "ehr_off")}
    section, _ = score_model(outputs, studies, EvalOptions(data="", data_root="", out="", n_resamples=50))
    icd = section["ab"]["ehr_on-ehr_off"]["icd/micro_f1"]  # no ICD positive anywhere: F1 undefined on both sides
    assert "undefined" in icd and math.isnan(icd["diff"]) and math.isnan(icd["p_value"]) and math.isnan(icd["p_holm"])
    assert json.loads(json.dumps(json_safe(icd)))["p_value"] is None
    rouge = section["ab"]["ehr_on-ehr_off"]["text/rouge_l"]
    assert "undefined" not in rouge and rouge["p_value"] == 1.0 and rouge["p_holm"] == 1.0


def test_malformed_output_scores_as_invalid_not_a_crash(synth_dir, train_file):
    from training.evaluation.generation import ArmOutput
    from training.evaluation.options import EvalOptions
    from training.evaluation.scoring import score_model
    from training.evaluation.studies import load_studies

    studies = load_studies(train_file, str(synth_dir), limit=8)
    junk = ["", 'Impression: x\n\nCheXpert:\n{"Edema": ', "<unk>" * 30, "ICD:\n{", None, "}{", "\n", "Impression:"]
    outputs = {"ehr_on": ArmOutput("ehr_on", [t or "" for t in junk])}
    section, _ = score_model(outputs, studies, EvalOptions(data="", data_root="", out="", n_resamples=50))
    arm = section["arms"]["ehr_on"]
    assert arm["validity"] == {"report": 0.0, "chexpert": 0.0, "icd": 0.0}
    assert arm["chexpert"]["valid_rate"] == 0.0 and arm["problems"]


# Three training studies: their majority is Edema Positive (2 of 3), Cardiomegaly Uncertain (2 of 3), Pleural Effusion
# Negative (2 of 3; absent once); Pneumothorax is absent twice and Positive once, so it is left out of the prediction.
BASELINE_TRAIN = [
    {"Edema": "Positive", "Cardiomegaly": "Uncertain", "Pleural Effusion": "Negative"},
    {"Edema": "Positive", "Cardiomegaly": "Uncertain"},
    {"Edema": "Negative", "Pleural Effusion": "Negative", "Pneumothorax": "Positive"},
]
BASELINE_EVAL = [
    {"Edema": "Positive", "Cardiomegaly": "Positive"},
    {"Edema": "Negative", "Cardiomegaly": "Uncertain", "Pneumothorax": "Positive"},
    {"Edema": "Positive", "Pleural Effusion": "Positive"},
    {},
]


def test_majority_baseline_fits_on_training_data(tmp_path):
    from datasets_io.records import target_a
    from training.evaluation.scoring import References, majority_baseline

    train = tmp_path / "train.jsonl"
    rows = [
        {
            "study_id": str(i),
            "image": f"{i}.jpg",
            "prompt": PROMPT_A,
            "mode": "image_only",
            "stage": "A",
            "target": target_a("Finding.", labels),
        }
        for i, labels in enumerate(BASELINE_TRAIN)
    ]
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    refs = References(["Finding."] * len(BASELINE_EVAL), BASELINE_EVAL, None)
    section, stats = majority_baseline(refs, str(train), str(tmp_path), n_resamples=50, seed=0)
    assert section["fit_on"] == "training data"
    assert section["prediction"] == {"Edema": "Positive", "Cardiomegaly": "Uncertain", "Pleural Effusion": "Negative"}
    # u_pos (Uncertain counts as positive): the prediction says Edema and Cardiomegaly in every study.
    #   study 1: Edema tp, Cardiomegaly tp | 2: Edema fp, Cardiomegaly tp (Uncertain), Pneumothorax fn
    #   study 3: Edema tp, Cardiomegaly fp, Pleural Effusion fn | 4: Edema fp, Cardiomegaly fp
    #   micro: tp 4, fp 4, fn 2 -> 2*4 / (2*4 + 4 + 2) = 4/7; macro over the four labels that occur: Edema 2/3,
    #   Cardiomegaly 2/3, Pneumothorax 0, Pleural Effusion 0 -> 1/3 (labels never positive anywhere are undefined)
    # u_neg: only Edema is predicted positive: tp 2 (studies 1, 3), fp 2 (2, 4), fn 3 (Cardiomegaly in 1,
    #   Pneumothorax in 2, Pleural Effusion in 3) -> 2*2 / (2*2 + 2 + 3) = 4/9
    chexpert = section["chexpert"]
    assert chexpert["u_pos/micro_f1"] == pytest.approx(4 / 7)
    assert chexpert["u_pos/macro_f1"] == pytest.approx(1 / 3)
    assert chexpert["u_neg/micro_f1"] == pytest.approx(4 / 9)
    assert section["ci"]["chexpert/u_pos/micro_f1"]["estimate"] == pytest.approx(4 / 7)
    assert stats.indices == [0, 1, 2, 3]

    # No readable training file: fit on the evaluation references, where only Edema has a majority (Positive, 2 of 4).
    fallback, _ = majority_baseline(refs, str(tmp_path / "missing.jsonl"), None, n_resamples=50, seed=0)
    assert fallback["fit_on"] == "evaluation data" and fallback["prediction"] == {"Edema": "Positive"}
    # u_pos: Edema tp in 1, 3, fp in 2, 4; fn: Cardiomegaly in 1, 2, Pneumothorax in 2, Pleural Effusion in 3
    assert fallback["chexpert"]["u_pos/micro_f1"] == pytest.approx(2 * 2 / (2 * 2 + 2 + 4))


def test_evaluate_needs_exactly_one_model_source():
    from launcher.cli import build_parser

    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["evaluate", "--data", "x.jsonl", "--out", "o"])
    with pytest.raises(SystemExit):
        parser.parse_args(["evaluate", "--checkpoint", "c", "--model", "models:/m@a", "--data", "x", "--out", "o"])
    args = parser.parse_args(["evaluate", "--checkpoint", "c", "--data", "x", "--out", "o"])
    assert args.ehr == "both" and args.limit is None and not args.save_predictions


# --------------------------------------------------------------------------------------------- slow: the command
REGISTERED_NAME, REGISTERED_ALIAS = "cxr-test", "candidate"


def tiny_trained_run(synth_dir: Path, tmp_path_factory) -> Path:
    """One tiny run per test session, shared by test_evaluate and test_registry (training is the slow part):
    6 steps -> checkpoints/stage_A_end (step 2) and checkpoints/final, MLflow in <run>/mlflow.db, and the final
    bundle registered at the end of training as cxr-test@candidate (mlflow.register_at_end)."""
    from datasets_io.config import load_config
    from launcher.local import run_local

    out = tmp_path_factory.getbasetemp() / "tiny_trained_run"
    if not (out / "run_summary.json").is_file():
        cfg = load_config(
            REPO / "configs" / "tiny.yaml",
            tiny_overrides(
                synth_dir,
                out,
                **{
                    "mlflow.register_at_end": "true",
                    "mlflow.registered_model_name": REGISTERED_NAME,
                    "mlflow.alias": REGISTERED_ALIAS,
                },
            ),
        )
        summary = run_local(cfg, device="cpu", show_progress=False)
        assert set(summary["checkpoints"]) == {"stage_A_end", "final"}
    return out


@pytest.fixture(scope="module")
def trained(synth_dir, tmp_path_factory) -> Path:
    return tiny_trained_run(synth_dir, tmp_path_factory)


@pytest.mark.slow
def test_evaluate_command_ab_plumbing(trained, synth_dir, tmp_path):
    from launcher.cli import main

    val = synth_dir / "curriculum_val.jsonl"
    common = [
        "evaluate",
        "--checkpoint",
        str(trained / "checkpoints" / "final"),
        "--data",
        str(val),
        "--data-root",
        str(synth_dir),
        "--limit",
        "3",
        "--batch-size",
        "3",
        "--max-new-tokens",
        "8",
        "--bootstrap",
        "100",
        "--no-progress",
    ]
    out = tmp_path / "eval"
    assert main([*common, "--ehr", "both", "--out", str(out)]) == 0

    assert not (out / "predictions.jsonl").exists(), "predictions hold patient data: only with --save-predictions"
    assert (out / "report.md").read_text().count("## The EHR A/B test") == 2  # the model and stage_A_end
    assert {p.name for p in (out / "plots").iterdir()} == {"per_label_f1.png", "ab_differences.png"}
    m = json.loads((out / "metrics.json").read_text())
    assert set(m) >= {"evaluation", "models", "baseline", "comparisons", "headline", "mlflow_run_id"}
    assert m["evaluation"]["arms"] == ["ehr_on", "ehr_off", "stage_a"] and m["evaluation"]["n_studies"] == 3
    assert m["evaluation"]["max_new_tokens"] == 8 and m["status"] == "complete"
    assert {c["n"] for c in m["evaluation"]["coverage"].values()} == {3}
    assert "p (Holm)" in (out / "report.md").read_text() and "BLEU-4 (13a)" in (out / "report.md").read_text()
    assert set(m["models"]) == {"model", "stage_A_end"}
    for model in m["models"].values():
        assert set(model["arms"]) == {"ehr_on", "ehr_off", "stage_a"}
        assert all(arm["n"] == 3 for arm in model["arms"].values())
        assert set(model["arms"]["ehr_on"]) >= {"validity", "text", "chexpert", "icd", "ci"}
        assert {arm["max_new_tokens"] for arm in model["arms"].values()} == {8}
        assert set(model["arms"]["stage_a"]["text"]) >= {"bleu_1_13a", "bleu_4_13a", "rouge_l", "bleu_4"}
        ab = model["ab"]["ehr_on-ehr_off"]
        for key in (
            "icd/micro_f1",
            "icd/macro_f1",
            "chexpert/u_pos/macro_f1",
            "chexpert/u_neg/macro_f1_5",
            "text/bleu_4",
            "text/bleu_4_13a",
            "text/rouge_l",
            "validity/report",
        ):
            assert set(ab[key]) - {"undefined"} == {"a", "b", "diff", "diff_low", "diff_high", "p_value", "p_holm", "n"}
            # a sample of 3 studies may hold no positive of a label set: then the comparison is marked undefined
            assert ab[key].get("undefined") or 0.0 < ab[key]["p_value"] <= ab[key]["p_holm"] <= 1.0
    assert m["baseline"]["fit_on"] == "training data"
    assert "model-stage_A_end/ehr_on" in m["comparisons"] and "model-baseline/ehr_on" in m["comparisons"]
    assert {"chexpert_u_pos_macro_f1", "baseline_u_pos_macro_f1_5", "icd_micro_f1_p_value"} <= set(m["headline"])

    # The MLflow run: the evaluation's settings as params, no patient data anywhere in the store.
    import mlflow

    uri = f"sqlite:///{trained / 'mlflow.db'}"
    run = mlflow.MlflowClient(uri).get_run(m["mlflow_run_id"])
    assert run.data.params["eval.ehr"] == "both" and run.data.params["eval.limit"] == "3"
    assert run.data.params["eval.checkpoint"] == str(trained / "checkpoints" / "final")
    assert "model/ab/ehr_on-ehr_off/icd/micro_f1/p_value" in run.data.metrics
    arts = {a.path for a in mlflow.MlflowClient(uri).list_artifacts(run.info.run_id, "evaluation")}
    assert {"evaluation/report.md", "evaluation/metrics.json", "evaluation/plots"} <= arts
    data_files = [val, synth_dir / "curriculum_train.jsonl"]
    assert assert_no_patient_data(uri, data_files) >= 2  # training + evaluation
    # ... and the scan does catch a leak (then the offending run is deleted, so other tests see a clean store).
    client = mlflow.MlflowClient(uri)
    leak = client.create_run(run.info.experiment_id)
    impressions = [
        parse_target(json.loads(line)["target"], expect_icd=False).impression for line in val.read_text().splitlines()
    ]
    client.log_param(leak.info.run_id, "note", max(impressions, key=len))
    with pytest.raises(AssertionError, match="holds patient data"):
        assert_no_patient_data(uri, data_files)
    client.delete_run(leak.info.run_id)

    # --save-predictions: per arm, the same studies in the same order (the pairing), and nothing logged.
    out2 = tmp_path / "eval2"
    assert (
        main([*common, "--ehr", "both", "--no-stage-a-end", "--no-mlflow", "--save-predictions", "--out", str(out2)])
        == 0
    )
    rows = [json.loads(line) for line in (out2 / "predictions.jsonl").read_text().splitlines()]
    by_arm = {arm: [r["study_id"] for r in rows if r["arm"] == arm] for arm in ("ehr_on", "ehr_off", "stage_a")}
    assert len(by_arm["ehr_on"]) == 3 and by_arm["ehr_on"] == by_arm["ehr_off"] == by_arm["stage_a"]
    assert {r["model"] for r in rows} == {"model"}
    assert (
        json.loads((out2 / "metrics.json").read_text())["evaluation"]["studies_sha256"]
        == m["evaluation"]["studies_sha256"]
    )


@pytest.mark.slow
def test_one_generation_budget_for_every_arm(trained, synth_dir):
    """Without --max-new-tokens every arm gets max_seq_len minus the longest prompt of *any* arm (the EHR-on one),
    not its own: the image-only and EHR-off arms would otherwise get more room than EHR-on."""
    from datasets_io.tokens import encode_prompt
    from training.evaluation.generation import load_checkpoint_model, shared_max_new_tokens
    from training.evaluation.options import EvalOptions
    from training.evaluation.studies import arms_for, load_studies

    model = load_checkpoint_model("model", str(trained / "checkpoints" / "final"), "cpu")
    studies = load_studies(str(synth_dir / "curriculum_val.jsonl"), str(synth_dir))
    arms = arms_for("both", studies)
    b = model.bundle
    length = {
        arm: max(len(encode_prompt(b.tokenizer, s.prompt(arm), b.image_token_id, b.num_image_tokens)) for s in studies)
        for arm in arms
    }
    budget, source = shared_max_new_tokens([model], studies, arms, EvalOptions(data="", data_root="", out=""))
    assert length["ehr_on"] > length["ehr_off"] > length["stage_a"]
    assert budget == model.max_seq_len - length["ehr_on"] and str(length["ehr_on"]) in source
    fixed, source = shared_max_new_tokens(
        [model], studies, arms, EvalOptions(data="", data_root="", out="", max_new_tokens=11)
    )
    assert fixed == 11 and source == "--max-new-tokens"


@pytest.mark.slow
def test_limit_3_with_an_undefined_icd_difference_completes(trained, synth_dir, tmp_path):
    """No ICD flag in any reference (and none in 8-token outputs): the ICD difference is undefined; the run still
    writes metrics.json (marked undefined), report.md and plots; the image-only arm covers the studies without
    a Stage B row. The clinical metrics run offline from local tiny CheXbert / BERTScore directories; RadGraph,
    not given, is skipped with its one line."""
    from launcher.cli import main
    from test_metrics import tiny_bert_dir, tiny_chexbert_dir

    data = variant_file(synth_dir, tmp_path / "val.jsonl", no_icd=True, drop_stage_b=2)
    out = tmp_path / "eval"
    assert (
        main(
            [
                "evaluate",
                "--checkpoint",
                str(trained / "checkpoints" / "final"),
                "--data",
                str(data),
                "--data-root",
                str(synth_dir),
                "--limit",
                "3",
                "--seed",
                "2",
                "--batch-size",
                "3",
                "--max-new-tokens",
                "8",
                "--bootstrap",
                "50",
                "--no-progress",
                "--no-stage-a-end",
                "--no-mlflow",
                "--chexbert",
                str(tiny_chexbert_dir(tmp_path / "chexbert")),
                "--bertscore-model",
                str(tiny_bert_dir(tmp_path / "bertscore")),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    m = json.loads((out / "metrics.json").read_text())
    assert m["status"] == "complete" and m["evaluation"]["n_studies"] == 3
    coverage = m["evaluation"]["coverage"]
    assert coverage["stage_a"]["n"] == 3 and coverage["ehr_on"]["n"] == coverage["ehr_off"]["n"]
    icd = m["models"]["model"]["ab"]["ehr_on-ehr_off"]["icd/micro_f1"]
    assert icd["undefined"] and icd["diff"] is None and icd["p_value"] is None and icd["p_holm"] is None
    report = (out / "report.md").read_text()
    assert "| icd/micro_f1 |" in report and "undefined" in report
    for arm in m["models"]["model"]["arms"].values():
        assert {"chexbert/u_neg/micro_f1_5", "chexbert/u_pos/macro_f1", "bertscore_f1"} <= set(arm["clinical"])
        assert "clinical/bertscore_f1" in arm["ci"]
    assert "clinical/bertscore_f1" in m["models"]["model"]["ab"]["ehr_on-stage_a"]
    assert [line.split(" skipped")[0] for line in m["evaluation"]["clinical"]["skipped"]] == ["RadGraph F1"]
    assert "## Clinical metrics" in report and "RadGraph F1 skipped" in report and "BERTScore F1 |" in report


def image_only_run(synth_dir: Path, tmp_path_factory) -> Path:
    """A second tiny model trained image-only (curriculum.stage_split=1.0) for the same 6 steps."""
    from datasets_io.config import load_config
    from launcher.local import run_local

    out = tmp_path_factory.getbasetemp() / "tiny_image_only_run"
    if not (out / "run_summary.json").is_file():
        cfg = load_config(
            REPO / "configs" / "tiny.yaml", tiny_overrides(synth_dir, out, **{"curriculum.stage_split": "1.0"})
        )
        run_local(cfg, device="cpu", show_progress=False)
    return out


@pytest.mark.slow
def test_baseline_checkpoint_compares_two_trained_models(trained, synth_dir, tmp_path_factory, tmp_path):
    from launcher.cli import main

    baseline = image_only_run(synth_dir, tmp_path_factory) / "checkpoints" / "final"
    out = tmp_path / "eval"
    assert (
        main(
            [
                "evaluate",
                "--checkpoint",
                str(trained / "checkpoints" / "final"),
                "--baseline-checkpoint",
                str(baseline),
                "--data",
                str(synth_dir / "curriculum_val.jsonl"),
                "--data-root",
                str(synth_dir),
                "--limit",
                "3",
                "--batch-size",
                "3",
                "--max-new-tokens",
                "8",
                "--bootstrap",
                "50",
                "--no-progress",
                "--no-stage-a-end",
                "--no-mlflow",
                "--save-predictions",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    m = json.loads((out / "metrics.json").read_text())
    assert m["evaluation"]["models"] == {
        "model": str(trained / "checkpoints" / "final"),
        "trained_baseline": str(baseline),
    }
    assert set(m["models"]["trained_baseline"]["arms"]) == {"ehr_on", "ehr_off", "stage_a"}
    for arm in ("ehr_on", "ehr_off", "stage_a"):
        comp = m["comparisons"][f"model-trained_baseline/{arm}"]
        assert comp["text/rouge_l"]["n"] == 3 and "p_holm" in comp["text/rouge_l"]
        assert ("icd/micro_f1" in comp) == (arm != "stage_a")
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    ids = {
        model: [r["study_id"] for r in rows if r["model"] == model and r["arm"] == "ehr_on"]
        for model in ("model", "trained_baseline")
    }
    assert len(ids["model"]) == 3 and ids["model"] == ids["trained_baseline"]  # same studies, same order
    assert "## Comparison model-trained_baseline/ehr_on" in (out / "report.md").read_text()


def test_evaluate_refuses_data_sharing_patients_with_the_checkpoints_training_file(
    trained, synth_dir, tmp_path, capsys
):
    """Patient leakage: the evaluation file against the training file of the checkpoint's config.yaml."""
    import shutil

    from launcher.cli import main

    val = tmp_path / "val.jsonl"  # the real val file plus one training row: one subject overlaps
    val.write_text(
        (synth_dir / "curriculum_val.jsonl").read_text()
        + (synth_dir / "curriculum_train.jsonl").read_text().splitlines()[0]
        + "\n"
    )
    ckpt = trained / "checkpoints" / "final"
    args = [
        "evaluate",
        "--checkpoint",
        str(ckpt),
        "--data",
        str(val),
        "--data-root",
        str(synth_dir),
        "--limit",
        "2",
        "--batch-size",
        "2",
        "--max-new-tokens",
        "4",
        "--bootstrap",
        "10",
        "--no-progress",
        "--no-stage-a-end",
        "--no-mlflow",
    ]
    assert main([*args, "--out", str(tmp_path / "eval")]) == 2
    err = capsys.readouterr().err
    assert "patient leakage: 1 subject(s) of" in err and str(val) in err and not (tmp_path / "eval").exists()

    allowed = tmp_path / "allowed"  # the same checkpoint whose training config accepted the overlap
    shutil.copytree(ckpt, allowed)
    cfg_file = allowed / "config.yaml"
    cfg_file.write_text(cfg_file.read_text().replace("allow_subject_overlap: false", "allow_subject_overlap: true"))
    args[2] = str(allowed)
    assert main([*args, "--out", str(tmp_path / "eval2")]) == 0
    metrics = json.loads((tmp_path / "eval2" / "metrics.json").read_text())
    assert metrics["evaluation"]["subject_overlap_with_training"] == 1
