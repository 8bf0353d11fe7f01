"""The MLflow Model Registry: an adapter bundle logged as a pyfunc model, registered as a version with lineage tags.
This module decides what a version holds; training/tracking.py (the MLflow module) writes and reads it.

    launcher register --checkpoint runs/tiny/checkpoints/final --name cxr-report-generator --alias candidate
    launcher local --config configs/tiny.yaml --set mlflow.register_at_end=true      (the same, at the end of training)

    mlflow.pyfunc.load_model("models:/cxr-report-generator@candidate")      (in any process; see training/pyfunc.py)

What a version carries:
- artifacts: the adapter bundle (adapter, tokenizer, config.yaml, trainer_state.json; no optimizer state), and the
  base model directory when the base is local (the tiny model); a hub base is referenced by id (model config
  `base_model`), never copied;
- code: the project packages (datasets_io, training, launcher), so the model loads in a process that has only the
  pinned pip requirements installed;
- model_config: every serving limit (training.pyfunc.ServingLimits: rows, image bytes and pixels, EHR size and depth,
  max_new_tokens, allow_local_paths=false), written out so a load or MLFLOW_PYFUNC_INFERENCE_CONFIG can change them;
- lineage tags: base model, config hash, sha256 of the train / val JSONL, git commit, the training run id, the
  checkpoint's step, and the validation losses recorded at the stage ends (trainer_state.json val_history).

The model is logged in the checkpoint's training run when that run is in the target store and over (MLflow 3
"LoggedModel", registered with the model_uri log_model returns), else in a new "registration" run of the experiment
tagged with the training run id. No patient data is logged.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

from datasets_io.errors import LauncherError
from training import tracking

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CODE_PACKAGES = ("datasets_io", "training", "launcher")
MODEL_NAME_IN_RUN = "report_generator"
TRAINING_STATE_FILES = {"optimizer.safetensors", "rng_state.safetensors"}
# What the pyfunc needs at load and predict time, pinned to what is installed here.
PIP_PACKAGES = (
    "mlflow",
    "torch",
    "transformers",
    "peft",
    "accelerate",
    "tokenizers",
    "safetensors",
    "pillow",
    "numpy",
    "pandas",
    "pyyaml",
    "tqdm",
    "pyarrow",
)


# --------------------------------------------------------------------------------------------- lineage
def file_sha256(path: str) -> str:
    from datasets_io.jsonl import resolve_fs

    fs, inner = resolve_fs(path)
    h = hashlib.sha256()
    with fs.open_input_stream(inner) as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def git_commit(root: Path = PROJECT_ROOT) -> tuple[str, bool] | None:
    """(commit, dirty) of the project checkout, or None outside a git work tree."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        status = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit, bool(status)


def stage_end_metrics(state: dict) -> dict[str, str]:
    """Validation losses at the end of Stage A and at the checkpoint's step, from trainer_state.json val_history."""
    history = {h["step"]: h for h in state.get("val_history", [])}
    points = {"stage_A_end": state.get("stage_switch_step"), "checkpoint": state.get("global_step")}
    out = {}
    for name, step in points.items():
        for key, value in history.get(step, {}).items():
            if key != "step":
                out[f"metrics.{name}.{key.replace('/', '_')}"] = f"{value:.6g}"
    losses = state.get("losses") or []
    if losses:
        out["metrics.checkpoint.train_loss"] = f"{losses[-1]:.6g}"
    return out


def lineage_tags(ckpt: Path, cfg: Any, state: dict, base_model: str) -> dict[str, str]:
    from datasets_io.config import config_hash, data_path

    tags = {
        "base_model": base_model,
        "config_hash": config_hash(cfg),
        "checkpoint": str(ckpt),
        "checkpoint.step": str(state.get("global_step", "")),
        "checkpoint.stage_switch_step": str(state.get("stage_switch_step", "")),
    }
    if state.get("mlflow_run_id"):
        tags["training_run_id"] = state["mlflow_run_id"]
    for name in ("train_file", "val_file"):
        path = data_path(cfg, name)
        try:
            tags[f"data.{name}.sha256"] = file_sha256(path)
        except (OSError, FileNotFoundError):
            tags[f"data.{name}.sha256"] = "unavailable (file not found)"
    git = git_commit()
    if git:
        tags["git_commit"], tags["git_dirty"] = git[0], str(git[1]).lower()
    tags.update(stage_end_metrics(state))
    return tags


def pip_requirements() -> list[str]:
    reqs = []
    for name in PIP_PACKAGES:
        try:
            version = metadata.version(name).split("+")[0]  # torch "2.13.0+cpu" -> "2.13.0"
        except metadata.PackageNotFoundError:
            continue
        reqs.append(f"{name}=={version}")
    return reqs


def stage_bundle(ckpt: Path, dst: Path) -> Path:
    """The inference part of a checkpoint: adapter, tokenizer, config.yaml, trainer_state.json. Optimizer and RNG
    state (and DeepSpeed's engine directories) are for resuming and stay out of the registry."""
    dst.mkdir(parents=True)
    for p in ckpt.iterdir():
        if p.is_file() and p.name not in TRAINING_STATE_FILES:
            shutil.copy2(p, dst / p.name)
    return dst


def stage_code(dst: Path) -> list[str]:
    """Copies of the project packages without caches: what ships as the model's code."""
    out = []
    for pkg in CODE_PACKAGES:
        src = PROJECT_ROOT / pkg
        shutil.copytree(src, dst / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        out.append(str(dst / pkg))
    return out


# --------------------------------------------------------------------------------------------- register
def register_checkpoint(
    ckpt_dir: str | Path,
    name: str,
    alias: str | None = None,
    cfg: Any = None,
    run_id: str | None = None,
    tracking_uri: str | None = None,
    serving_limits: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Log the bundle at `ckpt_dir` as a pyfunc model, register a version of `name` with lineage tags, set `alias`.
    `serving_limits`: training.pyfunc.ServingLimits fields to log instead of the defaults.

    Returns {name, version, alias, model_uri ("models:/NAME/VERSION"), logged_model_uri, run_id, tracking_uri}.
    """
    import training.pyfunc as pyfunc_module
    from training.checkpoint import read_state

    ckpt = Path(ckpt_dir).resolve()
    cfg = _checked_bundle(ckpt, ckpt_dir, name, serving_limits, cfg)
    state = read_state(ckpt)
    base = json.loads((ckpt / "adapter_config.json").read_text())["base_model_name_or_path"]
    base_is_dir = Path(base).is_dir()
    if not base_is_dir and (base.startswith(("/", ".", "~")) or base.count("/") > 1):
        raise LauncherError(
            f"base model {base!r} of {ckpt} is not a directory on this machine (nor a hub id): "
            "register where the base model is, or point adapter_config.json at it"
        )

    uri = tracking.resolve_store(tracking_uri, cfg)
    tags = lineage_tags(ckpt, cfg, state, base)
    # Every limit is written out: MLflow lets a load (or MLFLOW_PYFUNC_INFERENCE_CONFIG) override only logged keys.
    limits = pyfunc_module.ServingLimits.from_model_config(serving_limits or {})
    model_config: dict[str, Any] = {"batch_size": 8, **limits.as_model_config()}
    with tempfile.TemporaryDirectory(prefix="cxr-register-") as tmp:
        artifacts = {"adapter": str(stage_bundle(ckpt, Path(tmp) / "adapter"))}
        if base_is_dir:
            artifacts["base_model"] = str(Path(base).resolve())
        else:
            model_config["base_model"] = base
        training_run = {"training_run_id": tags["training_run_id"]} if "training_run_id" in tags else {}
        pyfunc_model = {  # mlflow.pyfunc.log_model's arguments
            "name": MODEL_NAME_IN_RUN,
            "python_model": pyfunc_module.__file__,  # models from code: no pickled object in the model
            "artifacts": artifacts,
            "code_paths": stage_code(Path(tmp) / "code"),
            "pip_requirements": pip_requirements(),
            "signature": pyfunc_module.signature(),
            "model_config": model_config,
            "tags": {k: v for k, v in tags.items() if not k.startswith("metrics.")},
        }
        logged = tracking.log_registered_model(
            uri,
            cfg.mlflow.experiment,
            name,
            pyfunc_model,
            alias=alias,
            run_id=run_id or state.get("mlflow_run_id"),
            new_run_name=f"register-{ckpt.name}",
            new_run_tags={"kind": "registration", "checkpoint": str(ckpt), **training_run},
            version_tags=tags,
        )
    return {
        "name": name,
        "version": logged["version"],
        "alias": alias or None,
        "model_uri": f"models:/{name}/{logged['version']}",
        "logged_model_uri": logged["logged_model_uri"],
        "run_id": logged["run_id"],
        "tracking_uri": uri,
    }


def _checked_bundle(
    ckpt: Path, ckpt_dir: str | Path, name: str, serving_limits: dict[str, Any] | None, cfg: Any
) -> Any:
    """Refuse what cannot be registered, naming it; returns the run config (the bundle's config.yaml by default)."""
    from datasets_io.config import load_config
    from training.pyfunc import ServingLimits

    if not (ckpt / "adapter_config.json").is_file():
        raise LauncherError(f"--checkpoint {ckpt_dir}: not an adapter bundle (no adapter_config.json)")
    if not name:
        raise LauncherError("a registered model name is required (--name)")
    unknown = set(serving_limits or {}) - set(ServingLimits().as_model_config())
    if unknown:
        raise LauncherError(f"serving_limits: unknown keys {sorted(unknown)} (see training.pyfunc.ServingLimits)")
    if cfg is not None:
        return cfg
    if not (ckpt / "config.yaml").is_file():
        raise LauncherError(f"--checkpoint {ckpt_dir}: no config.yaml (the resolved run config) in the bundle")
    return load_config(ckpt / "config.yaml")


def load_registered_bundle(model_uri: str, tracking_uri: str | None = None) -> tuple[Any, dict]:
    """(ModelBundle, info) of a registered pyfunc model, through mlflow.pyfunc.load_model (the serving path)."""
    uri = tracking.resolve_store(tracking_uri)
    loaded = tracking.load_pyfunc_model(model_uri, uri)
    python_model = loaded.unwrap_python_model()
    if not hasattr(python_model, "bundle"):
        raise LauncherError(f"{model_uri} is not a report-generator model (training.pyfunc.ReportGenerator)")
    return python_model.bundle, {
        "max_seq_len": python_model.max_seq_len,
        "run_id": loaded.metadata.run_id,
        "adapter_dir": python_model.adapter_dir,
        "pyfunc": loaded,
    }
