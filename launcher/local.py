"""The local runtime: one process, one device (CUDA, Apple MPS or CPU), no Ray cluster and no DeepSpeed.

    launcher local --config configs/tiny.yaml --device auto
    launcher local --config configs/tiny.yaml --set train.max_steps=50 --resume auto

Builds the pieces (records, model, plan, engine, tracker, checkpointer, batch sources) and hands them to
`training.loop.train`, the same loop the Ray workers run.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from datasets_io.records import Record
from launcher.config import Config, data_path
from launcher.errors import LauncherError

log = logging.getLogger(__name__)

DEVICES = ("auto", "cuda", "mps", "cpu")


# ------------------------------------------------------------------------------------------------ devices
def available_devices() -> list[str]:
    found = []
    if torch.cuda.is_available():
        found.append("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        found.append("mps")
    return found + ["cpu"]


def resolve_device(requested: str, available: list[str] | None = None) -> str:
    """auto -> cuda, then mps, then cpu. Asking for a device that is not there is an error, never a fallback."""
    available = available if available is not None else available_devices()
    if requested not in DEVICES:
        raise LauncherError(f"--device {requested!r}: choose one of {', '.join(DEVICES)}")
    if requested == "auto":
        return available[0]
    if requested not in available:
        raise LauncherError(
            f"--device {requested}: not available on this machine (available: {', '.join(available)}). "
            "Use --device auto to pick the best one."
        )
    return requested


def resolve_dtype(cfg_dtype: str, device: str) -> tuple[torch.dtype, str]:
    """(parameter dtype, Accelerate mixed_precision). Base weights stay fp32 on CPU; bf16 autocast on CUDA;
    fp16 autocast on MPS (bf16 is not supported by every MPS kernel)."""
    choice = cfg_dtype if cfg_dtype != "auto" else {"cuda": "bf16", "mps": "fp16", "cpu": "fp32"}[device]
    if device == "cpu" and choice == "fp16":
        raise LauncherError("model.dtype=fp16 is not supported on CPU; use fp32 or bf16")
    return torch.float32, {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[choice]


# ------------------------------------------------------------------------------------------------ data
@dataclass
class RunData:
    train: dict[str, list[Record]]  # stage -> rows
    val: dict[str, list[Record]]
    skipped: int


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
    from datasets_io.jsonl import read_records

    def by_stage(path: str) -> tuple[dict[str, list[Record]], int]:
        records, report = read_records(path, cfg.data.root, policy=cfg.data.bad_records, check_images="exists")
        if report.skipped:
            print(f"[data] {path}: skipped {report.skipped} bad record(s) (data.bad_records=skip); first: "
                  f"{report.problems[0]}")
        return {s: [r for r in records if r.stage == s] for s in ("A", "B")}, report.skipped

    train, skipped_t = by_stage(data_path(cfg, "train_file"))
    val_path = data_path(cfg, "val_file")
    val, skipped_v = by_stage(val_path) if ("://" in val_path or Path(val_path).exists()) else ({"A": [], "B": []}, 0)
    for stage in ("A", "B"):
        if not train[stage]:
            raise LauncherError(f"{data_path(cfg, 'train_file')}: no Stage {stage} rows; the curriculum needs both")
    return RunData(train, val, skipped_t + skipped_v)


def corpus_texts(data: RunData) -> list[str]:
    return [t for rows in data.train.values() for r in rows for t in (r.prompt, r.target)]


# ------------------------------------------------------------------------------------------------ the run
def run_local(cfg: Config, device: str = "auto", resume: str | None = None, stop_after: int | None = None,
              show_progress: bool = True) -> dict:
    from training import curriculum
    from training.checkpoint import Checkpointer, read_state, resolve_resume
    from training.data import Preprocessor, StageStream, StreamSpec, local_batches
    from training.engines import AccelerateEngine
    from training.loop import LoopIO, LoopState, train, write_run_summary
    from training.model import build_model, load_adapter_weights
    from training.tracking import MlflowTracker, config_params

    t_start = time.perf_counter()
    device = resolve_device(device)
    if device == "mps":
        os.environ.setdefault("PYTORCH_ENABLE_MPS_FALLBACK", "1")
    dtype, mixed = resolve_dtype(cfg.model.dtype, device)
    out = Path(cfg.output.dir)
    ckpt_root = out / "checkpoints"
    resume_from = resolve_resume(resume, ckpt_root)  # fails loudly before any work
    resumed = read_state(resume_from) if resume_from else None

    ensure_data(cfg)
    data = load_run_data(cfg)
    torch.manual_seed(cfg.train.seed)
    bundle = build_model(cfg, corpus_texts(data), dtype=dtype)
    plan = curriculum.plan_steps(cfg, len(data.train["A"]), len(data.train["B"]), world_size=1)

    tracker = MlflowTracker(cfg, run_id=resumed.get("mlflow_run_id") if resumed else None)
    if not resumed:
        tracker.log_params(config_params(cfg))
        tracker.set_tags({"runtime": "local", "device": device, "total_steps": str(plan.total_steps),
                          "stage_a_steps": str(plan.stage_a_steps)})

    pre = Preprocessor(bundle.tokenizer, bundle.image_spec, bundle.image_token_id, bundle.num_image_tokens,
                       cfg.data.max_seq_len, cfg.data.overlong, cfg.data.root, packing=cfg.train.packing)
    spec = StreamSpec(cfg.train.seed, cfg.curriculum.replay_fraction, cfg.curriculum.ehr_dropout)
    streams = {"A": StageStream("A", data.train["A"], spec),
               "B": StageStream("B", data.train["B"], spec, replay_rows=data.train["A"])}
    mb = cfg.train.micro_batch_size

    def source(stage: str, start_micro: int):
        remaining = (plan.total_steps * cfg.train.grad_accum) - start_micro  # an upper bound; streams cycle
        return local_batches(streams[stage], pre, start_micro * mb, mb, max(1, remaining), cfg.train.num_workers)

    val_cache: dict[str, list] = {}

    def val_source(stage: str) -> list:
        if stage not in val_cache:
            rows = data.val[stage][: cfg.train.val_batches * mb]
            val_stream = StageStream("val", rows, StreamSpec(cfg.train.seed)) if rows else None
            val_cache[stage] = list(local_batches(val_stream, pre, 0, mb, len(rows) // mb)) if val_stream and len(rows) >= mb else []
        return val_cache[stage]

    if resumed:
        load_adapter_weights(bundle.model, resume_from)
    engine = AccelerateEngine(bundle.model, cfg.train, device, mixed_precision=mixed)
    state = LoopState()
    if resumed:
        engine.load_training_state(resume_from, resumed["engine"])
        state = LoopState.from_json(resumed)
        print(f"[resume] {resume_from}: step {state.global_step}/{plan.total_steps}, stage {resumed['stage']}, "
              f"cursor {state.cursor}")
    io = LoopIO(engine=engine, plan=plan, source=source, val_source=val_source, tracker=tracker,
                checkpointer=Checkpointer(ckpt_root, cfg, bundle.tokenizer, cfg.train.keep_last),
                grad_accum=cfg.train.grad_accum, log_every=cfg.train.log_every, eval_every=cfg.train.eval_every,
                save_every=cfg.train.save_every, show_progress=show_progress,
                log_checkpoint_artifacts=cfg.mlflow.log_checkpoints,
                extra_state={"mlflow_run_id": tracker.run_id, "base_model": bundle.base_model_path})
    print(f"[train] device={device} mixed_precision={mixed} steps={plan.total_steps} "
          f"(stage A {plan.stage_a_steps}, stage B {plan.stage_b_steps}) samples/step={plan.samples_per_step} "
          f"setup {time.perf_counter() - t_start:.1f}s")
    status = "FAILED"
    try:
        state = train(io, state, stop_after=stop_after)
        status = "FINISHED" if state.global_step == plan.total_steps else "KILLED"
    finally:
        summary = write_run_summary(out / "run_summary.json", state, plan, mlflow_run_id=tracker.run_id,
                                    tracking_uri=tracker.tracking_uri, device=device,
                                    wall_time_s=round(time.perf_counter() - t_start, 1),
                                    time_to_first_step_s=round(state.first_step_done_at - t_start, 1)
                                    if state.first_step_done_at else None,
                                    base_model=bundle.base_model_path, skipped_records=data.skipped)
        tracker.close(status if status != "KILLED" else "FINISHED")
    if status == "FINISHED" and cfg.mlflow.register_at_end:
        from training.registry import register_checkpoint

        summary["registered"] = register_checkpoint(
            state.checkpoints["final"], cfg.mlflow.registered_model_name, alias=cfg.mlflow.alias, cfg=cfg,
            run_id=tracker.run_id)
        (out / "run_summary.json").write_text(json.dumps(summary, indent=2))
    return summary
