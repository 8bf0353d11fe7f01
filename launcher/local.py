"""The local runtime: one process, one device (CUDA, Apple MPS or CPU), no Ray cluster and no DeepSpeed.

    launcher local --config configs/tiny.yaml --device auto
    launcher local --config configs/tiny.yaml --set train.max_steps=50 --resume auto

Prepares the run with the recipe both runtimes share (training/recipe.py: records, base model, plan, tags,
validation, summary, registration) and adds the local runtime: the Accelerate engine, one rank's micro-batches from
the sampler, the tracker, local checkpoints; then runs `training.loop.train`, the same loop the Ray workers run.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path


from datasets_io.config import Config
from training.devices import DEVICES, available_devices, resolve_device, resolve_dtype  # noqa: F401 - also exported here
from training.recipe import RunData, corpus_texts, ensure_data, load_run_data  # noqa: F401 - their old home

log = logging.getLogger(__name__)

# devices: training/devices.py (the local runtime, evaluation and predict share them)


# ------------------------------------------------------------------------------------------------ the run
def run_local(
    cfg: Config,
    device: str = "auto",
    resume: str | None = None,
    stop_after: int | None = None,
    show_progress: bool = True,
) -> dict:
    """Train on one device: prepare (recipe), open or resume the run, THE loop, then the run summary."""
    from training.checkpoint import read_state, resolve_resume
    from training.engines import AccelerateEngine
    from training.loop import train
    from training.model import load_adapter_weights
    from training.recipe import build_lora_model, check_resumable, completed_run_summary, finish_run, prepare_run_data

    t_start = time.perf_counter()
    device = resolve_device(device)
    if device == "mps":
        os.environ.setdefault("PYTORCH_ENABLE_MPS_FALLBACK", "1")
    out = Path(cfg.output.dir)
    resume_from = resolve_resume(resume, out / "checkpoints")  # fails loudly before any work
    resumed = read_state(resume_from) if resume_from else None

    prep = prepare_run_data(cfg, world_size=1)
    cfg, plan = prep.cfg, prep.plan
    if resumed:  # a changed plan is refused, naming every changed key
        check_resumable(resumed, prep.resume_key, str(resume_from))
        if resumed["global_step"] >= plan.total_steps:
            return completed_run_summary(out, str(resume_from), resumed["global_step"], plan.total_steps)
    bundle = build_lora_model(cfg, prep.base_path)  # fp32 weights; autocast mixes
    tracker = open_tracker(cfg, prep, resumed, device)
    if resumed:  # the trained weights before the engine wraps the model (as at the first launch)
        load_adapter_weights(bundle.model, resume_from)
    _, mixed = resolve_dtype(cfg.model.dtype, device)
    engine = AccelerateEngine(bundle.model, cfg.train, device, mixed_precision=mixed)
    io, state = loop_io(cfg, prep, bundle, engine, tracker, resume_from, resumed, show_progress)
    print(
        f"[train] device={device} mixed_precision={mixed} steps={plan.total_steps} "
        f"(stage A {plan.stage_a_steps}, stage B {plan.stage_b_steps}) samples/step={plan.samples_per_step} "
        f"{'packed' if cfg.train.packing else 'padded'} micro-batches, setup {time.perf_counter() - t_start:.1f}s"
    )
    status = "FAILED"
    try:
        state = train(io, state, stop_after=stop_after)
        status = "FINISHED" if state.global_step == plan.total_steps else "KILLED"
    finally:
        summary = finish_run(
            out,
            state,
            prep,
            tracker,
            state.checkpoints.get("final"),
            status if status != "KILLED" else "FINISHED",
            device=device,
            wall_time_s=round(time.perf_counter() - t_start, 1),
            time_to_first_step_s=round(state.first_step_done_at - t_start, 1) if state.first_step_done_at else None,
        )
    return summary


def open_tracker(cfg: Config, prep, resumed: dict | None, device: str):
    """The MLflow run: a new one (params, tags, data-check counts: no patient data) or the resumed run's, whose
    steps between the checkpoint and the stop are trained again and never logged twice."""
    from training.data_checks import log_data_checks
    from training.recipe import run_tags
    from training.tracking import MlflowTracker, ResumeSafeTracker, config_params

    tracker = MlflowTracker.from_config(cfg, run_id=resumed.get("mlflow_run_id") if resumed else None)
    if resumed:
        return ResumeSafeTracker(tracker)
    tracker.log_params(config_params(cfg))
    tracker.set_tags(run_tags(prep, "local", device=device))
    log_data_checks(tracker, prep.data.budgets, prep.data.subject_overlap)
    return tracker


def batch_source(cfg: Config, prep, pre):
    """The runtime's part of the data: one rank, its micro-batches (the sampler's positions from a cursor on)
    decoded by DataLoader processes."""
    from datasets_io.sampler import BatchLayout, row_table
    from training.data import local_batches, sampler_spec

    tables = {s: row_table(prep.data.train[s]) for s in ("A", "B")}
    spec = sampler_spec(cfg, prep.counts)
    layout = BatchLayout(cfg.train.micro_batch_size, cfg.train.grad_accum, world_size=1)
    stage_steps = {"A": prep.plan.stage_a_steps, "B": prep.plan.stage_b_steps}

    def source(stage: str, cursor: int):
        micro = list(layout.rank_micro_batches(0, cursor, stage_steps[stage]))
        return local_batches(pre, tables, spec, stage, micro, cfg.train.num_workers)

    return source


def loop_io(cfg: Config, prep, bundle, engine, tracker, resume_from, resumed: dict | None, show_progress: bool):
    """(LoopIO, LoopState) for THE loop: the model and engine restored from the checkpoint when resuming, the
    preprocessor, the batch and validation sources, the checkpointer."""
    from training.checkpoint import Checkpointer
    from training.data import DataOrderLog, Preprocessor
    from training.loop import LoopIO, LoopState
    from training.recipe import validation_source

    pre = Preprocessor.for_run(cfg, bundle)
    state = LoopState()
    if resumed:
        engine.load_training_state(resume_from, resumed["engine"])
        state = LoopState.from_json(resumed)
        print(
            f"[resume] {resume_from}: step {state.global_step}/{prep.plan.total_steps}, stage {resumed['stage']}, "
            f"cursor {state.cursor}"
        )
    out = Path(cfg.output.dir)
    io = LoopIO(
        engine=engine,
        plan=prep.plan,
        source=batch_source(cfg, prep, pre),
        val_source=validation_source(pre, prep.data.val, cfg),
        tracker=tracker,
        checkpointer=Checkpointer(out / "checkpoints", cfg, bundle.tokenizer, cfg.train.keep_last),
        grad_accum=cfg.train.grad_accum,
        log_every=cfg.train.log_every,
        eval_every=cfg.train.eval_every,
        save_every=cfg.train.save_every,
        show_progress=show_progress,
        log_checkpoint_artifacts=cfg.mlflow.log_checkpoints,
        on_step_data=DataOrderLog(out / "data_order.jsonl", 0, 1, state.global_step)
        if cfg.train.record_data_order
        else None,
        extra_state={
            "mlflow_run_id": tracker.run_id,
            "base_model": bundle.base_model_path,
            "resume_key": prep.resume_key,
        },
    )
    return io, state
