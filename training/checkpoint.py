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
from dataclasses import asdict
from pathlib import Path
from typing import Any

from launcher.config import Config, save_config
from launcher.errors import LauncherError

STATE_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def bundle_files(out_dir: Path) -> list[str]:
    return sorted(p.name for p in Path(out_dir).iterdir())


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


def plan_dict(plan: Any) -> dict:
    return asdict(plan)
