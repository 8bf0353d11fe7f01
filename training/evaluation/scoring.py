"""Scoring: each arm's metrics with bootstrap intervals, the CheXpert majority-class baseline, and the paired
comparisons (arm against arm, model against baseline and other models) with p-values and their Holm adjustment
(training/metrics/scores.py and stats.py hold the metrics and the statistics)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from datasets_io.errors import LauncherError
from datasets_io.jsonl import read_records
from datasets_io.records import CHEXPERT_5, CHEXPERT_LABELS, ParsedTarget, parse_target
from training.evaluation.generation import STAGE_A_END, TRAINED_BASELINE, ArmOutput
from training.evaluation.options import EvalOptions
from training.evaluation.studies import ARM_DESCRIPTIONS, ARM_EXPECTS_ICD, Study
from training.metrics import scores
from training.metrics.clinical import ClinicalScorers
from training.metrics.stats import SummedStats, bootstrap_ci, compare_arms, holm_adjust

# The paired comparisons (a - b) the report shows, when both arms were generated.
ARM_COMPARISONS = (("ehr_on", "ehr_off"), ("ehr_on", "stage_a"), ("ehr_off", "stage_a"))


# --------------------------------------------------------------------------------------------- an arm
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
    m.update(chexpert_f1_stats(preds_chx, refs.chexpert))
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


def chexpert_f1_stats(preds: Sequence[dict[str, str] | None], refs: Sequence[dict[str, str]]) -> dict[str, Any]:
    """CheXpert micro- and macro-F1 on the 14 and the 5 labels, Uncertain as positive and as negative: metric name
    -> stats.SummedStats (an arm's and the majority baseline's, so both are compared on the same names)."""
    out = {}
    for conv in scores.CONVENTIONS:
        for labels, suffix in ((CHEXPERT_LABELS, ""), (CHEXPERT_5, "_5")):
            for avg in ("micro", "macro"):
                out[f"chexpert/{conv}/{avg}_f1{suffix}"] = scores.chexpert_f1_metric(
                    preds, refs, convention=conv, labels=labels, average=avg
                )
    return out


def score_arm(
    out: ArmOutput, refs: References, *, n_resamples: int, seed: int, clinical: ClinicalScorers | None = None
) -> tuple[dict, dict[str, Any]]:
    """(the arm's metrics section for metrics.json, its SummedStats for paired tests). `refs` are the references of
    the arm's studies, in the arm's order."""
    stats = arm_metric_stats(out, refs, clinical)
    preds_imp, preds_chx = out.impressions, out.chexpert
    section: dict[str, Any] = {
        "n": len(out.texts),
        "prompt": ARM_DESCRIPTIONS[out.arm],
        "validity": {k.split("/", 1)[1]: v.value for k, v in stats.items() if k.startswith("validity/")},
        "text": {
            **scores.bleu(preds_imp, refs.impressions),
            **scores.sacrebleu_bleu(preds_imp, refs.impressions),
            "rouge_l": scores.rouge_l(preds_imp, refs.impressions),
        },
        "chexpert": scores.chexpert_scores(preds_chx, refs.chexpert),
        "problems": _problem_counts(out.parsed),
    }
    clinical_values = {k.split("/", 1)[1]: v.value for k, v in stats.items() if k.startswith("clinical/")}
    if clinical_values:
        section["clinical"] = clinical_values
    if "validity/icd" in stats:
        section["icd"] = scores.icd_scores(out.icd, refs.icd, flags=scores.icd_flag_set(refs.icd))
    section["ci"] = intervals(stats, n_resamples=n_resamples, seed=seed)
    return section, stats


def _problem_counts(parsed: Sequence[ParsedTarget]) -> dict[str, int]:
    """How often each kind of format problem occurred (the JSON error detail dropped so kinds group)."""
    counts: dict[str, int] = {}
    for p in parsed:
        for problem in p.problems:
            kind = problem.split(" (")[0].split(": values")[0]
            counts[kind] = counts.get(kind, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def intervals(stats: dict[str, Any], *, n_resamples: int, seed: int) -> dict[str, dict[str, float]]:
    """Metric name -> its percentile bootstrap 95% interval over studies: {estimate, low, high}."""
    out = {}
    for name, s in stats.items():
        iv = bootstrap_ci(s, n_resamples=n_resamples, seed=seed)
        out[name] = {"estimate": iv.estimate, "low": iv.low, "high": iv.high}
    return out


def score_arms(
    outputs: dict[str, ArmOutput], studies: Sequence[Study], opts: EvalOptions, clinical: ClinicalScorers | None = None
) -> tuple[dict, dict]:
    """Each arm scored on the studies it covers: ({"arms": {arm: section}}, {arm: ArmStats})."""
    section: dict[str, Any] = {"arms": {}}
    stats: dict[str, ArmStats] = {}
    for arm, out in outputs.items():
        refs = References.of([studies[i] for i in out.indices])
        section["arms"][arm], arm_stats = score_arm(
            out, refs, n_resamples=opts.n_resamples, seed=opts.seed, clinical=clinical
        )
        stats[arm] = ArmStats(list(out.indices), arm_stats)
    return section, stats


# --------------------------------------------------------------------------------------------- baseline
def majority_baseline(
    refs: References, train_file: str | None, data_root: str | None, *, n_resamples: int, seed: int
) -> tuple[dict, ArmStats]:
    """The CheXpert majority-class prediction, fit on the training file when readable, else on the evaluation refs.
    Scored on every study of `refs` (compared with each arm on the studies that arm covers)."""
    fit_on, fit_refs = "evaluation data", refs.chexpert
    if train_file and "://" not in train_file and Path(train_file).is_file():
        rows, _ = read_records(
            train_file, data_root or str(Path(train_file).parent), policy="skip", check_images="none"
        )
        train_refs = [p.chexpert for r in rows if (p := parse_target(r.target, expect_icd=False)).chexpert]
        if train_refs:
            fit_on, fit_refs = "training data", train_refs
    prediction = scores.chexpert_majority_baseline(fit_refs)
    preds = [prediction] * len(refs.chexpert)
    stats = chexpert_f1_stats(preds, refs.chexpert)
    section = {
        "fit_on": fit_on,
        "prediction": prediction,
        "chexpert": scores.chexpert_scores(preds, refs.chexpert),
        "ci": intervals(stats, n_resamples=n_resamples, seed=seed),
    }
    return section, ArmStats(list(range(len(preds))), stats)


# --------------------------------------------------------------------------------------------- comparisons
def compare_stats(
    a: ArmStats, b: ArmStats, *, n_resamples: int, seed: int, only: Callable[[str], bool] = lambda name: True
) -> dict[str, dict[str, Any]]:
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
            out[name] = {
                "a": va,
                "b": vb,
                "diff": math.nan,
                "diff_low": math.nan,
                "diff_high": math.nan,
                "p_value": math.nan,
                "n": len(common),
                "undefined": f"the metric is undefined on side {side} (e.g. no positive in references nor predictions)",
            }
            continue
        c = compare_arms(sa[name], sb[name], n_resamples=n_resamples, seed=seed)
        out[name] = {
            "a": c.a.estimate,
            "b": c.b.estimate,
            "diff": c.diff.estimate,
            "diff_low": c.diff.low,
            "diff_high": c.diff.high,
            "p_value": c.test.p_value,
            "n": len(common),
        }
    for entry, p_holm in zip(out.values(), holm_adjust([e["p_value"] for e in out.values()]), strict=True):
        entry["p_holm"] = float(p_holm)
    return out


def _text_or_chexpert(name: str) -> bool:
    return name.startswith(("text/", "chexpert/", "clinical/", "validity/report", "validity/chexpert"))


def compare_model_arms(stats: dict[str, ArmStats], opts: EvalOptions) -> dict[str, dict]:
    """The paired arm comparisons of one model (ehr_on - ehr_off, and each EHR arm against stage_a on the studies
    both cover: text and CheXpert only, since the image-only arm answers no ICD)."""
    ab = {}
    for a, b in ARM_COMPARISONS:
        if a in stats and b in stats:
            only = (lambda n: True) if "stage_a" not in (a, b) else _text_or_chexpert
            ab[f"{a}-{b}"] = compare_stats(stats[a], stats[b], n_resamples=opts.n_resamples, seed=opts.seed, only=only)
    return ab


def score_model(
    outputs: dict[str, ArmOutput], studies: Sequence[Study], opts: EvalOptions, clinical: ClinicalScorers | None = None
) -> tuple[dict, dict]:
    """score_arms, then compare_model_arms into section["ab"]."""
    section, stats = score_arms(outputs, studies, opts, clinical)
    section["ab"] = compare_model_arms(stats, opts)
    return section, stats


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
