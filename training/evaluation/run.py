"""`launcher evaluate` end to end: load the studies and models, generate every arm, score, compare, write the files
(report.py, plots.py) and log one MLflow run (training/tracking.py)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

from datasets_io.errors import LauncherError
from training.evaluation.generation import (
    ArmOutput,
    LoadedModel,
    decode_images,
    generate_arms,
    load_models,
    shared_max_new_tokens,
    train_file,
)
from training.evaluation.options import EvalOptions
from training.evaluation.plots import write_plots
from training.evaluation.report import eval_params, flat_metrics, render_report, write_metrics, write_predictions
from training.evaluation.scoring import (
    ArmStats,
    References,
    compare_model_arms,
    comparisons,
    headline,
    majority_baseline,
    score_arms,
)
from training.evaluation.studies import Study, arm_coverage, arms_for, load_studies, studies_digest
from training.metrics.clinical import ClinicalScorers


def run_evaluation(opts: EvalOptions) -> dict:
    """Generate, score, compare, write metrics.json / report.md / plots (and predictions when asked), log to MLflow.

    metrics.json is written once the arms are scored and again when the paired comparisons are done, so a failure
    in a comparison never loses the generation's results."""
    import torch

    from training.data_checks import check_eval_leakage
    from training.devices import resolve_device

    check_options(opts)
    t0 = time.perf_counter()
    torch.manual_seed(opts.seed)
    device = resolve_device(opts.device)
    studies = load_studies(opts.data, opts.data_root, opts.limit, opts.seed)
    arms = arms_for(opts.ehr, studies)
    models = load_models(opts, device)
    overlap = check_eval_leakage(models[0].config, opts.data, opts.data_root)  # patients seen in training: an error
    out_dir = Path(opts.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    images = decode_images(studies, models[0], opts.data_root)
    max_new, max_new_source = shared_max_new_tokens(models, studies, arms, opts)
    clinical = load_clinical_scorers(opts, device)
    t_gen = time.perf_counter()
    outputs = {m.name: generate_arms(m, studies, arms, images, max_new, opts) for m in models}
    settings = evaluation_settings(
        opts,
        studies,
        arms,
        models,
        device=device,
        max_new_tokens=max_new,
        max_new_tokens_source=max_new_source,
        generation_s=time.perf_counter() - t_gen,
        clinical=clinical,
        overlap=overlap,
    )
    result: dict[str, Any] = {"status": "arms scored; paired comparisons pending", "evaluation": settings}
    all_stats, base_stats = score_models(result, models, outputs, studies, opts, clinical)
    write_metrics(out_dir, result)  # before any paired test can fail

    for m in models:
        result["models"][m.name]["ab"] = compare_model_arms(all_stats[m.name], opts)
    result["comparisons"] = comparisons(all_stats, base_stats, opts)
    result["headline"] = headline(result)
    result["status"] = "complete"
    result["evaluation"]["wall_s"] = round(time.perf_counter() - t0, 2)
    write_outputs(result, out_dir, studies, outputs, models[0], opts)
    return result


def check_options(opts: EvalOptions) -> None:
    if opts.batch_size < 1:
        raise LauncherError(f"--batch-size must be >= 1, got {opts.batch_size}")
    if opts.max_new_tokens is not None and opts.max_new_tokens < 1:
        raise LauncherError(f"--max-new-tokens must be >= 1, got {opts.max_new_tokens}")


def load_clinical_scorers(opts: EvalOptions, device: str) -> ClinicalScorers:
    """CheXbert / RadGraph / BERTScore from the given local directories; a line printed for each one skipped."""
    try:
        clinical = ClinicalScorers.load(opts.chexbert, opts.radgraph, opts.bertscore_model, device)
    except (OSError, ValueError, RuntimeError) as e:
        raise LauncherError(str(e)) from None
    for line in clinical.skipped:
        print(f"[eval] {line}")
    return clinical


def evaluation_settings(
    opts: EvalOptions,
    studies: Sequence[Study],
    arms: Sequence[str],
    models: Sequence[LoadedModel],
    *,
    device: str,
    max_new_tokens: int,
    max_new_tokens_source: str,
    generation_s: float,
    clinical: ClinicalScorers,
    overlap: Any,
) -> dict[str, Any]:
    """metrics.json's "evaluation" section: what was evaluated and how (paths, settings, coverage; no patient data)."""
    return {
        "checkpoint": opts.checkpoint,
        "model_uri": opts.model_uri,
        "baseline_checkpoint": opts.baseline_checkpoint,
        "data": opts.data,
        "data_root": opts.data_root,
        "ehr": opts.ehr,
        "limit": opts.limit,
        "sample": (
            f"a seeded random sample (seed {opts.seed}) of the file's studies"
            if opts.limit
            else "every study of the file"
        ),
        "batch_size": opts.batch_size,
        "max_new_tokens": max_new_tokens,
        "max_new_tokens_source": max_new_tokens_source,
        "seed": opts.seed,
        "n_resamples": opts.n_resamples,
        "device": device,
        "arms": list(arms),
        "coverage": arm_coverage(arms, studies),
        "models": {m.name: m.source for m in models},
        "n_studies": len(studies),
        "studies_sha256": studies_digest(studies),
        "generation_s": round(generation_s, 2),
        "clinical": {
            "chexbert": opts.chexbert,
            "radgraph": opts.radgraph,
            "bertscore_model": opts.bertscore_model,
            "skipped": list(clinical.skipped),
        },
        "subject_overlap_with_training": overlap.count if overlap is not None else "not checked",
    }


def score_models(
    result: dict,
    models: Sequence[LoadedModel],
    outputs: dict[str, dict[str, ArmOutput]],
    studies: Sequence[Study],
    opts: EvalOptions,
    clinical: ClinicalScorers,
) -> tuple[dict[str, dict[str, ArmStats]], ArmStats]:
    """Every model's arms into result["models"] and the majority baseline into result["baseline"]; returns their
    per-study stats for the paired comparisons."""
    result["models"], all_stats = {}, {}
    for m in models:
        result["models"][m.name], all_stats[m.name] = score_arms(outputs[m.name], studies, opts, clinical)
        for sec in result["models"][m.name]["arms"].values():
            sec["max_new_tokens"] = result["evaluation"]["max_new_tokens"]
    fit_file = train_file(models[0])
    result["baseline"], base_stats = majority_baseline(
        References.of(studies),
        fit_file,
        opts.data_root if fit_file else None,
        n_resamples=opts.n_resamples,
        seed=opts.seed,
    )
    return all_stats, base_stats


def write_outputs(
    result: dict,
    out_dir: Path,
    studies: Sequence[Study],
    outputs: dict[str, dict[str, ArmOutput]],
    model: LoadedModel,
    opts: EvalOptions,
) -> None:
    """metrics.json, plots/, report.md, predictions.jsonl when asked, and the MLflow run (its id into metrics.json)."""
    write_metrics(out_dir, result)
    plots = write_plots(result, out_dir / "plots")
    (out_dir / "report.md").write_text(render_report(result, plots))
    if opts.save_predictions:
        write_predictions(out_dir / "predictions.jsonl", studies, outputs)
    if opts.mlflow:
        result["mlflow_run_id"] = log_to_mlflow(result, model, out_dir, plots, opts)
        write_metrics(out_dir, result)


def log_to_mlflow(result: dict, model: LoadedModel, out_dir: Path, plots: list[Path], opts: EvalOptions) -> str:
    """One run in the experiment: params (settings), metrics (numbers), report.md / metrics.json / plots."""
    from datasets_io.config import MlflowConfig
    from training import tracking

    cfg = model.config
    uri = model.tracking_uri or tracking.resolve_store(opts.tracking_uri, cfg)
    name = "eval-" + (Path(opts.checkpoint).name if opts.checkpoint else opts.model_uri.split("/", 1)[-1])
    tags = {"kind": "evaluation", "eval.studies_sha256": result["evaluation"]["studies_sha256"]}
    if model.training_run_id:
        tags["training_run_id"] = model.training_run_id
    files = [
        (out_dir / "report.md", "evaluation"),
        (out_dir / "metrics.json", "evaluation"),
        *[(p, "evaluation/plots") for p in plots],
    ]
    return tracking.log_run(
        uri,
        (cfg.mlflow if cfg else MlflowConfig()).experiment,
        name,
        tags=tags,
        params=eval_params(result),
        metrics=flat_metrics(result),
        files=files,
    )
