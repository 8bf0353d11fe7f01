"""The typed config tree: YAML in configs/ plus dotted `--set a.b=c` overrides, validated at load.

    cfg = load_config("configs/tiny.yaml", ["train.max_steps=20", "output.dir=runs/x"])

Unknown keys and wrong types are errors that name the key; every problem is reported at once (ConfigError).
The config crosses process boundaries (Ray workers) as plain data: `to_dict(cfg)` there, `from_dict(d)` back.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


PACKING_BACKENDS = ("sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3")
"""Attention implementations that keep packed samples apart (transformers derives the per-sample mask, or
FlashAttention's variable-length boundaries, from the restarting position ids)."""


class ConfigError(ValueError):
    def __init__(self, problems: list[str], source: str = "config"):
        self.problems = problems
        super().__init__(f"{source}: {len(problems)} problem(s):\n  - " + "\n  - ".join(problems))


@dataclass
class DataConfig:
    root: str = "data/synth"
    """Directory (or URI) that image paths in the JSONL are relative to."""
    train_file: str = "curriculum_train.jsonl"
    """Training JSONL; a relative path is taken under `root`."""
    val_file: str = "curriculum_val.jsonl"
    """Validation JSONL; a relative path is taken under `root`."""
    synth_if_missing: bool = False
    """Generate the synthetic curriculum into `root` when the train file is absent (the demo default)."""
    synth_studies: int = 1200
    """Number of synthetic studies (each gives a Stage A and a Stage B row)."""
    synth_seed: int = 0
    """Seed of the synthetic generator."""
    bad_records: Literal["error", "skip"] = "error"
    """What a bad record does: stop with file:line (error) or count and skip it (skip). Includes records over the
    token budget, found before the first step (datasets_io.token_budget)."""
    max_seq_len: int = 512
    """Longest token sequence (prompt + image tokens + target + EOS)."""
    overlong: Literal["shorten_ehr", "error"] = "shorten_ehr"
    """A sample over max_seq_len: `shorten_ehr` shortens its Patient Data block (farthest measurements first, then
    low-priority fields; counted, datasets_io.ehr_fit), `error` makes it a bad record. The target is never cut: a
    sample that does not fit even with the block emptied is a bad record under either value."""
    allow_subject_overlap: bool = False
    """Accept patients shared by the training and validation/test files (leakage; an MLflow tag records it)."""
    image_cache: str = "auto"
    """Directory of decoded images (each JPEG decoded once per run, see datasets_io/image_cache.py): "auto" =
    <output.dir>/image_cache, "" = off, else a path; on a cluster a shared filesystem every node mounts. Not a URI."""


@dataclass
class TinyModelConfig:
    image_size: int = 128
    patch_size: int = 32
    vision_hidden: int = 64
    vision_layers: int = 4
    vision_heads: int = 4
    text_hidden: int = 192
    text_layers: int = 3
    text_heads: int = 6
    text_kv_heads: int = 2
    text_intermediate: int = 512
    vocab_size: int = 1024
    """Target vocabulary of the BPE tokenizer trained on the training corpus."""


@dataclass
class ModelConfig:
    name_or_path: str = ""
    """Local directory or hub id of an HF-format LLaVA checkpoint; empty = build the tiny model below."""
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    train_vision_tower: bool = False
    """Train the vision tower fully (the tiny random tower must be, or nothing is learned from pixels)."""
    train_token_embeddings: bool = False
    """Train the token embeddings and LM head fully (the tiny model's are random and its tokenizer is new)."""
    gradient_checkpointing: bool = False
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """auto = bf16 on CUDA, fp16 on MPS (fp32 if `mps_fp32`), fp32 on CPU."""
    attn_implementation: str = "sdpa"
    """transformers' attention backend for the loaded model: sdpa, eager, flash_attention_2 (CUDA + flash-attn), ..."""


@dataclass
class LoraConfig:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    """Projection names inside the language model's layers (never the vision tower)."""


@dataclass
class TrainConfig:
    seed: int = 0
    max_steps: int = 0
    """Total optimizer steps; 0 = derived from `epochs` and the training set size."""
    epochs: float = 1.0
    micro_batch_size: int = 8
    """Samples per device per forward pass."""
    grad_accum: int = 1
    """Micro-batches per optimizer step on each rank (derived when `global_batch_size` is set)."""
    global_batch_size: int = 0
    """Samples per optimizer step over all ranks; 0 = micro_batch_size x grad_accum x workers. When set,
    grad_accum = global_batch_size / (micro_batch_size x workers), an error if that does not divide."""
    record_data_order: bool = False
    """Write <output.dir>/data_order.jsonl: per optimizer step the study ids each rank trained on (no text)."""
    lr: float = 2e-4
    """Learning rate of the LoRA adapters (and the vision tower when trained)."""
    projector_lr: float = 0.0
    """Learning rate of the projector; 0 = same as `lr`."""
    weight_decay: float = 0.0
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    """The cosine decays to `lr * min_lr_ratio`."""
    max_grad_norm: float = 1.0
    log_every: int = 10
    eval_every: int = 0
    """Validation loss every N steps (0 = at the stage switch and the end only)."""
    val_batches: int = 4
    """Batches per stage in each validation."""
    save_every: int = 0
    """Checkpoint every N steps (0 = at the stage switch and the end only)."""
    keep_last: int = 3
    """Keep the N newest step checkpoints (stage_A_end and final are always kept)."""
    num_workers: int = 0
    """DataLoader worker processes on the local path."""
    packing: bool = False
    """Pack each micro-batch's samples (image tokens included) into rows of `data.max_seq_len` tokens, attention kept
    inside each sample, instead of padding them to the longest: the same loss and gradients on fewer computed tokens.
    Needs `model.attn_implementation` in sdpa / eager / flex_attention / flash_attention_2 / flash_attention_3."""


@dataclass
class CurriculumConfig:
    stage_split: float = 0.35
    """Fraction of optimizer steps in Stage A (image only); the rest is Stage B (image + EHR)."""
    replay_fraction: float = 0.0
    """Fraction of Stage B samples drawn from Stage A rows (replay)."""
    ehr_dropout: float = 0.0
    """Fraction of Stage B samples trained with the Patient Data block emptied (makes the EHR-off A/B fair)."""


@dataclass
class OutputConfig:
    dir: str = "runs/tiny"


@dataclass
class MlflowConfig:
    tracking_uri: str = ""
    """Empty = $MLFLOW_TRACKING_URI, else sqlite:///<output.dir>/mlflow.db. A sqlite store keeps its artifacts in
    mlartifacts/ next to the db."""
    experiment: str = "radiology-report"
    run_name: str = ""
    log_checkpoints: bool = False
    """Log checkpoint directories as artifacts (otherwise their paths are logged as tags)."""
    register_at_end: bool = False
    """Register the final adapter bundle in the Model Registry at the end of training."""
    registered_model_name: str = "cxr-report-generator"
    alias: str = "candidate"


@dataclass
class DeepSpeedConfig:
    zero_stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: bool = False
    stage3_param_persistence_threshold: int = 100000
    """ZeRO-3: parameters with fewer elements stay whole on every rank (fewer small all-gathers); 0 partitions all."""


@dataclass
class RayConfig:
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 0.5
    """Fractional CPUs leave room for Ray Data's read tasks (2 workers x 1 CPU on 2 cores deadlocks)."""
    storage_path: str = ""
    """Where Ray Train keeps checkpoints and state; empty = <output.dir>/ray."""
    name: str = "ray-run"
    """Run name; the same storage_path + name resumes the run."""
    max_failures: int = 1
    num_to_keep: int = 2


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    ray: RayConfig = field(default_factory=RayConfig)


# --------------------------------------------------------------------------------------------- building
def _type_ok(value: Any, typ: Any) -> tuple[bool, Any]:
    """(ok, coerced value) for the few types the tree uses."""
    origin = typing.get_origin(typ)
    if origin is Literal:
        return value in typing.get_args(typ), value
    if origin is list:
        (item,) = typing.get_args(typ)
        if not isinstance(value, list):
            return False, value
        return all(_type_ok(v, item)[0] for v in value), value
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, t)[0] for t in typing.get_args(typ)), value
    if typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        return False, value
    if typ is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    return isinstance(value, typ), value


def _describe(typ: Any) -> str:
    if typing.get_origin(typ) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(typ))
    return getattr(typ, "__name__", str(typ))


def _build(cls: type, data: Any, prefix: str, problems: list[str]) -> Any:
    if not isinstance(data, dict):
        problems.append(f"{prefix or '<root>'}: expected a mapping, got {type(data).__name__}")
        return cls()
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            problems.append(f"{prefix}{key}: unknown key (known: {', '.join(sorted(names))})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        typ, value, key = hints[f.name], data[f.name], prefix + f.name
        if dataclasses.is_dataclass(typ):
            kwargs[f.name] = _build(typ, value, key + ".", problems)
            continue
        ok, value = _type_ok(value, typ)
        if not ok:
            problems.append(f"{key}: expected {_describe(typ)}, got {value!r}")
            continue
        kwargs[f.name] = value
    return cls(**kwargs)


def _check_ranges(cfg: Config) -> list[str]:
    p = []
    t, c = cfg.train, cfg.curriculum
    if not 0.0 <= c.stage_split <= 1.0:
        p.append(f"curriculum.stage_split: must be in [0, 1], got {c.stage_split}")
    for name in ("replay_fraction", "ehr_dropout"):
        if not 0.0 <= getattr(c, name) < 1.0:
            p.append(f"curriculum.{name}: must be in [0, 1), got {getattr(c, name)}")
    for name in ("micro_batch_size", "grad_accum", "keep_last"):
        if getattr(t, name) < 1:
            p.append(f"train.{name}: must be >= 1, got {getattr(t, name)}")
    if t.global_batch_size < 0:
        p.append(f"train.global_batch_size: must be >= 0, got {t.global_batch_size}")
    elif t.micro_batch_size > 0 and t.global_batch_size % t.micro_batch_size:
        p.append(f"train.global_batch_size: {t.global_batch_size} is not a multiple of train.micro_batch_size "
                 f"{t.micro_batch_size}")
    if t.max_steps < 0:
        p.append(f"train.max_steps: must be >= 0, got {t.max_steps}")
    if t.max_steps == 0 and t.epochs <= 0:
        p.append("train.epochs: must be > 0 when train.max_steps is 0")
    if t.lr <= 0:
        p.append(f"train.lr: must be > 0, got {t.lr}")
    if t.packing and cfg.model.attn_implementation not in PACKING_BACKENDS:
        p.append(f"train.packing: needs model.attn_implementation in {', '.join(PACKING_BACKENDS)} "
                 f"(got {cfg.model.attn_implementation!r}), which keep packed samples apart")
    if cfg.data.max_seq_len < 16:
        p.append(f"data.max_seq_len: must be >= 16, got {cfg.data.max_seq_len}")
    if "://" in cfg.data.image_cache:
        p.append(f"data.image_cache: must be a filesystem path (local disk or a shared mount), not a URI: "
                 f"{cfg.data.image_cache!r}")
    if cfg.lora.r < 1:
        p.append(f"lora.r: must be >= 1, got {cfg.lora.r}")
    tiny = cfg.model.tiny
    if tiny.image_size % tiny.patch_size:
        p.append(f"model.tiny.image_size: {tiny.image_size} is not a multiple of patch_size {tiny.patch_size}")
    if tiny.text_hidden % tiny.text_heads or tiny.text_heads % tiny.text_kv_heads:
        p.append("model.tiny.text_heads: text_hidden must divide by text_heads, text_heads by text_kv_heads")
    if tiny.vision_hidden % tiny.vision_heads:
        p.append("model.tiny.vision_heads: vision_hidden must divide by vision_heads")
    if cfg.ray.num_workers < 1:
        p.append(f"ray.num_workers: must be >= 1, got {cfg.ray.num_workers}")
    return p


def from_dict(data: dict[str, Any], source: str = "config") -> Config:
    problems: list[str] = []
    cfg = _build(Config, data, "", problems)
    if not problems:
        problems = _check_ranges(cfg)
    if problems:
        raise ConfigError(problems, source)
    return cfg


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def config_hash(cfg: Config) -> str:
    return hashlib.sha256(json.dumps(to_dict(cfg), sort_keys=True).encode()).hexdigest()[:16]


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> list[str]:
    """Apply `a.b=c` overrides in place (values parsed as YAML scalars). Returns problems."""
    problems = []
    for item in overrides or []:
        if "=" not in item:
            problems.append(f"--set {item!r}: expected key=value")
            continue
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                problems.append(f"--set {key}: {part} is not a section")
                break
        else:
            node[parts[-1]] = yaml.safe_load(raw) if raw != "" else ""
    return problems


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Load YAML (or the defaults when path is None), apply overrides, validate. Raises ConfigError."""
    source = str(path) if path else "defaults"
    data: dict[str, Any] = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError([f"config file not found: {p}"], source)
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError([f"invalid YAML: {e}"], source) from None
    problems = apply_overrides(data, overrides or [])
    if problems:
        raise ConfigError(problems, source)
    return from_dict(data, source)


def data_path(cfg: Config, name: str) -> str:
    """`data.train_file` / `data.val_file` resolved against `data.root`."""
    value = getattr(cfg.data, name)
    return value if ("://" in value or value.startswith("/")) else f"{cfg.data.root.rstrip('/')}/{value}"


def image_cache_dir(cfg: Config) -> str:
    """`data.image_cache` resolved: "auto" -> <output.dir>/image_cache; "" (cache off) stays ""."""
    value = cfg.data.image_cache
    return f"{cfg.output.dir.rstrip('/')}/image_cache" if value == "auto" else value


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
