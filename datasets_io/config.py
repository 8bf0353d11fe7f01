"""The typed config tree: YAML in configs/ plus dotted `--set a.b=c` overrides, validated at load (pydantic).

    cfg = load_config("configs/tiny.yaml", ["train.max_steps=20", "output.dir=runs/x"])

Every section forbids unknown keys and is strict about types (no "3" for 3, no `true` for 1; an int is accepted for
a float); ranges are field constraints, cross-field checks are validators. Every problem is reported at once, each
with its dotted key, in one ConfigError (a LauncherError) naming the file. The config crosses process boundaries
(Ray workers) as plain data: `cfg.model_dump()` there, `from_dict(d)` back.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from datasets_io.errors import LauncherError
from datasets_io.packing import PACKED_SDPA

PACKING_BACKENDS = ("sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3", PACKED_SDPA)
"""Attention implementations that keep packed samples apart (transformers derives the per-sample mask, or
FlashAttention's variable-length boundaries, from the restarting position ids; packed_sdpa splits the samples itself:
training.packing)."""


class ConfigError(LauncherError):
    """Every problem of one config (`problems`, each `dotted.key: what is wrong`), under the file it came from."""

    def __init__(self, problems: list[str], source: str = "config"):
        self.problems = problems
        super().__init__(f"{source}: {len(problems)} problem(s):\n  - " + "\n  - ".join(problems))


class Section(BaseModel):
    # validate_default: a cross-field check also sees the values a file leaves at their defaults
    model_config = ConfigDict(extra="forbid", strict=True, validate_default=True)


class DataConfig(Section):
    """Where the curriculum lives and how its records are read."""

    root: str = Field("data/synth", description="Directory (or URI) that image paths in the JSONL are relative to.")
    train_file: str = Field(
        "curriculum_train.jsonl", description="Training JSONL; a relative path is taken under `root`."
    )
    val_file: str = Field(
        "curriculum_val.jsonl", description="Validation JSONL; a relative path is taken under `root`."
    )
    synth_if_missing: bool = Field(
        False,
        description="Generate the synthetic curriculum into `root` when the train file is absent (the demo default).",
    )
    synth_studies: int = Field(
        1200, description="Number of synthetic studies (each gives a Stage A and a Stage B row)."
    )
    synth_seed: int = Field(0, description="Seed of the synthetic generator.")
    bad_records: Literal["error", "skip"] = Field(
        "error",
        description=(
            "What a bad record does: stop with file:line (error) or count and skip it (skip). Includes records over the "
            "token budget, found before the first step (datasets_io.token_budget)."
        ),
    )
    max_seq_len: int = Field(512, ge=16, description="Longest token sequence (prompt + image tokens + target + EOS).")
    overlong: Literal["shorten_ehr", "error"] = Field(
        "shorten_ehr",
        description=(
            "A sample over max_seq_len: `shorten_ehr` shortens its Patient Data block (farthest measurements first, then "
            "low-priority fields; counted, datasets_io.ehr_fit), `error` makes it a bad record. The target is never cut: "
            "a sample that does not fit even with the block emptied is a bad record under either value."
        ),
    )
    allow_subject_overlap: bool = Field(
        False,
        description="Accept patients shared by the training and "
        "validation/test files (leakage; an MLflow tag records it).",
    )
    image_cache: str = Field(
        "auto",
        description=(
            'Directory of decoded images (each JPEG decoded once per run, see datasets_io/image_cache.py): "auto" = '
            '<output.dir>/image_cache, "" = off, else a path; on a cluster a shared filesystem every node mounts. '
            "Not a URI."
        ),
    )

    @field_validator("image_cache")
    @classmethod
    def _not_a_uri(cls, value: str) -> str:
        if "://" in value:  # cache entries are written by atomic renames, which object stores do not have
            raise ValueError(f"must be a filesystem path (local disk or a shared mount), not a URI: {value!r}")
        return value


class TinyModelConfig(Section):
    """The tiny LLaVA built from config when `model.name_or_path` is empty (tests, the demo)."""

    image_size: int = Field(128, ge=1)
    patch_size: int = Field(32, ge=1)
    vision_hidden: int = Field(64, ge=1)
    vision_layers: int = Field(4, ge=1)
    vision_heads: int = Field(4, ge=1)
    text_hidden: int = Field(192, ge=1)
    text_layers: int = Field(3, ge=1)
    text_heads: int = Field(6, ge=1)
    text_kv_heads: int = Field(2, ge=1)
    text_intermediate: int = Field(512, ge=1)
    vocab_size: int = Field(
        1024, ge=1, description="Target vocabulary of the BPE tokenizer trained on the training corpus."
    )
    vision_pretrain_steps: int = Field(
        0,
        ge=0,
        description="Steps pre-training the random vision tower on the Stage A training images' CheXpert labels "
        "(a linear head on its patch tokens) when the tiny base is built, standing in for the pretrained CLIP tower "
        "a real LLaVA brings (training/vision_pretrain.py); 0 = a random tower.",
    )
    vision_pretrain_uncertain: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="The target that pre-training gives a CheXpert label marked Uncertain: 0 = absent (U-Zeros), "
        "1 = present (U-Ones, as the evaluation's U+ scoring counts it), or a value between.",
    )

    @field_validator("patch_size", "vision_heads", "text_heads", "text_kv_heads")
    @classmethod
    def _divides(cls, value: int, info: ValidationInfo) -> int:
        whole = {
            "patch_size": "image_size",
            "vision_heads": "vision_hidden",
            "text_heads": "text_hidden",
            "text_kv_heads": "text_heads",
        }[info.field_name]  # declared earlier: validated already, if valid
        if whole in info.data and info.data[whole] % value:
            raise ValueError(f"{whole} {info.data[whole]} is not a multiple of {info.field_name} {value}")
        return value


class ModelConfig(Section):
    name_or_path: str = Field(
        "",
        description="Local directory or hub id of an HF-format LLaVA checkpoint; empty = build the tiny model below.",
    )
    tiny: TinyModelConfig = TinyModelConfig()
    train_vision_tower: bool = Field(
        False,
        description="Train the vision tower fully (the tiny random tower must be, or nothing is learned from pixels).",
    )
    train_token_embeddings: bool = Field(
        False,
        description="Train the token embeddings and LM head fully (the tiny "
        "model's are random and its tokenizer is new).",
    )
    gradient_checkpointing: bool = False
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto = bf16 on CUDA, fp16 on MPS (fp32 if `mps_fp32`), fp32 on CPU."
    )
    attn_implementation: str = Field(
        "sdpa",
        description="transformers' attention backend for the loaded model: "
        "sdpa, eager, flash_attention_2 (CUDA + flash-attn), ..., or packed_sdpa (the project's, "
        "training/packing.py: SDPA on each packed sample alone, no padding computed; for CPU and MPS).",
    )


class LoraConfig(Section):
    r: int = Field(16, ge=1)
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] = Field(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        description="Projection names inside the language model's layers (never the vision tower).",
    )


class TrainConfig(Section):
    seed: int = 0
    max_steps: int = Field(
        0, ge=0, description="Total optimizer steps; 0 = derived from `epochs` and the training set size."
    )
    epochs: float = 1.0
    micro_batch_size: int = Field(8, ge=1, description="Samples per device per forward pass.")
    grad_accum: int = Field(
        1, ge=1, description="Micro-batches per optimizer step on each rank (derived when `global_batch_size` is set)."
    )
    global_batch_size: int = Field(
        0,
        ge=0,
        description=(
            "Samples per optimizer step over all ranks; 0 = micro_batch_size x grad_accum x workers. When set, "
            "grad_accum = global_batch_size / (micro_batch_size x workers), an error if that does not divide."
        ),
    )
    record_data_order: bool = Field(
        False,
        description="Write <output.dir>/data_order.jsonl: per optimizer step the "
        "study ids each rank trained on (no text).",
    )
    lr: float = Field(2e-4, gt=0, description="Learning rate of the LoRA adapters (and the vision tower when trained).")
    projector_lr: float = Field(0.0, description="Learning rate of the projector; 0 = same as `lr`.")
    weight_decay: float = 0.0
    warmup_steps: int = 10
    min_lr_ratio: float = Field(0.1, description="The cosine decays to `lr * min_lr_ratio`.")
    max_grad_norm: float = 1.0
    log_every: int = 10
    eval_every: int = Field(0, description="Validation loss every N steps (0 = at the stage switch and the end only).")
    val_batches: int = Field(4, description="Batches per stage in each validation.")
    save_every: int = Field(0, description="Checkpoint every N steps (0 = at the stage switch and the end only).")
    keep_last: int = Field(
        3, ge=1, description="Keep the N newest step checkpoints (stage_A_end and final are always kept)."
    )
    num_workers: int = Field(0, description="DataLoader worker processes on the local path.")
    prompt_loss_weight: float = Field(
        0.0,
        ge=0,
        description=(
            "Also supervise the prompt's text tokens (the Patient Data block and the instruction; never image tokens, "
            "never a sample's first token): the loss is the target's mean next-token loss + this weight x the "
            "prompt's. Predicting the EHR's numbers teaches a random LM to read them (the tiny default; measured in "
            "README 'Learning on other generators'). 0 = the target only: a pretrained LM reads them already (off "
            "for real bases, like axolotl's train_on_inputs: false)."
        ),
    )
    packing: bool = Field(
        True,
        description=(
            "Pack each micro-batch's samples (image tokens included) into rows of `data.max_seq_len` tokens, attention "
            "kept inside each sample, instead of padding them to the longest: the same loss and gradients on fewer "
            "computed tokens (never more: one sample per row is one of the layouts weighed). Needs "
            "`model.attn_implementation` in sdpa / eager / flex_attention / flash_attention_2 / flash_attention_3; "
            "false = padded micro-batches."
        ),
    )
    packing_forwards: int = Field(
        2,
        ge=1,
        le=8,
        description=(
            "With packing on SDPA / eager / flex_attention: compute a micro-batch's rows in up to this many forward "
            "passes, each at the width of its own widest row, where that saves computed tokens (one backward over "
            "their summed loss: the same loss and gradients). 1 = one width for all rows (the narrower rows' tails "
            "are padding). FlashAttention takes one padding-free row and ignores it."
        ),
    )

    @model_validator(mode="before")
    @classmethod
    def _legacy_prompt_loss(cls, data: Any) -> Any:
        """`prompt_loss: true | false`, the key before `prompt_loss_weight` (in the config.yaml of bundles trained by
        458350d..7662a02), reads as weight 1.0 | 0.0, so those bundles still evaluate, register and serve. (Their
        training took one mean over prompt and target tokens; the weight is read only by training.)"""
        if isinstance(data, dict) and "prompt_loss" in data:
            data = dict(data)
            legacy = data.pop("prompt_loss")
            if not isinstance(legacy, bool):
                raise ValueError(f"prompt_loss (now prompt_loss_weight): expected true or false, got {legacy!r}")
            data.setdefault("prompt_loss_weight", 1.0 if legacy else 0.0)
        return data

    @field_validator("epochs")
    @classmethod
    def _epochs_when_no_max_steps(cls, value: float, info: ValidationInfo) -> float:
        if info.data.get("max_steps") == 0 and value <= 0:
            raise ValueError(f"must be > 0 when train.max_steps is 0, got {value}")
        return value

    @field_validator("global_batch_size")
    @classmethod
    def _whole_micro_batches(cls, value: int, info: ValidationInfo) -> int:
        micro = info.data.get("micro_batch_size")
        if micro and value % micro:  # the worker count is known at launch: training.curriculum.grad_accum_for
            raise ValueError(f"{value} is not a multiple of train.micro_batch_size {micro}")
        return value


class CurriculumConfig(Section):
    stage_split: float = Field(
        0.35,
        ge=0,
        le=1,
        description="Fraction of optimizer steps in Stage A (image only); the rest is Stage B (image + EHR).",
    )
    replay_fraction: float = Field(
        0.0, ge=0, lt=1, description="Fraction of Stage B samples drawn from Stage A rows (replay)."
    )
    ehr_dropout: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Fraction of Stage B samples trained with the Patient "
        "Data block emptied (makes the EHR-off A/B fair).",
    )


class OutputConfig(Section):
    dir: str = "runs/tiny"


class MlflowConfig(Section):
    tracking_uri: str = Field(
        "",
        description="Empty = $MLFLOW_TRACKING_URI, else sqlite:///<output.dir>/mlflow.db. "
        "A sqlite store keeps its artifacts in mlartifacts/ next to the db.",
    )
    experiment: str = "radiology-report"
    run_name: str = ""
    log_checkpoints: bool = Field(
        False, description="Log checkpoint directories as artifacts (otherwise their paths are logged as tags)."
    )
    register_at_end: bool = Field(
        False, description="Register the final adapter bundle in the Model Registry at the end of training."
    )
    registered_model_name: str = "cxr-report-generator"
    alias: str = "candidate"


class DeepSpeedConfig(Section):
    zero_stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: bool = False
    stage3_param_persistence_threshold: int = Field(
        100000,
        description="ZeRO-3: parameters with fewer elements stay "
        "whole on every rank (fewer small all-gathers); 0 partitions all.",
    )


class RayConfig(Section):
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(
        0.5,
        gt=0,
        description="Fractional CPUs leave room for Ray Data's read tasks (2 workers x 1 CPU on 2 cores deadlocks).",
    )
    storage_path: str = Field("", description="Where Ray Train keeps checkpoints and state; empty = <output.dir>/ray.")
    name: str = Field("ray-run", description="Run name; the same storage_path + name resumes the run.")
    max_failures: int = Field(1, ge=0)
    num_to_keep: int = Field(2, ge=1)


class Config(Section):
    """A run config of the launcher: `launcher local|ray --config FILE` (datasets_io/config.py)."""

    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    lora: LoraConfig = LoraConfig()
    train: TrainConfig = TrainConfig()
    curriculum: CurriculumConfig = CurriculumConfig()
    output: OutputConfig = OutputConfig()
    mlflow: MlflowConfig = MlflowConfig()
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    ray: RayConfig = RayConfig()

    @model_validator(mode="after")
    def _packing_keeps_samples_apart(self) -> Config:
        if self.train.packing and self.model.attn_implementation not in PACKING_BACKENDS:
            raise ValueError(
                f"train.packing: needs model.attn_implementation in {', '.join(PACKING_BACKENDS)} "
                f"(got {self.model.attn_implementation!r}), which keep packed samples apart; or set "
                "train.packing: false (padded micro-batches)"
            )
        return self


# --------------------------------------------------------------------------------------------- loading
BOUNDS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}


def describe(error: dict[str, Any]) -> str:
    """One pydantic error as `dotted.key: what is wrong` (a cross-section check names its keys itself)."""
    loc, kind, ctx = error["loc"], error["type"], error.get("ctx", {})
    if kind == "extra_forbidden":
        section: Any = Config
        for part in loc[:-1]:
            section = section.model_fields[part].annotation
        what = f"unknown key (known: {', '.join(sorted(section.model_fields))})"
    elif kind in BOUNDS:
        what = f"must be {BOUNDS[kind]} {next(iter(ctx.values())):g}, got {error['input']!r}"
    elif kind == "value_error":
        what = str(ctx["error"])
    else:  # a wrong type or value: "Input should be a valid integer" -> "expected a valid integer, got 'x'"
        what = f"{error['msg'].replace('Input should be', 'expected')}, got {error['input']!r}"
    return f"{'.'.join(map(str, loc))}: {what}" if loc else what


def from_dict(data: Any, source: str = "config") -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError([describe(err) for err in e.errors()], source) from None


def config_hash(cfg: Config) -> str:
    return hashlib.sha256(json.dumps(cfg.model_dump(), sort_keys=True).encode()).hexdigest()[:16]


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader reading floats as YAML 1.2 does: `1e-3` and `3E4` are numbers (YAML 1.1, which PyYAML
    implements, wants a dot and a signed exponent, `1.0e-3`, and reads `lr: 1e-3` as the string '1e-3')."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


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
            node[parts[-1]] = parse_yaml(raw) if raw != "" else ""
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
            data = parse_yaml(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError([f"invalid YAML: {e}"], source) from None
        if not isinstance(data, dict):
            raise ConfigError([f"expected a mapping of sections, got {type(data).__name__}"], source)
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
    Path(path).write_text(yaml.safe_dump(cfg.model_dump(), sort_keys=False))
