"""The models evaluated (the checkpoint or registered model, its stage_A_end sibling, a trained baseline) and what
they generate for each arm: greedy, batched, one max_new_tokens for every arm and model (training/generate.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from datasets_io.errors import LauncherError
from datasets_io.images import preprocess_image
from datasets_io.jsonl import join, read_bytes
from datasets_io.records import ParsedTarget
from datasets_io.tokens import encode_prompt
from training.evaluation.options import EvalOptions
from training.evaluation.studies import ARM_EXPECTS_ICD, Study, arm_indices
from training.generate import DEFAULT_MAX_NEW_TOKENS, generate_reports, max_new_tokens_for, parse_report

STAGE_A_END = "stage_A_end"
TRAINED_BASELINE = "trained_baseline"  # --baseline-checkpoint: a separately trained model (e.g. image-only)


# --------------------------------------------------------------------------------------------- the models
@dataclass
class LoadedModel:
    name: str  # "model" (the evaluated one), "stage_A_end" or "trained_baseline"
    source: str  # checkpoint dir or models:/ URI
    bundle: Any
    max_seq_len: int | None
    config: Any = None  # datasets_io.config.Config of the checkpoint, when known
    training_run_id: str | None = None
    tracking_uri: str | None = None  # the store a registered model came from (the evaluation run goes there too)


def load_models(opts: EvalOptions, device: str) -> list[LoadedModel]:
    """The evaluated model, its stage_A_end sibling when there is one, and the trained baseline when given."""
    models = [load_main_model(opts, device)]
    sibling = stage_a_end_sibling(opts)
    if sibling is not None:
        models.append(load_checkpoint_model(STAGE_A_END, str(sibling), device))
    if opts.baseline_checkpoint:
        if not Path(opts.baseline_checkpoint).is_dir():
            raise LauncherError(f"--baseline-checkpoint {opts.baseline_checkpoint}: directory not found")
        models.append(load_checkpoint_model(TRAINED_BASELINE, opts.baseline_checkpoint, device))
    return models


def load_main_model(opts: EvalOptions, device: str) -> LoadedModel:
    if bool(opts.checkpoint) == bool(opts.model_uri):
        raise LauncherError("give exactly one of --checkpoint DIR or --model models:/NAME@ALIAS")
    if opts.checkpoint:
        return load_checkpoint_model("model", opts.checkpoint, device)
    from datasets_io.config import load_config
    from training.registry import load_registered_bundle
    from training.tracking import resolve_store

    uri = resolve_store(opts.tracking_uri)
    bundle, info = load_registered_bundle(opts.model_uri, uri)
    bundle.model.to(device)
    cfg_file = Path(info["adapter_dir"]) / "config.yaml"  # the training config travels in the adapter bundle
    cfg = load_config(cfg_file) if cfg_file.is_file() else None
    return LoadedModel("model", opts.model_uri, bundle, info.get("max_seq_len"), cfg, info.get("run_id"), uri)


def load_checkpoint_model(name: str, ckpt: str, device: str) -> LoadedModel:
    from datasets_io.config import load_config
    from training.checkpoint import read_state
    from training.model import load_trained

    path = Path(ckpt)
    if not path.is_dir():
        raise LauncherError(f"--checkpoint {ckpt}: directory not found")
    cfg = load_config(path / "config.yaml") if (path / "config.yaml").is_file() else None
    state = read_state(path) if (path / "trainer_state.json").is_file() else {}
    bundle = load_trained(str(path))
    bundle.model.to(device)
    return LoadedModel(name, str(path), bundle, cfg.data.max_seq_len if cfg else None, cfg, state.get("mlflow_run_id"))


def stage_a_end_sibling(opts: EvalOptions) -> Path | None:
    if not (opts.checkpoint and opts.compare_stage_a_end):
        return None
    ckpt = Path(opts.checkpoint).resolve()
    sibling = ckpt.parent / STAGE_A_END
    if ckpt.name == STAGE_A_END or not (sibling / "adapter_config.json").is_file():
        return None
    return sibling


def train_file(model: LoadedModel) -> str | None:
    """The model's training file (from its run config), where the majority baseline is fit."""
    if model.config is None:
        return None
    from datasets_io.config import data_path

    return data_path(model.config, "train_file")


# --------------------------------------------------------------------------------------------- generation
def shared_max_new_tokens(
    models: Sequence[LoadedModel], studies: Sequence[Study], arms: Sequence[str], opts: EvalOptions
) -> tuple[int, str]:
    """One generation budget for every arm and model, and how it was chosen.

    A budget per arm (its max_seq_len minus its own longest prompt) would give the EHR-off and image-only arms more
    room than the EHR-on arm, whose ICD block comes last: long outputs would be cut in one arm only. So:
    --max-new-tokens, else the smallest room any model has after the longest prompt of any arm (what training allowed
    for the longest)."""
    if opts.max_new_tokens:
        return opts.max_new_tokens, "--max-new-tokens"
    prompts = {s.prompt(arm) for arm in arms for s in studies if s.covered_by(arm)}
    budgets = []
    for m in models:
        if m.max_seq_len:
            b = m.bundle
            longest = max(len(encode_prompt(b.tokenizer, p, b.image_token_id, b.num_image_tokens)) for p in prompts)
            budgets.append((max_new_tokens_for(m.max_seq_len, longest), m.name, m.max_seq_len, longest))
    if not budgets:
        return DEFAULT_MAX_NEW_TOKENS, "default (no data.max_seq_len known)"
    n, name, max_seq_len, longest = min(budgets)
    return n, f"{name}'s data.max_seq_len {max_seq_len} minus the longest prompt of any arm ({longest} tokens)"


@dataclass
class ArmOutput:
    """One arm's generated texts, for the studies at `indices` of the evaluation's study list (default: all)."""

    arm: str
    texts: list[str]
    parsed: list[ParsedTarget] = field(default_factory=list)
    indices: list[int] | None = None

    def __post_init__(self) -> None:
        if not self.parsed:
            self.parsed = [parse_report(t, ARM_EXPECTS_ICD[self.arm]) for t in self.texts]
        if self.indices is None:
            self.indices = list(range(len(self.texts)))
        if len(self.indices) != len(self.texts):
            raise ValueError(f"arm {self.arm}: {len(self.texts)} texts for {len(self.indices)} studies")

    @property
    def impressions(self) -> list[str]:
        return [p.impression or "" for p in self.parsed]

    @property
    def chexpert(self) -> list[dict[str, str] | None]:
        """CheXpert predictions; None where the block is missing or malformed (scored as invalid)."""
        return [None if _chexpert_problem(p) else p.chexpert for p in self.parsed]

    @property
    def icd(self) -> list[dict[str, bool] | None]:
        return [None if _icd_problem(p) else p.icd for p in self.parsed]


def _chexpert_problem(p: ParsedTarget) -> bool:
    return p.chexpert is None or any("CheXpert" in x or x == "empty text" for x in p.problems)


def _icd_problem(p: ParsedTarget) -> bool:
    return p.icd is None or any("ICD" in x or x == "empty text" for x in p.problems)


def decode_images(studies: Sequence[Study], model: LoadedModel, data_root: str) -> list[np.ndarray]:
    """Every study's image, decoded once and shared by every arm and model: the arms differ in the prompt only."""
    spec = model.bundle.image_spec
    return [preprocess_image(read_bytes(join(data_root, s.image)), spec) for s in studies]


def generate_arms(
    model: LoadedModel,
    studies: Sequence[Study],
    arms: Sequence[str],
    images: list[np.ndarray],
    max_new_tokens: int,
    opts: EvalOptions,
) -> dict[str, ArmOutput]:
    outputs = {}
    for arm in arms:
        idx = arm_indices(arm, studies)
        batch = [(studies[i].prompt(arm), images[i]) for i in idx]
        texts = generate_reports(
            model.bundle,
            batch,
            batch_size=opts.batch_size,
            max_new_tokens=max_new_tokens,
            progress=opts.progress,
            desc=f"{model.name}/{arm}",
        )
        outputs[arm] = ArmOutput(arm, texts, indices=idx)
    return outputs
