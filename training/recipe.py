"""The run recipe both runtimes share. `launcher local` and the Ray runtime differ only in runtime: the engine
(Accelerate vs DeepSpeed), how a rank gets its slice of the data, the tracker on rank 0, how checkpoints are
reported. Everything else about preparing and closing a run is here, once:

    prep = prepare_run_data(cfg, world_size)     # records (validated, counted), tiny base, grad accum, step plan
    tracker.set_tags(run_tags(prep, runtime="local", device="cpu"))
    bundle = build_lora_model(prep.cfg, prep.base_path)
    val_source = validation_source(pre, prep.data.val, prep.cfg, rank, world)
    ... training.loop.train(...) ...
    summary = finish_run(out, state, prep, tracker, final_checkpoint_dir, status, **runtime_facts)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datasets_io.leakage import SubjectOverlap
from datasets_io.records import Record
from datasets_io.token_budget import BudgetReport
from datasets_io.config import Config, data_path
from datasets_io.errors import LauncherError
from training import curriculum
from training.checkpoint import records_fingerprint, resume_key


# ------------------------------------------------------------------------------------------------ records
@dataclass
class RunData:
    train: dict[str, list[Record]]  # stage -> rows
    val: dict[str, list[Record]]
    skipped: int  # bad records skipped (data.bad_records: skip), over-budget ones included
    subject_overlap: SubjectOverlap | None = None  # patients in both train and val (only when allowed)
    budgets: dict[str, BudgetReport] = field(default_factory=dict)  # "train"/"val" -> token budget report


def ensure_data(cfg: Config) -> None:
    """Synthesize the demo curriculum into data.root when it is absent and the config asks for it."""
    train_path = data_path(cfg, "train_file")
    if "://" in train_path or Path(train_path).exists():
        return
    if not cfg.data.synth_if_missing:
        raise LauncherError(
            f"training file {train_path} not found. Generate one with `launcher data synth --out {cfg.data.root}` "
            "or set data.synth_if_missing=true."
        )
    from datasets_io.synth import write_synthetic

    print(f"[data] {train_path} not found: synthesizing {cfg.data.synth_studies} studies into {cfg.data.root}")
    write_synthetic(cfg.data.root, cfg.data.synth_studies, cfg.data.synth_seed)


def load_run_data(cfg: Config) -> RunData:
    """Every record validated (data.bad_records policy), split by stage; both stages must have rows."""
    from datasets_io.jsonl import read_records
    from training.data_checks import check_leakage

    def by_stage(path: str) -> tuple[dict[str, list[Record]], int]:
        records, report = read_records(path, cfg.data.root, policy=cfg.data.bad_records, check_images="exists")
        if report.skipped:
            print(
                f"[data] {path}: skipped {report.skipped} bad record(s) (data.bad_records=skip); first: "
                f"{report.problems[0]}"
            )
        return {s: [r for r in records if r.stage == s] for s in ("A", "B")}, report.skipped

    train, skipped_t = by_stage(data_path(cfg, "train_file"))
    val_path = data_path(cfg, "val_file")
    val, skipped_v = by_stage(val_path) if ("://" in val_path or Path(val_path).exists()) else ({"A": [], "B": []}, 0)
    for stage in ("A", "B"):
        if not train[stage]:
            raise LauncherError(f"{data_path(cfg, 'train_file')}: no Stage {stage} rows; the curriculum needs both")
    overlap = check_leakage(cfg, train["A"] + train["B"], val["A"] + val["B"])  # LauncherError unless allowed
    return RunData(train, val, skipped_t + skipped_v, overlap)


def fit_run_data_to_budget(cfg: Config, data: RunData, spec: Any) -> RunData:
    """Before the first step: every train and val record measured against data.max_seq_len (training.data_checks);
    over-budget records stop the run or are skipped and counted, per data.bad_records. `spec`: anything with
    tokenizer, image_token_id, num_image_tokens (training.data_checks.TokenSpec, a model bundle)."""
    from training.data_checks import fit_token_budget

    kept: dict[str, dict[str, list[Record]]] = {}
    budgets, skipped = {}, data.skipped
    for split, rows in (("train", data.train), ("val", data.val)):
        records, budgets[split] = fit_token_budget(cfg, rows["A"] + rows["B"], spec, f"{split}_file")
        skipped += len(budgets[split].over_budget)
        kept[split] = {s: [r for r in records if r.stage == s] for s in ("A", "B")}
    for stage in ("A", "B"):
        if not kept["train"][stage]:
            raise LauncherError(f"{data_path(cfg, 'train_file')}: no Stage {stage} row fits data.max_seq_len")
    return RunData(kept["train"], kept["val"], skipped, data.subject_overlap, budgets)


def corpus_texts(data: RunData) -> list[str]:
    return [t for rows in data.train.values() for r in rows for t in (r.prompt, r.target)]


# ------------------------------------------------------------------------------------------------ preparation
@dataclass
class RunPrep:
    cfg: Config  # train.grad_accum derived for the world size (train.global_batch_size)
    data: RunData
    counts: dict[str, int]  # training rows per stage (a Ray Dataset has no length: counted up front)
    base_path: str  # the base model directory (the tiny one built here, once, if the config asks for it)
    plan: Any  # training.curriculum.StepPlan
    world_size: int
    resume_key: dict  # what a checkpoint of this run means (training.checkpoint.resume_key): stored, compared


def prepare_run_data(cfg: Config, world_size: int, tiny_weights: bool = True) -> RunPrep:
    """Everything both runtimes derive before the first step. `tiny_weights=False` (the Ray driver) leaves a new tiny
    base's random weights to the workers (training.model.build_tiny_base)."""
    try:
        cfg = curriculum.with_derived_grad_accum(cfg, world_size)
    except ValueError as e:
        raise LauncherError(str(e)) from None
    from datasets_io.sampler import row_table
    from training.model import ensure_tiny_weights, resolve_base_path

    from training.data_checks import token_spec

    ensure_data(cfg)
    data = load_run_data(cfg)  # every record validated; patients shared with the val file refused
    base_path = resolve_base_path(cfg, corpus_texts(data), weights=False)  # tokenizer + config
    # token lengths before the first step (the same on both runtimes): shortened rows counted, over-budget ones out
    data = fit_run_data_to_budget(cfg, data, token_spec(cfg, lambda: corpus_texts(data)))
    if tiny_weights and not cfg.model.name_or_path:  # the Ray workers draw them (rank 0) from the same rows
        ensure_tiny_weights(base_path, cfg, row_table(data.train["A"]))
    counts = {s: len(data.train[s]) for s in ("A", "B")}
    plan = curriculum.plan_steps(cfg, counts["A"], counts["B"], world_size=world_size)
    key = resume_key(cfg, plan, world_size, records_fingerprint(data.train["A"] + data.train["B"]))
    return RunPrep(cfg, data, counts, base_path, plan, world_size, key)


def check_resumable(saved: dict | None, key: dict, where: str) -> None:
    """A checkpoint continues only with the cursor unit, the worker count and the plan (`key`, from
    training.checkpoint.resume_key) it was saved under. Both runtimes call it. The data order would continue on any
    worker count (the cursor is global), but DeepSpeed's optimizer state is partitioned per rank: refused with that
    reason, not silently restarted."""
    from training.checkpoint import check_resume
    from training.loop import check_cursor_unit

    if not saved:
        return
    check_cursor_unit(saved, where)
    world = key["world_size"]
    if saved.get("world_size", world) != world:
        raise LauncherError(
            f"{where} was saved by {saved['world_size']} workers, this run has {world}: the data order would "
            "continue (the cursor is global), but DeepSpeed's optimizer state is partitioned per rank and cannot be "
            f"reloaded on another count. Resume with --num-workers {saved['world_size']}, or start a new ray.name "
            "from the adapter bundle."
        )
    check_resume(saved, key, where)


def completed_run_summary(out: Path, where: str, step: int, total: int) -> dict:
    """Resuming a run whose checkpoint already ends the plan: say so and return its summary; nothing is trained,
    saved or registered again (both runtimes)."""
    print(f"[resume] {where}: the run is already complete ({step}/{total} steps); nothing to do", flush=True)
    done = out / "run_summary.json"
    return {**(json.loads(done.read_text()) if done.is_file() else {}), "already_complete": True}


def run_tags(prep: RunPrep, runtime: str, **extra: str) -> dict[str, str]:
    """The MLflow tags every run gets (plus the runtime's own)."""
    p = prep.plan
    return {
        "runtime": runtime,
        "total_steps": str(p.total_steps),
        "stage_a_steps": str(p.stage_a_steps),
        "samples_per_step": str(p.samples_per_step),
        "world_size": str(prep.world_size),
        **extra,
    }


def build_lora_model(cfg: Any, base_path: str, dtype: str = "fp32") -> Any:
    """Load the base, re-seed, add LoRA. Re-seeding between loading the base and adding LoRA makes the LoRA A init
    independent of how the base was obtained (built here, loaded from disk, or ZeRO-3's partitioned loading, which
    consumes the RNG differently), so the local runtime and every ZeRO stage start from the same weights. The base
    loads in the training dtype (a 7B in fp32 would be 28 GB of host memory per worker)."""
    import torch

    from training.model import apply_lora, bundle_for, load_base

    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    base, tokenizer = load_base(base_path, torch_dtype, cfg.model.attn_implementation)
    torch.manual_seed(cfg.train.seed)
    return bundle_for(apply_lora(cfg, base), tokenizer, base_path)


# ------------------------------------------------------------------------------------------------ validation
def validation_slice(rows: list, micro_batch_size: int, val_batches: int, rank: int, world: int) -> list:
    """Rank `rank`'s validation rows: an equal number of whole micro-batches per rank (under ZeRO-3 every forward
    is collective, so every rank must evaluate the same number of batches), disjoint across ranks."""
    per_rank = min(val_batches, len(rows) // (micro_batch_size * world)) * micro_batch_size
    return rows[rank * per_rank : (rank + 1) * per_rank]


def validation_source(pre: Any, val: dict[str, list], cfg: Config, rank: int = 0, world: int = 1):
    """stage -> this rank's fixed validation batches (built on first use, then cached)."""
    from training.data import to_torch

    mb, cache = cfg.train.micro_batch_size, {}

    def source(stage: str) -> list:
        if stage not in cache:
            rows = validation_slice(val[stage], mb, cfg.train.val_batches, rank, world)
            items = [(r.prompt, r.target, r.image, r.where) for r in rows]
            cache[stage] = [to_torch(pre.batch(items[i : i + mb])) for i in range(0, len(items), mb)]
        return cache[stage]

    return source


# ------------------------------------------------------------------------------------------------ the end
def finish_run(
    out: Path, state: Any, prep: RunPrep, tracker: Any, final_dir: str | None, status: str, **facts: Any
) -> dict:
    """run_summary.json, the MLflow run closed with `status`, and the final bundle registered when the config asks
    (`mlflow.register_at_end`, only after a finished run)."""
    from training.loop import write_run_summary

    summary = write_run_summary(
        out / "run_summary.json",
        state,
        prep.plan,
        mlflow_run_id=tracker.run_id,
        tracking_uri=tracker.tracking_uri,
        base_model=prep.base_path,
        skipped_records=prep.data.skipped,
        **facts,
    )
    tracker.close(status)
    cfg = prep.cfg
    if status == "FINISHED" and cfg.mlflow.register_at_end and final_dir:
        from training.registry import register_checkpoint

        summary["registered"] = register_checkpoint(
            final_dir, cfg.mlflow.registered_model_name, alias=cfg.mlflow.alias, cfg=cfg, run_id=tracker.run_id
        )
        (out / "run_summary.json").write_text(json.dumps(summary, indent=2))
    return summary
