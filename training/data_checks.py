"""The run's data checks before the first step, one meaning for every runtime: patient leakage and the token budget.

    overlap = check_leakage(cfg, train_rows, val_rows)                         # after reading the files
    train_rows, report = fit_token_budget(cfg, train_rows, bundle, "train_file")  # once the tokenizer exists
    log_data_checks(tracker, {"train": report}, overlap)                      # MLflow: counts at step 0, a tag

Only counts go to MLflow, never patient data.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from datasets_io.leakage import SubjectOverlap, check_subject_overlap, subject_overlap
from datasets_io.records import IMAGE_TOKEN, Record
from datasets_io.token_budget import BudgetReport, apply_bad_records_policy, budget_report
from datasets_io.config import Config, data_path


def check_leakage(cfg: Config, train: list[Record], val: list[Record]) -> SubjectOverlap:
    """Subjects shared by the training and validation files: LauncherError unless data.allow_subject_overlap."""
    return check_subject_overlap(
        subject_overlap(train, val),
        data_path(cfg, "train_file"),
        data_path(cfg, "val_file"),
        allow=cfg.data.allow_subject_overlap,
    )


def fit_token_budget(
    cfg: Config, records: list[Record], bundle: Any, file_key: str = "train_file"
) -> tuple[list[Record], BudgetReport]:
    """Measure every record against data.max_seq_len as training will tokenize it; over-budget records stop the run
    (data.bad_records=error) or are dropped and counted (skip). Returns (records kept, report)."""
    report = budget_report(
        records,
        bundle.tokenizer,
        bundle.image_token_id,
        bundle.num_image_tokens,
        cfg.data.max_seq_len,
        cfg.data.overlong,
    )
    source = data_path(cfg, file_key)
    kept = apply_bad_records_policy(records, report, cfg.data.bad_records, source)
    print(
        f"[data] {source}: token budget {cfg.data.max_seq_len}: {report.rows} rows, {report.shortened} with "
        f"Patient Data shortened, {len(report.over_budget)} over budget"
        + (" (skipped, data.bad_records=skip)" if report.over_budget else "")
    )
    return kept, report


def data_check_metrics(budgets: dict[str, BudgetReport], overlap: SubjectOverlap | None) -> dict[str, float]:
    """`data/rows_shortened`, `data/rows_over_budget`, ... for the training file, `data/val_...` for validation."""
    out: dict[str, float] = {}
    for split, report in budgets.items():
        out.update(report.metrics("data/" if split == "train" else f"data/{split}_"))
    if overlap is not None:
        out["data/subject_overlap"] = overlap.count
    return out


def log_data_checks(tracker: Any, budgets: dict[str, BudgetReport], overlap: SubjectOverlap | None) -> None:
    """The checks' counts as MLflow metrics at step 0, and the overlap tag when patients are shared (allowed)."""
    tracker.log_metrics(data_check_metrics(budgets, overlap), step=0)
    tracker.set_tags(data_check_tags(overlap))


def data_check_tags(overlap: SubjectOverlap | None) -> dict[str, str]:
    """The MLflow tag that says a run accepted patient overlap (data.allow_subject_overlap=true)."""
    if overlap is None or not overlap.count:
        return {}
    return {"data.subject_overlap_allowed": f"true: {overlap.count} subject(s) in both train and val"}


@dataclass(frozen=True)
class TokenSpec:
    """What the token budget needs of a model: its tokenizer and how many tokens its `<image>` becomes."""

    tokenizer: Any
    image_token_id: int
    num_image_tokens: int
    source: str
    """Where the tokenizer came from (a directory, or "trained in memory on ..."), for the report."""


def token_spec(cfg: Config, corpus: Callable[[], list[str]]) -> TokenSpec:
    """The model's tokenizer and image-token count without loading weights: `model.name_or_path`, else the run's
    tiny base when built, else the tiny tokenizer trained in memory on `corpus()` exactly as the base would be
    (training.model.build_tiny_base), with (image_size / patch_size)^2 image tokens. Writes nothing."""
    from transformers import AutoConfig, AutoTokenizer

    from training.model import BASE_MODEL_DIRNAME, num_image_tokens

    path = cfg.model.name_or_path or str(Path(cfg.output.dir) / BASE_MODEL_DIRNAME)
    if cfg.model.name_or_path or Path(path).is_dir():
        config = AutoConfig.from_pretrained(path)
        return TokenSpec(AutoTokenizer.from_pretrained(path), config.image_token_index, num_image_tokens(config), path)
    from training.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(corpus(), cfg.model.tiny.vocab_size)
    tiny = cfg.model.tiny
    return TokenSpec(
        tokenizer,
        tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        (tiny.image_size // tiny.patch_size) ** 2,
        f"tiny tokenizer trained in memory on {data_path(cfg, 'train_file')}",
    )


def check_eval_leakage(train_cfg: Config | None, eval_file: str, data_root: str) -> SubjectOverlap | None:
    """`launcher evaluate`: the evaluation file against the training file named by the checkpoint's config.yaml.
    LauncherError on shared subjects unless that config allowed overlap; None (and a printed note) when the
    training file cannot be read here, so nothing was checked."""
    from datasets_io.jsonl import path_exists, read_records

    train_file = data_path(train_cfg, "train_file") if train_cfg is not None else None
    if train_file is None or not path_exists(train_file):
        print(
            f"[leakage] the checkpoint's training file ({train_file or 'no config.yaml'}) is not readable here: "
            "subject overlap with the evaluation data NOT checked"
        )
        return None
    train, _ = read_records(train_file, train_cfg.data.root, policy="skip", check_images="none")
    other, _ = read_records(eval_file, data_root, policy="skip", check_images="none")
    return check_subject_overlap(
        subject_overlap(train, other), train_file, eval_file, allow=train_cfg.data.allow_subject_overlap
    )
