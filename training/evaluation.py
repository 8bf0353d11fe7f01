"""Evaluation of a trained report generator, with the fair EHR A/B test and the trained-baseline protocol.

    launcher evaluate --checkpoint runs/tiny/checkpoints/final --data data/synth/curriculum_val.jsonl \\
        --data-root data/synth --ehr both --out runs/tiny/eval
    launcher evaluate --checkpoint runs/curriculum/checkpoints/final \\
        --baseline-checkpoint runs/image_only/checkpoints/final --data ... --out runs/curriculum/eval-vs-image-only

What is generated (greedy, batched, left padded; training/generate.py), for every study of the file (with --limit N,
a seeded random sample of N studies):

    arm       prompt                                          covers                       scored
    ehr_on    the Stage B prompt (Patient Data block filled)  studies with a Stage B row   Impression, CheXpert, ICD
    ehr_off   the same prompt with the block emptied          studies with a Stage B row   Impression, CheXpert, ICD
              (records.with_empty_ehr: same words, same image)
    stage_a   the Stage A prompt (image only)                 every study                  Impression, CheXpert

Every arm and model gets the same max_new_tokens (shared_max_new_tokens), so no arm's outputs are cut shorter than
another's. Arms score against the study's Stage B target (its Stage A target when it has none), and comparisons are
paired per study on the studies both sides cover: ehr_on - ehr_off (and each Stage B arm against stage_a) with a
paired bootstrap interval, an approximate-randomization p-value and its Holm adjustment over the table
(training/metrics/stats.py). A comparison whose metric is undefined on a side (an F1 with no positive anywhere) is
written as undefined. When the checkpoint has a sibling `stage_A_end/`, it is evaluated on the same arms beside the
model; with --baseline-checkpoint a separately trained model (e.g. image-only, `curriculum.stage_split=1.0`, same
steps) is too, with the same paired comparisons. A CheXpert majority-class baseline (each label's most frequent value
in the training file, or in the evaluation file when that is not there) is scored beside the model.

Outputs in --out: metrics.json (written once the arms are scored, again when the comparisons are done), report.md,
plots/*.png (logged to an MLflow run of the experiment: parameters are paths and settings only, never patient data)
and, only with --save-predictions, predictions.jsonl (which holds patient data: EHR-conditioned text).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from datasets_io.records import (
    CHEXPERT_5,
    CHEXPERT_LABELS,
    ICD_FLAGS,
    ParsedTarget,
    parse_target,
    prompt_a,
    with_empty_ehr,
)
from datasets_io.images import preprocess_image
from datasets_io.jsonl import join, path_exists, read_bytes, read_records
from datasets_io.tokens import encode_prompt
from datasets_io.errors import LauncherError
from training.generate import DEFAULT_MAX_NEW_TOKENS, generate_reports, max_new_tokens_for, parse_report
from training.metrics import scores
from training.metrics.clinical import ClinicalScorers
from training.metrics.stats import SummedStats, bootstrap_ci, compare_arms, holm_adjust

ARM_DESCRIPTIONS = {
    "ehr_on": "EHR on: the Stage B prompt",
    "ehr_off": "EHR off: the Stage B prompt with the Patient Data block emptied",
    "stage_a": "the Stage A prompt (image only)",
}
ARM_EXPECTS_ICD = {"ehr_on": True, "ehr_off": True, "stage_a": False}
EHR_MODES = {"on": ("ehr_on", "stage_a"), "off": ("ehr_off", "stage_a"), "both": ("ehr_on", "ehr_off", "stage_a")}
STAGE_A_END = "stage_A_end"
TRAINED_BASELINE = "trained_baseline"  # --baseline-checkpoint: a separately trained model (e.g. image-only)

# The paired comparisons (a - b) the report shows, when both arms were generated.
ARM_COMPARISONS = (("ehr_on", "ehr_off"), ("ehr_on", "stage_a"), ("ehr_off", "stage_a"))


# --------------------------------------------------------------------------------------------- the studies
@dataclass(frozen=True)
class Study:
    """One study of the evaluation set: its image, its prompts and the target every arm is scored against."""

    study_id: str
    image: str  # relative to the data root
    prompt_b: str | None  # None when the file has no Stage B row for the study
    prompt_a: str  # the Stage A row's prompt (the fixed image-only prompt when the file has no Stage A row)
    target: str  # the Stage B target when there is one (Impression + CheXpert + ICD), else the Stage A target
    where: str = ""

    @property
    def has_ehr(self) -> bool:
        return self.prompt_b is not None

    def covered_by(self, arm: str) -> bool:
        """The image-only arm covers every study; the EHR arms the studies with a Stage B row."""
        return arm == "stage_a" or self.has_ehr

    def prompt(self, arm: str) -> str:
        if arm == "stage_a":
            return self.prompt_a
        if self.prompt_b is None:
            raise ValueError(f"{self.where}: study {self.study_id} has no Stage B row for arm {arm}")
        return self.prompt_b if arm == "ehr_on" else with_empty_ehr(self.prompt_b)


def load_studies(data_file: str, data_root: str, limit: int | None = None, seed: int = 0) -> list[Study]:
    """Every study of the file (a Stage A row, a Stage B row or both), in file order; with `limit`, a seeded random
    sample of `limit` studies (kept in file order), so a short run is not biased towards the file's first subjects.
    Which arm scores which study is `Study.covered_by`. Bad records are errors (file:line)."""
    if "://" not in data_file and not Path(data_file).is_file():
        raise LauncherError(f"--data {data_file}: file not found")
    if "://" not in data_root and not Path(data_root).is_dir():
        raise LauncherError(f"--data-root {data_root}: directory not found")
    records, _ = read_records(data_file, data_root, policy="error", check_images="none")
    if not records:
        raise LauncherError(f"--data {data_file}: no records")
    a_rows = {r.study_id: r for r in records if r.stage == "A"}
    b_rows = {r.study_id: r for r in records if r.stage == "B"}
    order = sample_studies(list(dict.fromkeys(r.study_id for r in records)), limit, seed)
    studies = []
    for sid in order:
        b, a = b_rows.get(sid), a_rows.get(sid)
        row = b or a
        studies.append(Study(sid, row.image, b.prompt if b else None, a.prompt if a else prompt_a(), row.target,
                             row.where))
    missing = [s for s in studies if not path_exists(join(data_root, s.image))]
    if missing:
        raise LauncherError(f"{len(missing)} image(s) not found under --data-root {data_root}, first: "
                            f"{missing[0].where}: {missing[0].image}")
    return studies


def sample_studies(order: list[str], limit: int | None, seed: int) -> list[str]:
    """All of `order`, or a uniform random sample of `limit` of them without replacement (numpy default_rng(seed)),
    in their original order."""
    if limit is None:
        return order
    if limit < 1:
        raise LauncherError(f"--limit must be >= 1, got {limit}")
    if limit >= len(order):
        return order
    keep = np.sort(np.random.default_rng(seed).choice(len(order), size=limit, replace=False))
    return [order[i] for i in keep]


def arms_for(ehr: str, studies: Sequence[Study]) -> tuple[str, ...]:
    if ehr not in EHR_MODES:
        raise LauncherError(f"--ehr {ehr!r}: choose one of {', '.join(EHR_MODES)}")
    if not any(s.has_ehr for s in studies):
        return ("stage_a",)  # no Stage B rows: the image-only arm is all there is
    return EHR_MODES[ehr]


def arm_indices(arm: str, studies: Sequence[Study]) -> list[int]:
    """Positions (in `studies`) of the studies the arm scores."""
    return [i for i, s in enumerate(studies) if s.covered_by(arm)]


def arm_coverage(arms: Sequence[str], studies: Sequence[Study]) -> dict[str, dict[str, Any]]:
    """Which studies each arm scores, for metrics.json and the report: count, rule and a hash of the ids."""
    out = {}
    for arm in arms:
        covered = [studies[i] for i in arm_indices(arm, studies)]
        rule = "every study" if arm == "stage_a" else "the studies with a Stage B row"
        out[arm] = {"n": len(covered), "of": len(studies), "rule": rule, "studies_sha256": studies_digest(covered)}
    return out


def studies_digest(studies: Sequence[Study]) -> str:
    """A hash of the study ids in order: shows the arms are paired without writing the ids anywhere."""
    return hashlib.sha256("\n".join(s.study_id for s in studies).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------- scoring an arm
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


@dataclass
class References:
    impressions: list[str]
    chexpert: list[dict[str, str]]
    icd: list[dict[str, bool]] | None  # None when the targets have no ICD block (Stage A only data)

    @classmethod
    def of(cls, studies: Sequence[Study]) -> "References":
        parsed = [parse_target(s.target, expect_icd=s.has_ehr) for s in studies]
        for s, p in zip(studies, parsed):
            if not p.valid:  # records were validated on read; this is a bug guard, not a user error
                raise LauncherError(f"{s.where}: target does not parse: {'; '.join(p.problems)}")
        icd = [p.icd or {} for p in parsed] if all(s.has_ehr for s in studies) else None
        return cls([p.impression or "" for p in parsed], [p.chexpert or {} for p in parsed], icd)


@dataclass
class ArmStats:
    """Metric name -> stats.SummedStats (rows: the studies at `indices` of the study list, in that order)."""

    indices: list[int]
    stats: dict[str, Any]

    def restricted(self, keep: Sequence[int]) -> dict[str, Any]:
        """The same metrics on the studies `keep` (a subset of `indices`), rows in the order of `keep`."""
        position = {study: row for row, study in enumerate(self.indices)}
        rows = np.array([position[k] for k in keep], dtype=np.int64)
        return {name: SummedStats(s.per_sample[rows], s.finalize) for name, s in self.stats.items()}


def arm_metric_stats(out: ArmOutput, refs: References, clinical: ClinicalScorers | None = None) -> dict[str, Any]:
    """Metric name -> stats.SummedStats (per-study sufficient statistics): the metrics that get intervals and tests.
    `text/bleu_n_13a` and `text/rouge_l` are the comparable figures; `text/bleu_n` the project's own tokenization."""
    preds_imp, preds_chx = out.impressions, out.chexpert
    m: dict[str, Any] = {
        "text/bleu_1": scores.bleu_metric(preds_imp, refs.impressions, order=1),
        "text/bleu_4": scores.bleu_metric(preds_imp, refs.impressions, order=4),
        # BLEU-2/3 (13a) are point values in the arm's "text" section only: each sacrebleu resample is a Python call
        **{f"text/bleu_{n}_13a": scores.sacrebleu_metric(preds_imp, refs.impressions, order=n) for n in (1, 4)},
        "text/rouge_l": scores.rouge_l_metric(preds_imp, refs.impressions),
    }
    for conv in scores.CONVENTIONS:
        for labels, suffix in ((CHEXPERT_LABELS, ""), (CHEXPERT_5, "_5")):
            for avg in ("micro", "macro"):
                m[f"chexpert/{conv}/{avg}_f1{suffix}"] = scores.chexpert_f1_metric(
                    preds_chx, refs.chexpert, convention=conv, labels=labels, average=avg)
    m["validity/report"] = scores.mean_metric([p.valid for p in out.parsed])
    m["validity/chexpert"] = scores.mean_metric([c is not None for c in preds_chx])
    if ARM_EXPECTS_ICD[out.arm] and refs.icd is not None:
        preds_icd = out.icd
        flags = scores.icd_flag_set(refs.icd)
        for avg in ("micro", "macro"):
            m[f"icd/{avg}_f1"] = scores.icd_f1_metric(preds_icd, refs.icd, flags=flags, average=avg)
        m["validity/icd"] = scores.mean_metric([p is not None for p in preds_icd])
    if clinical is not None and clinical.active:
        m.update(clinical.stats(preds_imp, refs.impressions))
    return m


def _chexpert_problem(p: ParsedTarget) -> bool:
    return p.chexpert is None or any("CheXpert" in x or x == "empty text" for x in p.problems)


def _icd_problem(p: ParsedTarget) -> bool:
    return p.icd is None or any("ICD" in x or x == "empty text" for x in p.problems)


def score_arm(out: ArmOutput, refs: References, *, n_resamples: int, seed: int,
              clinical: ClinicalScorers | None = None) -> tuple[dict, dict[str, Any]]:
    """(the arm's metrics section for metrics.json, its SummedStats for paired tests). `refs` are the references of
    the arm's studies, in the arm's order."""
    stats = arm_metric_stats(out, refs, clinical)
    preds_imp, preds_chx = out.impressions, out.chexpert
    section: dict[str, Any] = {
        "n": len(out.texts),
        "prompt": ARM_DESCRIPTIONS[out.arm],
        "validity": {k.split("/", 1)[1]: v.value for k, v in stats.items() if k.startswith("validity/")},
        "text": {**scores.bleu(preds_imp, refs.impressions), **scores.sacrebleu_bleu(preds_imp, refs.impressions),
                 "rouge_l": scores.rouge_l(preds_imp, refs.impressions)},
        "chexpert": scores.chexpert_scores(preds_chx, refs.chexpert),
        "problems": _problem_counts(out.parsed),
    }
    clinical_values = {k.split("/", 1)[1]: v.value for k, v in stats.items() if k.startswith("clinical/")}
    if clinical_values:
        section["clinical"] = clinical_values
    if "validity/icd" in stats:
        section["icd"] = scores.icd_scores(out.icd, refs.icd, flags=scores.icd_flag_set(refs.icd))
    section["ci"] = {name: _interval_dict(bootstrap_ci(s, n_resamples=n_resamples, seed=seed))
                     for name, s in stats.items()}
    return section, stats


def _problem_counts(parsed: Sequence[ParsedTarget]) -> dict[str, int]:
    """How often each kind of format problem occurred (the JSON error detail dropped so kinds group)."""
    counts: dict[str, int] = {}
    for p in parsed:
        for problem in p.problems:
            kind = problem.split(" (")[0].split(": values")[0]
            counts[kind] = counts.get(kind, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def _interval_dict(iv: Any) -> dict[str, float]:
    return {"estimate": iv.estimate, "low": iv.low, "high": iv.high}


def compare_stats(a: ArmStats, b: ArmStats, *, n_resamples: int, seed: int,
                  only: Callable[[str], bool] = lambda name: True) -> dict[str, dict[str, Any]]:
    """Paired a - b per metric both sides have, on the studies both cover: each side's value, the difference, its
    interval, the raw p-value and the Holm-adjusted one (the family: this table's metrics).

    A metric undefined on either side (an F1 with no positive anywhere) has no difference: it is written with
    `undefined` saying why and NaN figures (null in metrics.json), and left out of the Holm family."""
    common = sorted(set(a.indices) & set(b.indices))
    if not common:
        return {}
    sa, sb = a.restricted(common), b.restricted(common)
    out: dict[str, dict[str, Any]] = {}
    for name in sa:
        if name not in sb or not only(name):
            continue
        va, vb = sa[name].value, sb[name].value
        if not (math.isfinite(va) and math.isfinite(vb)):
            side = " and ".join(x for x, v in (("a", va), ("b", vb)) if not math.isfinite(v))
            out[name] = {"a": va, "b": vb, "diff": math.nan, "diff_low": math.nan, "diff_high": math.nan,
                         "p_value": math.nan, "n": len(common),
                         "undefined": f"the metric is undefined on side {side} (e.g. no positive in references "
                                      "nor predictions)"}
            continue
        c = compare_arms(sa[name], sb[name], n_resamples=n_resamples, seed=seed)
        out[name] = {"a": c.a.estimate, "b": c.b.estimate, "diff": c.diff.estimate, "diff_low": c.diff.low,
                     "diff_high": c.diff.high, "p_value": c.test.p_value, "n": len(common)}
    for entry, p_holm in zip(out.values(), holm_adjust([e["p_value"] for e in out.values()]), strict=True):
        entry["p_holm"] = float(p_holm)
    return out


def _text_or_chexpert(name: str) -> bool:
    return name.startswith(("text/", "chexpert/", "clinical/", "validity/report", "validity/chexpert"))


# --------------------------------------------------------------------------------------------- baseline
def majority_baseline(refs: References, train_file: str | None, data_root: str | None, *, n_resamples: int,
                      seed: int) -> tuple[dict, ArmStats]:
    """The CheXpert majority-class prediction, fit on the training file when readable, else on the evaluation refs.
    Scored on every study of `refs` (compared with each arm on the studies that arm covers)."""
    fit_on, fit_refs = "evaluation data", refs.chexpert
    if train_file and "://" not in train_file and Path(train_file).is_file():
        rows, _ = read_records(train_file, data_root or str(Path(train_file).parent), policy="skip",
                               check_images="none")
        train_refs = [p.chexpert for r in rows if (p := parse_target(r.target, expect_icd=False)).chexpert]
        if train_refs:
            fit_on, fit_refs = "training data", train_refs
    prediction = scores.chexpert_majority_baseline(fit_refs)
    preds = [prediction] * len(refs.chexpert)
    stats = {}
    for conv in scores.CONVENTIONS:
        for labels, suffix in ((CHEXPERT_LABELS, ""), (CHEXPERT_5, "_5")):
            for avg in ("micro", "macro"):
                stats[f"chexpert/{conv}/{avg}_f1{suffix}"] = scores.chexpert_f1_metric(
                    preds, refs.chexpert, convention=conv, labels=labels, average=avg)
    section = {
        "fit_on": fit_on,
        "prediction": prediction,
        "chexpert": scores.chexpert_scores(preds, refs.chexpert),
        "ci": {name: _interval_dict(bootstrap_ci(s, n_resamples=n_resamples, seed=seed)) for name, s in stats.items()},
    }
    return section, ArmStats(list(range(len(preds))), stats)


# --------------------------------------------------------------------------------------------- the run
@dataclass
class EvalOptions:
    data: str
    data_root: str
    out: str
    checkpoint: str | None = None
    model_uri: str | None = None
    baseline_checkpoint: str | None = None  # a separately trained model compared on the same studies and arms
    ehr: str = "both"
    limit: int | None = None
    batch_size: int = 16
    max_new_tokens: int | None = None  # None: the smallest data.max_seq_len minus the longest prompt of any arm
    save_predictions: bool = False
    seed: int = 0
    n_resamples: int = 1000
    device: str = "auto"
    compare_stage_a_end: bool = True
    chexbert: str | None = None  # local CheXbert directory (training/metrics/clinical.py lists the files)
    radgraph: str | None = None  # local RadGraph directory (holding radgraph/)
    bertscore_model: str | None = None  # local transformers model directory for BERTScore
    tracking_uri: str | None = None
    mlflow: bool = True
    progress: bool = True


@dataclass
class LoadedModel:
    name: str  # "model" (the evaluated one), "stage_A_end" or "trained_baseline"
    source: str  # checkpoint dir or models:/ URI
    bundle: Any
    max_seq_len: int | None
    config: Any = None  # datasets_io.config.Config of the checkpoint, when known
    training_run_id: str | None = None
    tracking_uri: str | None = None  # the store a registered model came from (the evaluation run goes there too)


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
    return LoadedModel(name, str(path), bundle, cfg.data.max_seq_len if cfg else None, cfg,
                       state.get("mlflow_run_id"))


def shared_max_new_tokens(models: Sequence[LoadedModel], studies: Sequence[Study], arms: Sequence[str],
                          opts: EvalOptions) -> tuple[int, str]:
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


def generate_arms(model: LoadedModel, studies: Sequence[Study], arms: Sequence[str], images: list[np.ndarray],
                  max_new_tokens: int, opts: EvalOptions) -> dict[str, ArmOutput]:
    outputs = {}
    for arm in arms:
        idx = arm_indices(arm, studies)
        batch = [(studies[i].prompt(arm), images[i]) for i in idx]
        texts = generate_reports(model.bundle, batch, batch_size=opts.batch_size, max_new_tokens=max_new_tokens,
                                 progress=opts.progress, desc=f"{model.name}/{arm}")
        outputs[arm] = ArmOutput(arm, texts, indices=idx)
    return outputs


def score_arms(outputs: dict[str, ArmOutput], studies: Sequence[Study], opts: EvalOptions,
               clinical: ClinicalScorers | None = None) -> tuple[dict, dict]:
    """Each arm scored on the studies it covers: ({"arms": {arm: section}}, {arm: ArmStats})."""
    section: dict[str, Any] = {"arms": {}}
    stats: dict[str, ArmStats] = {}
    for arm, out in outputs.items():
        refs = References.of([studies[i] for i in out.indices])
        section["arms"][arm], arm_stats = score_arm(out, refs, n_resamples=opts.n_resamples, seed=opts.seed,
                                                    clinical=clinical)
        stats[arm] = ArmStats(list(out.indices), arm_stats)
    return section, stats


def compare_model_arms(stats: dict[str, ArmStats], opts: EvalOptions) -> dict[str, dict]:
    """The paired arm comparisons of one model (ehr_on - ehr_off, and each EHR arm against stage_a on the studies
    both cover: text and CheXpert only, since the image-only arm answers no ICD)."""
    ab = {}
    for a, b in ARM_COMPARISONS:
        if a in stats and b in stats:
            only = (lambda n: True) if "stage_a" not in (a, b) else _text_or_chexpert
            ab[f"{a}-{b}"] = compare_stats(stats[a], stats[b], n_resamples=opts.n_resamples, seed=opts.seed,
                                           only=only)
    return ab


def score_model(outputs: dict[str, ArmOutput], studies: Sequence[Study], opts: EvalOptions,
                clinical: ClinicalScorers | None = None) -> tuple[dict, dict]:
    """score_arms, then compare_model_arms into section["ab"]."""
    section, stats = score_arms(outputs, studies, opts, clinical)
    section["ab"] = compare_model_arms(stats, opts)
    return section, stats


def run_evaluation(opts: EvalOptions) -> dict:
    """Generate, score, compare, write metrics.json / report.md / plots (and predictions when asked), log to MLflow.

    metrics.json is written once the arms are scored and again when the paired comparisons are done, so a failure
    in a comparison never loses the generation's results."""
    import torch

    from training.devices import resolve_device
    from training.data_checks import check_eval_leakage

    if opts.batch_size < 1:
        raise LauncherError(f"--batch-size must be >= 1, got {opts.batch_size}")
    if opts.max_new_tokens is not None and opts.max_new_tokens < 1:
        raise LauncherError(f"--max-new-tokens must be >= 1, got {opts.max_new_tokens}")
    t0 = time.perf_counter()
    torch.manual_seed(opts.seed)
    device = resolve_device(opts.device)
    studies = load_studies(opts.data, opts.data_root, opts.limit, opts.seed)
    arms = arms_for(opts.ehr, studies)

    models = load_models(opts, device)
    overlap = check_eval_leakage(models[0].config, opts.data, opts.data_root)  # patients seen in training: an error
    out_dir = Path(opts.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    # Images are decoded once and shared by every arm and model: the arms differ in the prompt only.
    spec = models[0].bundle.image_spec
    images = [preprocess_image(read_bytes(join(opts.data_root, s.image)), spec) for s in studies]
    max_new, max_new_source = shared_max_new_tokens(models, studies, arms, opts)
    try:
        clinical = ClinicalScorers.load(opts.chexbert, opts.radgraph, opts.bertscore_model, device)
    except (OSError, ValueError, RuntimeError) as e:
        raise LauncherError(str(e)) from None
    for line in clinical.skipped:
        print(f"[eval] {line}")

    t_gen = time.perf_counter()
    outputs = {m.name: generate_arms(m, studies, arms, images, max_new, opts) for m in models}
    gen_s = time.perf_counter() - t_gen

    result: dict[str, Any] = {
        "status": "arms scored; paired comparisons pending",
        "evaluation": {
            "checkpoint": opts.checkpoint, "model_uri": opts.model_uri,
            "baseline_checkpoint": opts.baseline_checkpoint, "data": opts.data,
            "data_root": opts.data_root, "ehr": opts.ehr, "limit": opts.limit,
            "sample": (f"a seeded random sample (seed {opts.seed}) of the file's studies" if opts.limit
                       else "every study of the file"),
            "batch_size": opts.batch_size, "max_new_tokens": max_new, "max_new_tokens_source": max_new_source,
            "seed": opts.seed, "n_resamples": opts.n_resamples,
            "device": device, "arms": list(arms), "coverage": arm_coverage(arms, studies),
            "models": {m.name: m.source for m in models},
            "n_studies": len(studies), "studies_sha256": studies_digest(studies),
            "generation_s": round(gen_s, 2),
            "clinical": {"chexbert": opts.chexbert, "radgraph": opts.radgraph,
                         "bertscore_model": opts.bertscore_model, "skipped": list(clinical.skipped)},
            "subject_overlap_with_training": overlap.count if overlap is not None else "not checked",
        },
        "models": {},
    }
    all_stats = {}
    for m in models:
        result["models"][m.name], all_stats[m.name] = score_arms(outputs[m.name], studies, opts, clinical)
        for sec in result["models"][m.name]["arms"].values():
            sec["max_new_tokens"] = max_new
    train_file = _train_file(models[0])
    result["baseline"], base_stats = majority_baseline(References.of(studies), train_file,
                                                       opts.data_root if train_file else None,
                                                       n_resamples=opts.n_resamples, seed=opts.seed)
    write_metrics(out_dir, result)  # before any paired test can fail

    for m in models:
        result["models"][m.name]["ab"] = compare_model_arms(all_stats[m.name], opts)
    result["comparisons"] = comparisons(all_stats, base_stats, opts)
    result["headline"] = headline(result)
    result["status"] = "complete"
    result["evaluation"]["wall_s"] = round(time.perf_counter() - t0, 2)

    write_metrics(out_dir, result)
    plots = write_plots(result, out_dir / "plots")
    (out_dir / "report.md").write_text(render_report(result, plots))
    if opts.save_predictions:
        write_predictions(out_dir / "predictions.jsonl", studies, outputs)
    if opts.mlflow:
        result["mlflow_run_id"] = log_to_mlflow(result, models[0], out_dir, plots, opts)
        write_metrics(out_dir, result)
    return result


def write_metrics(out_dir: Path, result: dict) -> None:
    """metrics.json: strict JSON (NaN, i.e. undefined, written as null)."""
    (out_dir / "metrics.json").write_text(json.dumps(_json_safe(result), indent=2))


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


def stage_a_end_sibling(opts: EvalOptions) -> Path | None:
    if not (opts.checkpoint and opts.compare_stage_a_end):
        return None
    ckpt = Path(opts.checkpoint).resolve()
    sibling = ckpt.parent / STAGE_A_END
    if ckpt.name == STAGE_A_END or not (sibling / "adapter_config.json").is_file():
        return None
    return sibling


def _train_file(model: LoadedModel) -> str | None:
    if model.config is None:
        return None
    from datasets_io.config import data_path

    return data_path(model.config, "train_file")


def comparisons(all_stats: dict[str, dict[str, ArmStats]], base_stats: ArmStats, opts: EvalOptions) -> dict:
    """The evaluated model against the majority baseline (CheXpert), and against stage_A_end and the trained baseline
    (same arm, same studies, same paired tests)."""
    out: dict[str, Any] = {}
    n, seed = opts.n_resamples, opts.seed
    for arm, stats in all_stats["model"].items():
        out[f"model-baseline/{arm}"] = compare_stats(stats, base_stats, n_resamples=n, seed=seed)
    for other in (STAGE_A_END, TRAINED_BASELINE):
        if other in all_stats:
            for arm, stats in all_stats["model"].items():
                out[f"model-{other}/{arm}"] = compare_stats(stats, all_stats[other][arm], n_resamples=n, seed=seed)
    return out


def headline(result: dict) -> dict[str, Any]:
    """The few numbers a reader wants first (all also elsewhere in metrics.json)."""
    arms = result["models"]["model"]["arms"]
    main_arm = "ehr_on" if "ehr_on" in arms else next(iter(arms))
    h: dict[str, Any] = {"arm": main_arm}
    chx, base = arms[main_arm]["chexpert"], result["baseline"]["chexpert"]
    for conv in ("u_pos", "u_neg"):
        for key in ("macro_f1", "macro_f1_5", "micro_f1"):
            h[f"chexpert_{conv}_{key}"] = chx[f"{conv}/{key}"]
            h[f"baseline_{conv}_{key}"] = base[f"{conv}/{key}"]
    for arm, sec in arms.items():
        h[f"validity_{arm}"] = sec["validity"]["report"]
        if "icd" in sec:
            h[f"icd_micro_f1_{arm}"] = sec["icd"]["micro_f1"]
    ab = result["models"]["model"]["ab"].get("ehr_on-ehr_off")
    if ab and "icd/micro_f1" in ab:
        h["icd_micro_f1_diff_on_off"] = ab["icd/micro_f1"]["diff"]
        h["icd_micro_f1_diff_ci"] = [ab["icd/micro_f1"]["diff_low"], ab["icd/micro_f1"]["diff_high"]]
        h["icd_micro_f1_p_value"] = ab["icd/micro_f1"]["p_value"]
    return h


def _json_safe(obj: Any) -> Any:
    """NaN / inf -> None (strict JSON); numpy scalars -> Python."""
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return None if not math.isfinite(float(obj)) else float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


def write_predictions(path: Path, studies: Sequence[Study], outputs: dict[str, dict[str, ArmOutput]]) -> None:
    """Per study, model and arm: the generated text and its parse. Holds patient data: written only on request."""
    with path.open("w") as f:
        for model, arms in outputs.items():
            for arm, out in arms.items():
                for s, text, p in zip(studies, out.texts, out.parsed):
                    f.write(json.dumps({"study_id": s.study_id, "model": model, "arm": arm, "generated": text,
                                        "target": s.target, "valid": p.valid, "problems": p.problems}) + "\n")


# --------------------------------------------------------------------------------------------- MLflow
def flat_metrics(result: dict) -> dict[str, float]:
    """Numbers worth logging: metric values, intervals and p-values (finite only; supports and counts left out)."""
    out: dict[str, float] = {}

    def put(key: str, value: Any) -> None:
        if isinstance(value, (int, float, np.floating)) and not isinstance(value, bool) and math.isfinite(value):
            out[key] = float(value)

    for model, sec in result["models"].items():
        for arm, a in sec["arms"].items():
            for group in ("validity", "text", "chexpert", "icd", "clinical"):
                for k, v in a.get(group, {}).items():
                    if "/support/" not in k and not k.startswith("support/") and k != "n":
                        put(f"{model}/{arm}/{group}/{k}", v)
            for k, iv in a["ci"].items():
                put(f"{model}/{arm}/ci/{k}/low", iv["low"])
                put(f"{model}/{arm}/ci/{k}/high", iv["high"])
        for comp, metrics in sec["ab"].items():
            for k, d in metrics.items():
                for field_name in ("diff", "diff_low", "diff_high", "p_value", "p_holm"):
                    put(f"{model}/ab/{comp}/{k}/{field_name}", d[field_name])
    for k, v in result["baseline"]["chexpert"].items():
        if "/support/" not in k and k != "n":
            put(f"baseline/chexpert/{k}", v)
    for comp, metrics in result["comparisons"].items():
        for k, d in metrics.items():
            for field_name in ("diff", "diff_low", "diff_high", "p_value", "p_holm"):
                put(f"comparison/{comp}/{k}/{field_name}", d[field_name])
    return out


def eval_params(result: dict) -> dict[str, str]:
    """The evaluation's settings: paths, limit, EHR mode, checkpoint. No patient data."""
    e = result["evaluation"]
    keys = ("checkpoint", "model_uri", "baseline_checkpoint", "data", "data_root", "ehr", "limit", "batch_size",
            "max_new_tokens", "seed",
            "n_resamples", "device", "n_studies")
    params = {f"eval.{k}": str(e[k]) for k in keys}
    params["eval.arms"] = ",".join(e["arms"])
    params["eval.compared_models"] = ",".join(f"{k}={v}" for k, v in e["models"].items())
    params["eval.baseline_fit_on"] = result["baseline"]["fit_on"]
    return params


def log_to_mlflow(result: dict, model: LoadedModel, out_dir: Path, plots: list[Path], opts: EvalOptions) -> str:
    """One run in the experiment: params (settings), metrics (numbers), report.md / metrics.json / plots."""
    from datasets_io.config import MlflowConfig
    from training import tracking

    cfg = model.config
    uri = model.tracking_uri or tracking.resolve_store(opts.tracking_uri, cfg)
    name = "eval-" + (Path(opts.checkpoint).name if opts.checkpoint else opts.model_uri.split("/", 1)[-1])
    tags = {"kind": "evaluation", "eval.studies_sha256": result["evaluation"]["studies_sha256"]}
    if model.training_run_id:
        tags["training_run_id"] = model.training_run_id
    files = [(out_dir / "report.md", "evaluation"), (out_dir / "metrics.json", "evaluation"),
             *[(p, "evaluation/plots") for p in plots]]
    return tracking.log_run(uri, (cfg.mlflow if cfg else MlflowConfig()).experiment, name, tags=tags,
                            params=eval_params(result), metrics=flat_metrics(result), files=files)


# --------------------------------------------------------------------------------------------- plots
def write_plots(result: dict, plot_dir: Path) -> list[Path]:
    """per_label_f1.png (CheXpert per label, each arm and the baseline; ICD per flag) and ab_differences.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plot_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    arms = result["models"]["model"]["arms"]
    has_icd = any("icd" in a for a in arms.values())
    fig, axes = plt.subplots(1 + has_icd, 1, figsize=(11, 4.5 * (1 + has_icd)), squeeze=False)
    series = [(arm, sec["chexpert"]) for arm, sec in arms.items()]
    series.append(("majority baseline", result["baseline"]["chexpert"]))
    _bars(axes[0][0], list(CHEXPERT_LABELS), [(name, [_nan0(c[f"u_pos/f1/{lab}"]) for lab in CHEXPERT_LABELS])
                                              for name, c in series],
          "CheXpert per-label F1 (Uncertain = positive; undefined F1 shown as 0)")
    if has_icd:
        icd_arms = [(arm, sec["icd"]) for arm, sec in arms.items() if "icd" in sec]
        flags = [k.split("/", 1)[1] for k in icd_arms[0][1] if k.startswith("f1/")]
        _bars(axes[1][0], flags, [(arm, [_nan0(s[f"f1/{f}"]) for f in flags]) for arm, s in icd_arms],
              "ICD per-flag F1")
    fig.tight_layout()
    paths.append(plot_dir / "per_label_f1.png")
    fig.savefig(paths[-1], dpi=90)
    plt.close(fig)

    rows = []
    for comp, metrics in result["models"]["model"]["ab"].items():
        for k in ("text/rouge_l", "text/bleu_4", "chexpert/u_pos/macro_f1", "chexpert/u_pos/macro_f1_5",
                  "icd/micro_f1", "icd/macro_f1", "validity/report"):
            if k in metrics:
                rows.append((f"{comp}: {k}", metrics[k]))
    if rows:
        fig, ax = plt.subplots(figsize=(9, 0.4 * len(rows) + 1.5))
        y = np.arange(len(rows))[::-1]
        diffs = np.array([_nan0(d["diff"]) for _, d in rows])
        lows = np.array([_nan0(d["diff_low"]) for _, d in rows])
        highs = np.array([_nan0(d["diff_high"]) for _, d in rows])
        ax.errorbar(diffs, y, xerr=[np.maximum(diffs - lows, 0), np.maximum(highs - diffs, 0)], fmt="o", capsize=3)
        ax.axvline(0, color="grey", lw=0.8)
        ax.set_yticks(y, [f"{name} (p={d['p_value']:.3g})" for name, d in rows], fontsize=8)
        ax.set_xlabel("difference A - B with paired bootstrap 95% interval")
        ax.set_title("Paired arm differences (same studies, same model)")
        fig.tight_layout()
        paths.append(plot_dir / "ab_differences.png")
        fig.savefig(paths[-1], dpi=90)
        plt.close(fig)
    return paths


def _bars(ax: Any, names: list[str], series: list[tuple[str, list[float]]], title: str) -> None:
    width = 0.8 / max(1, len(series))
    x = np.arange(len(names))
    for i, (label, values) in enumerate(series):
        ax.bar(x + i * width - 0.4 + width / 2, values, width, label=label)
    ax.set_xticks(x, names, rotation=35, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("F1")
    ax.set_title(title)
    ax.legend(fontsize=8)


def _nan0(v: Any) -> float:
    return 0.0 if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


# --------------------------------------------------------------------------------------------- report.md
def _f(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{v:.{digits}f}"


def _ci(sec: dict, key: str) -> str:
    iv = sec["ci"].get(key)
    return f"{_f(iv['estimate'])} [{_f(iv['low'])}, {_f(iv['high'])}]" if iv else "n/a"


def _p(p: float) -> str:
    return "n/a" if p is None or (isinstance(p, float) and math.isnan(p)) else (f"{p:.3g}")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


DIFF_HEADER = ("difference [95% CI]", "p-value", "p (Holm)")


def _diff_rows(metrics: dict[str, dict], keys: Sequence[str]) -> list[list[str]]:
    rows = []
    for k in keys:
        d = metrics[k]
        diff = ("undefined" if "undefined" in d
                else f"{_f(d['diff'])} [{_f(d['diff_low'])}, {_f(d['diff_high'])}]")
        rows.append([k, _f(d["a"]), _f(d["b"]), diff, _p(d["p_value"]), _p(d.get("p_holm"))])
    return rows


def render_report(result: dict, plots: Sequence[Path]) -> str:
    """report.md: settings, validity, CheXpert vs the baseline, text, ICD, the paired comparisons, per-label F1."""
    e, models, base = result["evaluation"], result["models"], result["baseline"]
    main = models["model"]
    model_arms = [(name, arm, a) for name, sec in models.items() for arm, a in sec["arms"].items()]
    has_ehr = any(arm != "stage_a" for arm in e["arms"])
    limit_note = f", a random sample of {e['limit']} (seed {e['seed']})" if e["limit"] else ""
    beside = f"; beside it the end of Stage A: `{e['models'][STAGE_A_END]}`" if STAGE_A_END in models else ""
    if TRAINED_BASELINE in models:
        beside += f"; trained baseline: `{e['models'][TRAINED_BASELINE]}`"
    lines = [
        "# Evaluation report",
        "",
        f"- Model: `{e['checkpoint'] or e['model_uri']}`{beside}",
        f"- Data: `{e['data']}`: {e['n_studies']} studies "
        f"({'some with a Stage B row' if has_ehr else 'Stage A rows only'}{limit_note}); study-list hash "
        f"`{e['studies_sha256']}`",
        f"- Greedy decoding, batch {e['batch_size']}, max new tokens {e['max_new_tokens']} for every arm and model "
        f"({e['max_new_tokens_source']}); device {e['device']}; generation {e['generation_s']} s",
        f"- Intervals: percentile bootstrap 95% over studies ({e['n_resamples']} resamples, seed {e['seed']}); "
        "p-values: paired approximate randomization (the two arms' outputs swapped per study), and beside them "
        "Holm-adjusted p-values (family: one table). A comparison with a metric undefined on a side (an F1 with no "
        "positive anywhere) is marked undefined.",
        "",
        "Arms (each scored against the study's Stage B target, or its Stage A target when it has no Stage B row; "
        "paired comparisons use the studies both arms cover):",
        "",
        *[f"- `{arm}`: {ARM_DESCRIPTIONS[arm]}; covers {c['rule']}: {c['n']} of {c['of']} studies (hash "
          f"`{c['studies_sha256']}`)" for arm, c in e["coverage"].items()],
        "", "## Format validity", "",
        *_table(["model", "arm", "whole report", "CheXpert block", "ICD block"],
                [[n, arm, _f(a["validity"]["report"]), _f(a["validity"]["chexpert"]), _f(a["validity"].get("icd"))]
                 for n, arm, a in model_arms]),
        "", "## CheXpert F1 against the majority-class baseline", "",
        f"Baseline: each label's most frequent value in the {base['fit_on']}, predicted for every study. U+ counts "
        "Uncertain as positive, U- as negative. A label with no positive in references nor predictions has no F1 and "
        "is left out of macro-F1.",
        "",
    ]
    chx_keys = ["chexpert/u_pos/macro_f1", "chexpert/u_pos/macro_f1_5", "chexpert/u_pos/micro_f1",
                "chexpert/u_neg/macro_f1", "chexpert/u_neg/macro_f1_5"]
    lines += _table(["model / arm", "macro-F1 14 (U+)", "macro-F1 5 (U+)", "micro-F1 14 (U+)", "macro-F1 14 (U-)",
                     "macro-F1 5 (U-)"],
                    [[f"{n} / {arm}", *[_ci(a, k) for k in chx_keys]] for n, arm, a in model_arms]
                    + [["majority baseline", *[_ci(base, k) for k in chx_keys]]])
    lines += ["", "## Report text (Impression)", "",
              "Comparable with published tables: BLEU-n (13a) = sacrebleu's defaults (13a tokenizer, case-sensitive, "
              "exp smoothing) / 100, and ROUGE-L = rouge-score's defaults (no stemming). Project BLEU: lowercased, "
              "its own tokenizer, unsmoothed (training/metrics/scores.py).", "",
              *_table(["model / arm", "BLEU-1 (13a)", "BLEU-2 (13a)", "BLEU-3 (13a)", "BLEU-4 (13a)", "ROUGE-L",
                       "project BLEU-1", "project BLEU-4"],
                      [[f"{n} / {arm}", _ci(a, "text/bleu_1_13a"), _f(a["text"]["bleu_2_13a"]),
                        _f(a["text"]["bleu_3_13a"]), _ci(a, "text/bleu_4_13a"), _ci(a, "text/rouge_l"),
                        _ci(a, "text/bleu_1"), _ci(a, "text/bleu_4")] for n, arm, a in model_arms])]
    lines += _clinical_section(e, model_arms)
    if any("icd" in a for _, _, a in model_arms):
        lines += ["", "## ICD flags", "",
                  *_table(["model / arm", "micro-F1", "macro-F1"],
                          [[f"{n} / {arm}", _ci(a, "icd/micro_f1"), _ci(a, "icd/macro_f1")]
                           for n, arm, a in model_arms if "icd" in a])]

    for name, sec in models.items():
        for comp, metrics in sec["ab"].items():
            a, b = comp.split("-")
            title = "The EHR A/B test" if comp == "ehr_on-ehr_off" else f"{a} against {b}"
            n_common = next(iter(metrics.values()))["n"] if metrics else 0
            lines += ["", f"## {title} ({name})", "",
                      f"Paired per study: `{a}` - `{b}`, same model, same images, the {n_common} studies both cover.",
                      "", *_table(["metric", a, b, *DIFF_HEADER], _diff_rows(metrics, list(metrics)))]
    for comp, metrics in result["comparisons"].items():
        keys = [k for k in metrics if k.startswith(("chexpert/u_pos/macro", "text/rouge", "text/bleu_4_13a",
                                                    "icd/micro", "validity/"))]
        if keys:
            intro = (["Trained-baseline protocol: two separately trained models, the same studies, arm and paired "
                      "tests (Holm over this table).", ""] if TRAINED_BASELINE in comp else [])
            lines += ["", f"## Comparison {comp}", "", *intro,
                      *_table(["metric", "model", "other", *DIFF_HEADER], _diff_rows(metrics, keys))]

    first = next(iter(main["arms"].values()))["chexpert"]
    lines += ["", "## Per-label CheXpert F1 (U+)", "",
              *_table(["label", "support", *[f"{n}/{arm}" for n, arm, _ in model_arms], "baseline"],
                      [[lab, str(int(first[f"u_pos/support/{lab}"])),
                        *[_f(a["chexpert"][f"u_pos/f1/{lab}"]) for _, _, a in model_arms],
                        _f(base["chexpert"][f"u_pos/f1/{lab}"])] for lab in CHEXPERT_LABELS])]
    icd_arms = [(arm, a["icd"]) for arm, a in main["arms"].items() if "icd" in a]
    if icd_arms:
        flags = [k.split("/", 1)[1] for k in icd_arms[0][1] if k.startswith("f1/")]
        lines += ["", "## Per-flag ICD F1 (the evaluated model)", "",
                  *_table(["flag", "support", *[arm for arm, _ in icd_arms]],
                          [[f, str(int(icd_arms[0][1][f"support/{f}"])), *[_f(s[f"f1/{f}"]) for _, s in icd_arms]]
                           for f in flags])]
    problems = [(f"{n}/{arm}", a["problems"]) for n, arm, a in model_arms if a["problems"]]
    if problems:
        lines += ["", "## Format problems (counts)", ""]
        lines += [f"- {k}: " + ", ".join(f"{p} x{c}" for p, c in v.items()) for k, v in problems]
    if plots:
        lines += ["", "## Plots", "", *[f"![{p.stem}](plots/{p.name})" for p in plots]]
    lines += ["", f"Metric conventions: training/metrics/scores.py. ICD flags scored: {', '.join(ICD_FLAGS)} "
              "(plus any other flag named in the references).", ""]
    return "\n".join(lines)


CLINICAL_COLUMNS = (("CheXbert micro-F1 14 (U-)", "clinical/chexbert/u_neg/micro_f1"),
                    ("CheXbert macro-F1 14 (U-)", "clinical/chexbert/u_neg/macro_f1"),
                    ("CheXbert micro-F1 5 (U-)", "clinical/chexbert/u_neg/micro_f1_5"),
                    ("CheXbert macro-F1 5 (U-)", "clinical/chexbert/u_neg/macro_f1_5"),
                    ("CheXbert micro-F1 14 (U+)", "clinical/chexbert/u_pos/micro_f1"),
                    ("RadGraph F1 (partial)", "clinical/radgraph_f1"),
                    ("BERTScore F1", "clinical/bertscore_f1"))


def _clinical_section(e: dict, model_arms: list[tuple[str, str, dict]]) -> list[str]:
    """The labeler / RadGraph / BERTScore table on the Impression text, and a line per metric skipped."""
    cols = [(title, key) for title, key in CLINICAL_COLUMNS if any(key in a["ci"] for _, _, a in model_arms)]
    lines = ["", "## Clinical metrics (Impression text)", ""]
    if cols:
        lines += ["CheXbert labeler run on the generated and the reference Impression (U- = Uncertain as negative, "
                  "as published tables report); weights from local directories (training/metrics/clinical.py).", "",
                  *_table(["model / arm", *[t for t, _ in cols]],
                          [[f"{n} / {arm}", *[_ci(a, k) for _, k in cols]] for n, arm, a in model_arms]), ""]
    lines += [f"- {line}" for line in e["clinical"]["skipped"]]
    return lines


def summary_lines(result: dict) -> list[str]:
    """What `launcher evaluate` prints at the end."""
    h, e = result["headline"], result["evaluation"]
    out = [f"[eval] {e['n_studies']} studies, arms {', '.join(e['arms'])}, generation {e['generation_s']} s",
           f"  CheXpert macro-F1 ({h['arm']}, U+): 14 labels {_f(h['chexpert_u_pos_macro_f1'])} "
           f"(baseline {_f(h['baseline_u_pos_macro_f1'])}), 5 labels {_f(h['chexpert_u_pos_macro_f1_5'])} "
           f"(baseline {_f(h['baseline_u_pos_macro_f1_5'])})"]
    icd = [f"{k[len('icd_micro_f1_'):]} {_f(v)}" for k, v in h.items() if k.startswith("icd_micro_f1_") and
           k[len("icd_micro_f1_"):] in ("ehr_on", "ehr_off")]
    if icd:
        line = "  ICD micro-F1: " + ", ".join(icd)
        if "icd_micro_f1_p_value" in h:
            lo, hi = h["icd_micro_f1_diff_ci"]
            line += (f"; on - off {_f(h['icd_micro_f1_diff_on_off'])} [{_f(lo)}, {_f(hi)}], "
                     f"p = {_p(h['icd_micro_f1_p_value'])}")
        out.append(line)
    out.append("  validity: " + ", ".join(f"{k[len('validity_'):]} {_f(v)}" for k, v in h.items()
                                          if k.startswith("validity_")))
    return out

