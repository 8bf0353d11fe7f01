"""The adapter bundle: what a checkpoint directory holds, written atomically, read back loudly.

    checkpoints/step-000040/          (also: stage_A_end/, final/)
      adapter_config.json             plain PEFT: PeftModel.from_pretrained(base, this_dir) works
      adapter_model.safetensors       LoRA + projector (+ any fully trained module); never frozen weights
      tokenizer.json, tokenizer_config.json, ...
      config.yaml                     the resolved run config
      trainer_state.json              step, stage, data cursor, plan, optimizer hyper-parameters
      optimizer.safetensors, rng_state.safetensors   (local engine; DeepSpeed keeps its own engine state dir)

Written to `<name>.tmp` then renamed, so a crash never leaves a half checkpoint that looks complete.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from datasets_io.config import Config, save_config
from datasets_io.errors import LauncherError

STATE_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


class Checkpointer:
    def __init__(self, root: str | Path, cfg: Config, tokenizer: Any, keep_last: int):
        self.root, self.cfg, self.tokenizer, self.keep_last = Path(root), cfg, tokenizer, keep_last

    def save(self, name: str, engine: Any, state: dict) -> Path:
        """All ranks call this (DeepSpeed saving is collective); only the writer rank writes the bundle files."""
        final = self.root / name
        tmp = self.root / f"{name}.tmp"
        if engine.is_writer:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        engine_meta = engine.save_training_state(tmp) or {}
        engine.save_adapter(tmp)
        if engine.is_writer:
            self.tokenizer.save_pretrained(str(tmp))
            save_config(self.cfg, tmp / "config.yaml")
            (tmp / STATE_FILE).write_text(json.dumps({**state, "engine": engine_meta}, indent=2))
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            self._prune()
        return final

    def _prune(self) -> None:
        steps = sorted((int(m.group(1)), p) for p in self.root.iterdir() if (m := _STEP_DIR.match(p.name)))
        for _, path in steps[: max(0, len(steps) - self.keep_last)]:
            shutil.rmtree(path, ignore_errors=True)


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint (by step in trainer_state.json), or None."""
    root = Path(root)
    if not root.is_dir():
        return None
    best: tuple[int, Path] | None = None
    for p in root.iterdir():
        if p.suffix == ".tmp" or not (p / STATE_FILE).is_file():
            continue
        step = read_state(p)["global_step"]
        if best is None or step > best[0]:
            best = (step, p)
    return best[1] if best else None


def read_state(ckpt: str | Path) -> dict:
    path = Path(ckpt) / STATE_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise LauncherError(f"checkpoint {ckpt} has no {STATE_FILE}: not a complete checkpoint") from None
    except json.JSONDecodeError as e:
        raise LauncherError(f"checkpoint state {path} is unreadable: {e}") from None


def resolve_resume(resume: str | None, checkpoints_root: Path) -> Path | None:
    """`None` = fresh run; `auto` = latest checkpoint, error if there is none; a path must be a checkpoint."""
    if not resume:
        return None
    if resume == "auto":
        found = latest_checkpoint(checkpoints_root)
        if found is None:
            raise LauncherError(f"--resume auto: no checkpoint under {checkpoints_root}; run without --resume to start")
        return found
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise LauncherError(f"--resume {resume}: not a checkpoint directory (no {STATE_FILE})")
    return path


# --------------------------------------------------------------------------------------------- resume safety
def records_fingerprint(rows: Any) -> str:
    """A short hash of the training rows (study, stage, image, prompt, target, in file order): a checkpoint's data
    cursor only means something over the same rows."""
    import hashlib

    h = hashlib.blake2b(digest_size=12)
    for r in rows:
        for part in (r.study_id, r.stage, r.image, r.prompt, r.target):
            h.update(part.encode())
            h.update(b"\x00")
    return h.hexdigest()


def resume_key(cfg: Config, plan: Any, world_size: int, train_fingerprint: str) -> dict[str, Any]:
    """What a checkpoint's step, stage and data cursor mean: a resume is only exact when every value is unchanged.
    Stored in trainer_state.json; `check_resume` compares it with the current run's."""
    t, c = cfg.train, cfg.curriculum
    return {
        "train.max_steps": t.max_steps,
        "train.epochs": t.epochs,
        "train.seed": t.seed,
        "train.micro_batch_size": t.micro_batch_size,
        "train.grad_accum": t.grad_accum,
        "world_size": world_size,
        "samples_per_step": plan.samples_per_step,
        "total_steps": plan.total_steps,
        "stage_a_steps": plan.stage_a_steps,
        "curriculum.stage_split": c.stage_split,
        "curriculum.replay_fraction": c.replay_fraction,
        "curriculum.ehr_dropout": c.ehr_dropout,
        "train.warmup_steps": plan.warmup_steps,
        "train.min_lr_ratio": plan.min_lr_ratio,
        "training data": train_fingerprint,
    }


def check_resume(saved_state: dict, current_key: dict[str, Any], ckpt: str | Path) -> None:
    """Refuse to resume a checkpoint whose plan differs from this run's, listing every changed key with both values
    (a changed step count moves the stage switch and the learning-rate schedule; a changed batch or data changes
    what the saved cursor points at)."""
    saved = saved_state.get("resume_key")
    if saved is None:
        raise LauncherError(
            f"cannot resume from {ckpt}: it records no plan (written by an older version), so "
            "an exact resume cannot be verified; start a new run (another output.dir)"
        )
    changed = [f"  {k}: checkpoint {saved.get(k)!r}, now {v!r}" for k, v in current_key.items() if saved.get(k) != v]
    if changed:
        raise LauncherError(
            f"cannot resume from {ckpt}: the run's plan changed, so its step, stage and data cursor would mean "
            "something else:\n" + "\n".join(changed) + "\nResume with the original settings, or start a new run "
            "(another output.dir, or ray.name on Ray)."
        )
