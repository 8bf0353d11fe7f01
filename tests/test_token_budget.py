"""The target is never cut: Patient Data shortening, the token budget found before the first step, patient leakage.

Production sizes: MIMIC-size Patient Data blocks (`synth --ehr-detail mimic`), 576 image tokens (336 px / patch 14)
and data.max_seq_len 2048. The tokenizer of the length tests is the tiny BPE trained on the demo's (basic) corpus:
the MIMIC block's field names and numbers are not in it, so a block costs ~1,000 tokens, close to a Mistral
tokenizer (README "Token budget"); one trained on the MIMIC-detail corpus itself packs the block into ~200.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from datasets_io.ehr_fit import apply_steps, removal_steps, shorten_prompt
from datasets_io.leakage import check_subject_overlap, subject_of, subject_overlap
from datasets_io.records import Record, ehr_from_prompt, parse_target, prompt_b, target_a, target_b
from datasets_io.synth import make_studies, study_rows
from datasets_io.token_budget import apply_bad_records_policy, budget_report
from datasets_io.tokens import IGNORE_INDEX, OverBudgetError, build_sample, encode_prompt, encode_target
from launcher.cli import main as cli
from datasets_io.errors import LauncherError

from conftest import REPO, KillOnce, tiny_overrides

IMAGE_TOKENS = 576  # (336 / 14) ** 2, the 7B config's vision tower


def long_text(sentences: int) -> str:
    """Report text no tokenizer can pack (numbers are split into single digits): ~30 tokens a sentence."""
    return "".join(
        f" Nodule {k} measures {(k * 7919) % 10**7:07d}.{(k * 104729) % 10**6:06d} mm, series "
        f"{(k * 15485863) % 10**7:07d}."
        for k in range(1, sentences + 1)
    )


def records_of(rows: list[dict], name: str = "train.jsonl") -> list[Record]:
    return [Record(**r, where=f"{name}:{i}") for i, r in enumerate(rows, start=1)]


def lengthen(row: dict, sentences: int) -> dict:
    """The same record with a longer impression (a verbose report): the target grows, the format stays valid."""
    parsed = parse_target(row["target"], expect_icd=row["stage"] == "B")
    impression = parsed.impression + long_text(sentences)
    target = (
        target_b(impression, parsed.chexpert, parsed.icd)
        if row["stage"] == "B"
        else target_a(impression, parsed.chexpert)
    )
    return {**row, "target": target}


@pytest.fixture(scope="module")
def mimic_rows() -> list[dict]:
    return [r for s in make_studies(24, 0, "mimic") for r in study_rows(s)]


@pytest.fixture(scope="module")
def tokenizer():
    from training.tokenizer import train_tokenizer

    basic = [r for s in make_studies(60, 0) for r in study_rows(s)]
    return train_tokenizer([r["prompt"] for r in basic] + [r["target"] for r in basic], 400)


def image_id(tok) -> int:
    return tok.convert_tokens_to_ids("<image>")


# ------------------------------------------------------------------------------------------------ the rule
def test_removal_order_is_farthest_measurement_first_then_fields_by_priority():
    ehr = {
        "Age": 70,
        "Sex": "F",
        "Admission_type": "URGENT",
        "Extra": 1,
        "Vitals": {"heart_rate": {"value": 90, "hours_before": 2.0}, "o2_sat": {"value": 93, "hours_before": 9.5}},
        "Labs": {
            "BNP": {"value": 900, "hours_before": 9.5},
            "WBC": {"value": 12, "hours_before": 30.0},
            "Lactate": {"value": 1.1},
        },  # no hours_before (the seed's format): counts as farthest
        "O2_device": None,
        "Chronic_conditions": ["copd"],
    }
    assert removal_steps(ehr) == [
        ("Labs", "Lactate"),
        ("Labs", "WBC"),
        ("Labs", "BNP"),
        ("Vitals", "o2_sat"),  # 9.5 h tie: Labs first
        ("Vitals", "heart_rate"),
        ("Vitals", None),
        ("Labs", None),
        ("O2_device", None),
        ("Admission_type", None),
        ("Chronic_conditions", None),
        ("Extra", None),
        ("Sex", None),
        ("Age", None),
    ]
    assert apply_steps(ehr, removal_steps(ehr)[:3])["Labs"] == {}  # a copy: the input keeps its labs
    assert len(ehr["Labs"]) == 3


def test_shortened_block_keeps_the_nearest_measurements_as_valid_indented_json(mimic_rows):
    prompt = next(r["prompt"] for r in mimic_rows if r["stage"] == "B")
    full = ehr_from_prompt(prompt)
    shortened, dropped = shorten_prompt(prompt, fits=lambda p: len(p) <= len(prompt) // 2)
    ehr = ehr_from_prompt(shortened)  # valid JSON, and rendered exactly as the records module renders it
    assert shortened == prompt_b(ehr) and len(shortened) <= len(prompt) // 2 and dropped > 0
    assert list(ehr) == list(full)  # measurements go first: every field is still there
    kept = [m["hours_before"] for s in ("Labs", "Vitals") for m in ehr[s].values()]
    gone = [m["hours_before"] for s in ("Labs", "Vitals") for n, m in full[s].items() if n not in ehr[s]]
    assert kept and gone and max(kept) <= min(gone)  # the nearest in time to the study are kept
    assert shorten_prompt(prompt, fits=lambda p: False) is None  # not even "{}" fits


# ------------------------------------------------------------------------------------------------ one sample
def test_production_length_sample_keeps_its_whole_target_and_shortens_patient_data(tokenizer, mimic_rows):
    row = lengthen(next(r for r in mimic_rows if r["stage"] == "B"), 12)  # a verbose report: ~660 target tokens
    prompt_n = len(encode_prompt(tokenizer, row["prompt"], image_id(tokenizer), IMAGE_TOKENS))
    target_n = len(encode_target(tokenizer, row["target"]))
    assert prompt_n - IMAGE_TOKENS > 900 and prompt_n + target_n > 2048  # a MIMIC-size block that does not fit
    s = build_sample(
        tokenizer,
        row["prompt"],
        row["target"],
        image_token_id=image_id(tokenizer),
        num_image_tokens=IMAGE_TOKENS,
        max_len=2048,
    )
    assert s.shortened and len(s.input_ids) <= 2048 and s.input_ids.count(image_id(tokenizer)) == IMAGE_TOKENS
    supervised = [t for t in s.labels if t != IGNORE_INDEX]
    assert tokenizer.decode(supervised) == row["target"] + tokenizer.eos_token  # the whole target, then EOS
    shortened, _ = shorten_prompt(
        row["prompt"], lambda p: len(encode_prompt(tokenizer, p, image_id(tokenizer), IMAGE_TOKENS)) <= 2048 - target_n
    )
    assert s.input_ids[: len(s.input_ids) - target_n] == encode_prompt(
        tokenizer, shortened, image_id(tokenizer), IMAGE_TOKENS
    )
    assert ehr_from_prompt(shortened)["Age"] == ehr_from_prompt(row["prompt"])["Age"]


def test_a_record_that_cannot_fit_is_a_bad_record_with_its_lengths(tokenizer, mimic_rows):
    b = lengthen(next(r for r in mimic_rows if r["stage"] == "B"), 60)  # the target alone is over the budget
    kw = dict(image_token_id=image_id(tokenizer), num_image_tokens=IMAGE_TOKENS, max_len=2048, where="train.jsonl:7")
    with pytest.raises(
        OverBudgetError,
        match=r"train.jsonl:7: field 'length': \d+ tokens > data.max_seq_len=2048 "
        r"\(prompt \d+ incl. 576 image tokens, target \d+ incl. EOS\); "
        r"\d+ even with the Patient Data block emptied",
    ):
        build_sample(tokenizer, b["prompt"], b["target"], **kw)
    a = lengthen(next(r for r in mimic_rows if r["stage"] == "A"), 60)
    with pytest.raises(OverBudgetError, match="a Stage A prompt has nothing to shorten"):
        build_sample(tokenizer, a["prompt"], a["target"], **kw)
    fits_shortened = lengthen(next(r for r in mimic_rows if r["stage"] == "B"), 12)
    with pytest.raises(OverBudgetError, match="data.overlong=error"):
        build_sample(tokenizer, fits_shortened["prompt"], fits_shortened["target"], overlong="error", **kw)


# ------------------------------------------------------------------------------------------------ the report
def test_budget_report_counts_shortened_and_over_budget_rows(tokenizer, mimic_rows):
    rows = [lengthen(r, 12) if i in (1, 3) else r for i, r in enumerate(mimic_rows)]  # two Stage B rows shortened
    rows[5] = lengthen(rows[5], 60)  # one Stage B row that cannot fit
    records = records_of(rows)
    report = budget_report(records, tokenizer, image_id(tokenizer), IMAGE_TOKENS, 2048)
    assert (report.rows, report.shortened, report.over_budget) == (len(rows), 2, [5])
    assert report.problems[0].startswith("train.jsonl:6: field 'length'")
    assert report.fits(1.0) == max(report.lengths["B"]) > 2048 >= report.fits(0.5)
    assert report.percentiles("A")["p100"] < 2048 and set(report.lengths) == {"A", "B"}
    metrics = report.metrics()
    assert (metrics["data/rows_shortened"], metrics["data/rows_over_budget"]) == (2, 1)
    with pytest.raises(LauncherError, match=r"train: 1 record\(s\) do not fit .* first: train.jsonl:6"):
        apply_bad_records_policy(records, report, "error", "train")
    kept = apply_bad_records_policy(records, report, "skip", "train")
    assert len(kept) == len(records) - 1 and records[5] not in kept


# ------------------------------------------------------------------------------------------------ leakage
def test_subject_is_the_mimic_patient_else_the_study():
    r = Record("54951608", "files/p10/p10074434/s54951608/f79bc941.jpg", "", "", "image_only", "A")
    assert subject_of(r) == "p10074434"
    assert subject_of(Record("123", "images/xray_123.jpg", "", "", "image_only", "A")) == "s123"


def test_shared_subjects_are_an_error_unless_allowed(mimic_rows):
    train, val = records_of(mimic_rows[:20]), records_of(mimic_rows[16:30], "val.jsonl")
    overlap = subject_overlap(train, val)
    assert overlap.count >= 1 and overlap.other_rows_affected >= 4
    with pytest.raises(
        LauncherError,
        match=rf"patient leakage: {overlap.count} subject\(s\) of val.jsonl .* also in "
        rf"train.jsonl .*: p1\d+",
    ):
        check_subject_overlap(overlap, "train.jsonl", "val.jsonl", allow=False)
    assert check_subject_overlap(overlap, "train.jsonl", "val.jsonl", allow=True) is overlap
    assert subject_overlap(records_of(mimic_rows[:2]), records_of(mimic_rows[30:32])).count == 0


# ------------------------------------------------------------------------------------------------ runs
def synth_copy(src: Path, dest: Path, train_extra: list[dict] = (), val_extra: list[dict] = ()) -> Path:
    shutil.copytree(src, dest)
    for name, extra in (("curriculum_train.jsonl", train_extra), ("curriculum_val.jsonl", val_extra)):
        with open(dest / name, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in extra)
    return dest


def test_validate_with_config_reports_the_budget_and_overlap(synth_dir, tmp_path, capsys):
    first = json.loads((synth_dir / "curriculum_train.jsonl").read_text().splitlines()[1])
    root = synth_copy(synth_dir, tmp_path / "data", train_extra=[lengthen(first, 40)], val_extra=[first])
    n_train = len((root / "curriculum_train.jsonl").read_text().splitlines())
    files = [str(root / "curriculum_train.jsonl"), str(root / "curriculum_val.jsonl")]
    args = [
        "data",
        "validate",
        *files,
        "--images",
        "none",
        "--config",
        str(REPO / "configs" / "tiny.yaml"),
        "--set",
        f"data.root={root}",
        "--set",
        f"output.dir={tmp_path / 'run'}",
    ]
    assert cli(args) == 1  # an over-budget row is a bad record
    out = capsys.readouterr().out
    assert f"{files[0]}:{n_train}: field 'length'" in out and "rows over budget (cannot fit" in out
    assert "stage B:" in out and "max_seq_len that fits 99% of rows unshortened" in out
    assert f"subjects shared by {files[0]} and {files[1]}: 1 (e.g. p" in out
    assert "pg/mL" not in out and "Impression:" not in out  # counts and positions only
    assert not (tmp_path / "run").exists()  # the tiny tokenizer is trained in memory: nothing written
    assert cli(args + ["--policy", "skip", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["token_budget"][files[0]]["rows_over_budget"] == 1


@pytest.mark.slow
def test_over_budget_record_stops_local_before_the_first_step_or_is_skipped(synth_dir, tmp_path):
    from mlflow.tracking import MlflowClient

    from datasets_io.config import load_config
    from launcher.local import run_local

    lines = (synth_dir / "curriculum_train.jsonl").read_text().splitlines()
    first = json.loads(lines[1])
    root = synth_copy(synth_dir, tmp_path / "data", train_extra=[lengthen(first, 40)])
    over = f"{root / 'curriculum_train.jsonl'}:{len(lines) + 1}"

    def cfg(out: str, **extra):
        return load_config(
            REPO / "configs" / "tiny.yaml",
            tiny_overrides(
                root,
                tmp_path / out,
                **{"train.max_steps": 2, "mlflow.tracking_uri": f"sqlite:///{tmp_path}/ml.db", **extra},
            ),
        )

    with pytest.raises(LauncherError, match=rf"1 record\(s\) do not fit data.max_seq_len=384 .* first: {over}: "):
        run_local(cfg("err"), device="cpu", show_progress=False)
    assert not (tmp_path / "err" / "checkpoints").exists() and not (tmp_path / "err" / "run_summary.json").exists()

    # skip: counted and skipped; a val row sharing a train subject is accepted only with the override (a tag says so)
    (root / "curriculum_val.jsonl").write_text((root / "curriculum_val.jsonl").read_text() + lines[0] + "\n")
    with pytest.raises(LauncherError, match="patient leakage: 1 subject"):
        run_local(cfg("leak", **{"data.bad_records": "skip"}), device="cpu", show_progress=False)
    summary = run_local(
        cfg("skip", **{"data.bad_records": "skip", "data.allow_subject_overlap": "true"}),
        device="cpu",
        show_progress=False,
    )
    assert summary["skipped_records"] == 1 and summary["global_step"] == 2
    client = MlflowClient(f"sqlite:///{tmp_path}/ml.db")
    run = client.get_run(summary["mlflow_run_id"])
    assert run.data.metrics["data/rows_over_budget"] == 1 and run.data.metrics["data/rows_shortened"] == 0
    assert run.data.metrics["data/subject_overlap"] == 1
    assert run.data.tags["data.subject_overlap_allowed"].startswith("true: 1 subject")


@pytest.fixture(scope="module")
def production_length(tmp_path_factory, tokenizer):
    """(data root, --set overrides, budget report) at production sizes: MIMIC-size Patient Data and verbose reports
    (a subject-sorted synth file), 576 image tokens, data.max_seq_len 2048; the base's tokenizer trained on the demo
    corpus (Mistral-like lengths for the MIMIC block, see the top)."""
    from datasets_io.config import load_config
    from datasets_io.synth import write_synthetic
    from training.model import build_tiny_base

    tmp = tmp_path_factory.mktemp("production_length")
    root = tmp / "data"
    write_synthetic(root, 16, seed=0, image_size=(64, 64), progress=False, ehr_detail="mimic")
    path = root / "curriculum_train.jsonl"
    rows = [lengthen(json.loads(line), 12) for line in path.read_text().splitlines()]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    sizes = {
        "data.max_seq_len": 2048,
        "model.tiny.image_size": 336,
        "model.tiny.patch_size": 14,
        "model.tiny.vocab_size": 400,
        "curriculum.stage_split": 0.5,
    }
    cfg = load_config(REPO / "configs" / "tiny.yaml", tiny_overrides(root, tmp / "unused", **sizes))
    basic = [r for s in make_studies(60, 0) for r in study_rows(s)]
    base = build_tiny_base(cfg, [r["prompt"] for r in basic] + [r["target"] for r in basic], tmp / "base")
    report = budget_report(records_of(rows, str(path)), tokenizer, image_id(tokenizer), IMAGE_TOKENS, 2048)
    assert report.shortened >= 5 and not report.over_budget  # the same tokenizer as the base's (same corpus, seed)
    return root, {**sizes, "model.name_or_path": str(base)}, report


@pytest.mark.slow
def test_production_length_run_supervises_whole_targets_and_logs_shortened_rows(tmp_path, production_length):
    """576 image tokens, data.max_seq_len 2048, MIMIC-size Patient Data and verbose reports: 2 steps train, every
    over-long Stage B row is shortened (never its target), and the count reaches MLflow."""
    from mlflow.tracking import MlflowClient

    from datasets_io.config import load_config
    from launcher.local import run_local

    root, sizes, report = production_length
    overrides = tiny_overrides(
        root,
        tmp_path / "run",
        **{
            **sizes,
            "train.max_steps": 2,
            "train.micro_batch_size": 2,
            "mlflow.tracking_uri": f"sqlite:///{tmp_path}/ml.db",
        },
    )
    cfg = load_config(REPO / "configs" / "tiny.yaml", overrides)
    summary = run_local(cfg, device="cpu", show_progress=False)
    assert summary["global_step"] == 2
    metrics = MlflowClient(f"sqlite:///{tmp_path}/ml.db").get_run(summary["mlflow_run_id"]).data.metrics
    assert metrics["data/rows_shortened"] == report.shortened and metrics["data/rows_over_budget"] == 0
    assert metrics["data/max_seq_len_fits_100"] > 2048

    from training.data import Preprocessor
    from training.model import build_model

    bundle = build_model(cfg)
    assert bundle.num_image_tokens == IMAGE_TOKENS
    pre = Preprocessor(
        bundle.tokenizer,
        bundle.image_spec,
        bundle.image_token_id,
        bundle.num_image_tokens,
        2048,
        "shorten_ehr",
        str(root),
    )
    for r in records_of([json.loads(line) for line in (root / "curriculum_train.jsonl").read_text().splitlines()]):
        if r.stage == "B":
            pixels, tok = pre.sample(r.prompt, r.target, r.image, r.where)
            labels = [t for t in tok.labels if t != IGNORE_INDEX]
            assert bundle.tokenizer.decode(labels) == r.target + bundle.tokenizer.eos_token
            assert len(tok.input_ids) <= 2048 and pixels.shape == (3, 336, 336)


@pytest.mark.slow
def test_production_length_run_resumes_exactly_mid_stage_b(tmp_path, production_length):
    """A restart at production sizes (576 image tokens, data.max_seq_len 2048, MIMIC-size Patient Data shortened to
    fit, packed rows in up to two forward passes): stopped after the first Stage B step and resumed, the run trains
    the uninterrupted run's samples (data_order.jsonl) with its losses, bit for bit (CPU fp32)."""
    from datasets_io.config import load_config
    from launcher.local import run_local

    root, sizes, _ = production_length

    def cfg(out: str):
        sets = {**sizes, "train.max_steps": 4, "train.micro_batch_size": 3, "train.record_data_order": "true"}
        return load_config(REPO / "configs" / "tiny.yaml", tiny_overrides(root, tmp_path / out, **sets))

    full = run_local(cfg("full"), device="cpu", show_progress=False)
    first = run_local(cfg("split"), device="cpu", stop_after=3, show_progress=False)
    assert first["global_step"] == 3 and "step-000003" in first["checkpoints"]
    resumed = run_local(cfg("split"), device="cpu", resume="auto", show_progress=False)
    assert resumed["global_step"] == full["global_step"] == 4
    order = {out: (tmp_path / out / "data_order.jsonl").read_text().splitlines() for out in ("full", "split")}
    assert [json.loads(line)["stage"] for line in order["full"]] == ["A", "A", "B", "B"]
    assert order["split"] == order["full"]
    assert resumed["losses"] == full["losses"]


@pytest.mark.slow
def test_two_ray_workers_at_production_length_train_the_local_runs_steps_through_a_restart(
    ray_local, production_length, tmp_path, test_hooks
):
    """The production path at production sizes: 2 Ray Train workers (DeepSpeed ZeRO-2, packed rows) on the same
    MIMIC-length data, one of them killed after the first Stage B step and the run restarted by Ray Train from the
    step-2 checkpoint. Their Ray Data tasks shorten Patient Data as the local process does: the same samples per step
    (data_order.jsonl), the same losses as local with accumulation 2 (CPU fp32: whole targets supervised on both),
    the same shortened count in MLflow, each step's loss logged once."""
    from mlflow.tracking import MlflowClient

    from datasets_io.config import load_config
    from launcher.local import run_local
    from launcher.ray_train import run_ray

    root, sizes, report = production_length

    def cfg(out: str):
        sets = {
            **sizes,
            "train.max_steps": 4,  # 2 Stage A + 2 Stage B steps
            "train.micro_batch_size": 2,
            "train.global_batch_size": 4,  # local: accumulation 2; Ray: 2 ranks x 1
            "train.record_data_order": "true",
            "train.save_every": 2,  # the restart resumes from step 2
            "ray.num_workers": 2,
            "ray.cpus_per_worker": 0.5,
            "ray.name": out,
            "ray.max_failures": 1,
            "deepspeed.zero_stage": 2,
            "mlflow.tracking_uri": f"sqlite:///{tmp_path}/{out}.db",
        }
        return load_config(REPO / "configs" / "tiny.yaml", tiny_overrides(root, tmp_path / out, **sets))

    local = run_local(cfg("local"), device="cpu", show_progress=False)
    marker = tmp_path / "killed"
    test_hooks[0].append(KillOnce(rank=1, step=3, marker=str(marker)))  # after the first Stage B step
    ray = run_ray(cfg("ray"))
    assert marker.is_file(), "the fault was never injected"
    for rank in (0, 1):  # the restarted attempt resumed from the step-2 checkpoint, not from scratch
        resumed = json.loads((tmp_path / "ray" / "ray_ranks" / f"rank{rank}.json").read_text())["resumed_from"]
        assert resumed and resumed["global_step"] == 2, resumed
    assert ray["global_step"] == local["global_step"] == 4
    order = [json.loads(line) for line in (tmp_path / "ray" / "data_order.jsonl").read_text().splitlines()]
    assert order == [json.loads(line) for line in (tmp_path / "local" / "data_order.jsonl").read_text().splitlines()]
    assert [step["stage"] for step in order] == ["A", "A", "B", "B"]
    worst = max(abs(a - b) / abs(b) for a, b in zip(ray["losses"], local["losses"]))
    print(f"[measured] production length, Ray ZeRO-2 x2 vs local accum 2: largest relative loss difference {worst:.1e}")
    assert ray["losses"] == pytest.approx(local["losses"], rel=1e-4)
    for summary, out in ((local, "local"), (ray, "ray")):
        run = MlflowClient(f"sqlite:///{tmp_path}/{out}.db").get_run(summary["mlflow_run_id"])
        assert run.data.metrics["data/rows_shortened"] == report.shortened, out
        assert run.data.metrics["data/rows_over_budget"] == 0, out
        history = MlflowClient(f"sqlite:///{tmp_path}/{out}.db").get_metric_history(run.info.run_id, "train/loss")
        assert sorted(m.step for m in history) == [1, 2, 3, 4], out  # the step redone after the restart: once


@pytest.mark.slow
def test_ray_stops_before_any_worker_on_an_over_budget_record(ray_local, synth_dir, tmp_path):
    """The Ray driver runs the same budget check (training.recipe) before any worker starts: under error it stops
    there; under skip the row is counted and never reaches a worker."""
    from datasets_io.config import load_config
    from launcher.ray_train import run_ray

    lines = (synth_dir / "curriculum_train.jsonl").read_text().splitlines()
    root = synth_copy(synth_dir, tmp_path / "data", train_extra=[lengthen(json.loads(lines[1]), 40)])
    over = f"{root / 'curriculum_train.jsonl'}:{len(lines) + 1}"

    def cfg(name: str, **extra):
        return load_config(
            REPO / "configs" / "tiny.yaml",
            tiny_overrides(
                root, tmp_path / name, **{"ray.num_workers": 1, "ray.cpus_per_worker": 1.0, "ray.name": name, **extra}
            ),
        )

    with pytest.raises(LauncherError, match=rf"1 record\(s\) do not fit data.max_seq_len=384 .* first: {over}: "):
        run_ray(cfg("err"))
    assert not (tmp_path / "err" / "ray" / "err" / "launcher_run.json").exists()  # no MLflow run was pinned
    # under skip the rows the workers get are the driver's (ray.put once): the over-budget row is counted and left out
    summary = run_ray(cfg("skip", **{"data.bad_records": "skip", "train.max_steps": 2}))
    assert summary["global_step"] == 2 and summary["skipped_records"] == 1
    import mlflow

    run = mlflow.MlflowClient(summary["tracking_uri"]).get_run(summary["mlflow_run_id"])
    assert run.data.metrics["data/rows_over_budget"] == 1
