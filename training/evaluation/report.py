"""The result written out: metrics.json, report.md, predictions.jsonl (only on request: it holds patient data), the
lines `launcher evaluate` prints, and the settings and numbers an MLflow run gets (never patient data)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from datasets_io.records import CHEXPERT_LABELS, ICD_FLAGS
from training.evaluation.generation import STAGE_A_END, TRAINED_BASELINE, ArmOutput
from training.evaluation.studies import ARM_DESCRIPTIONS, Study


# --------------------------------------------------------------------------------------------- the files
def write_metrics(out_dir: Path, result: dict) -> None:
    """metrics.json: strict JSON (NaN, i.e. undefined, written as null)."""
    (out_dir / "metrics.json").write_text(json.dumps(json_safe(result), indent=2))


def json_safe(obj: Any) -> Any:
    """NaN / inf -> None (strict JSON); numpy scalars -> Python."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return None if not math.isfinite(float(obj)) else float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


def write_predictions(path: Path, studies: Sequence[Study], outputs: dict[str, dict[str, ArmOutput]]) -> None:
    """Per study, model and arm: the generated text and its parse. Holds patient data: written only on request.
    An arm's texts are for the studies at its `indices` (the EHR arms skip studies without a Stage B row)."""
    with path.open("w") as f:
        for model, arms in outputs.items():
            for arm, out in arms.items():
                for i, text, p in zip(out.indices, out.texts, out.parsed, strict=True):
                    s = studies[i]
                    f.write(
                        json.dumps(
                            {
                                "study_id": s.study_id,
                                "model": model,
                                "arm": arm,
                                "generated": text,
                                "target": s.target,
                                "valid": p.valid,
                                "problems": p.problems,
                            }
                        )
                        + "\n"
                    )


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
        diff = "undefined" if "undefined" in d else f"{_f(d['diff'])} [{_f(d['diff_low'])}, {_f(d['diff_high'])}]"
        rows.append([k, _f(d["a"]), _f(d["b"]), diff, _p(d["p_value"]), _p(d.get("p_holm"))])
    return rows


def render_report(result: dict, plots: Sequence[Path]) -> str:
    """report.md: settings, validity, CheXpert vs the baseline, text, clinical metrics, ICD, the paired comparisons,
    per-label F1, format problems and the plots."""
    e, models, base = result["evaluation"], result["models"], result["baseline"]
    model_arms = [(name, arm, a) for name, sec in models.items() for arm, a in sec["arms"].items()]
    lines = [
        *_settings_section(e, models),
        *_validity_section(model_arms),
        *_chexpert_section(model_arms, base),
        *_text_section(model_arms),
        *_clinical_section(e, model_arms),
        *_icd_section(model_arms),
    ]
    for name, sec in models.items():
        for comp, metrics in sec["ab"].items():
            lines += _arm_comparison_section(name, comp, metrics)
    for comp, metrics in result["comparisons"].items():
        lines += _model_comparison_section(comp, metrics)
    lines += _per_label_sections(models["model"], model_arms, base)
    lines += _problems_and_plots(model_arms, plots)
    lines += [
        "",
        f"Metric conventions: training/metrics/scores.py. ICD flags scored: {', '.join(ICD_FLAGS)} "
        "(plus any other flag named in the references).",
        "",
    ]
    return "\n".join(lines)


ModelArms = list[tuple[str, str, dict]]  # (model name, arm, the arm's metrics section) of every model and arm


def _settings_section(e: dict, models: dict) -> list[str]:
    has_ehr = any(arm != "stage_a" for arm in e["arms"])
    limit_note = f", a random sample of {e['limit']} (seed {e['seed']})" if e["limit"] else ""
    beside = f"; beside it the end of Stage A: `{e['models'][STAGE_A_END]}`" if STAGE_A_END in models else ""
    if TRAINED_BASELINE in models:
        beside += f"; trained baseline: `{e['models'][TRAINED_BASELINE]}`"
    return [
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
        *[
            f"- `{arm}`: {ARM_DESCRIPTIONS[arm]}; covers {c['rule']}: {c['n']} of {c['of']} studies (hash "
            f"`{c['studies_sha256']}`)"
            for arm, c in e["coverage"].items()
        ],
    ]


def _validity_section(model_arms: ModelArms) -> list[str]:
    return [
        "",
        "## Format validity",
        "",
        *_table(
            ["model", "arm", "whole report", "CheXpert block", "ICD block"],
            [
                [n, arm, _f(a["validity"]["report"]), _f(a["validity"]["chexpert"]), _f(a["validity"].get("icd"))]
                for n, arm, a in model_arms
            ],
        ),
    ]


CHEXPERT_COLUMNS = (
    ("macro-F1 14 (U+)", "chexpert/u_pos/macro_f1"),
    ("macro-F1 5 (U+)", "chexpert/u_pos/macro_f1_5"),
    ("micro-F1 14 (U+)", "chexpert/u_pos/micro_f1"),
    ("macro-F1 14 (U-)", "chexpert/u_neg/macro_f1"),
    ("macro-F1 5 (U-)", "chexpert/u_neg/macro_f1_5"),
)


def _chexpert_section(model_arms: ModelArms, base: dict) -> list[str]:
    keys = [k for _, k in CHEXPERT_COLUMNS]
    return [
        "",
        "## CheXpert F1 against the majority-class baseline",
        "",
        f"Baseline: each label's most frequent value in the {base['fit_on']}, predicted for every study. U+ counts "
        "Uncertain as positive, U- as negative. A label with no positive in references nor predictions has no F1 "
        "and is left out of macro-F1.",
        "",
        *_table(
            ["model / arm", *[t for t, _ in CHEXPERT_COLUMNS]],
            [[f"{n} / {arm}", *[_ci(a, k) for k in keys]] for n, arm, a in model_arms]
            + [["majority baseline", *[_ci(base, k) for k in keys]]],
        ),
    ]


def _text_section(model_arms: ModelArms) -> list[str]:
    return [
        "",
        "## Report text (Impression)",
        "",
        "Comparable with published tables: BLEU-n (13a) = sacrebleu's defaults (13a tokenizer, case-sensitive, "
        "exp smoothing) / 100, and ROUGE-L = rouge-score's defaults (no stemming). Project BLEU: lowercased, "
        "its own tokenizer, unsmoothed (training/metrics/scores.py).",
        "",
        *_table(
            [
                "model / arm",
                "BLEU-1 (13a)",
                "BLEU-2 (13a)",
                "BLEU-3 (13a)",
                "BLEU-4 (13a)",
                "ROUGE-L",
                "project BLEU-1",
                "project BLEU-4",
            ],
            [
                [
                    f"{n} / {arm}",
                    _ci(a, "text/bleu_1_13a"),
                    _f(a["text"]["bleu_2_13a"]),
                    _f(a["text"]["bleu_3_13a"]),
                    _ci(a, "text/bleu_4_13a"),
                    _ci(a, "text/rouge_l"),
                    _ci(a, "text/bleu_1"),
                    _ci(a, "text/bleu_4"),
                ]
                for n, arm, a in model_arms
            ],
        ),
    ]


CLINICAL_COLUMNS = (
    ("CheXbert micro-F1 14 (U-)", "clinical/chexbert/u_neg/micro_f1"),
    ("CheXbert macro-F1 14 (U-)", "clinical/chexbert/u_neg/macro_f1"),
    ("CheXbert micro-F1 5 (U-)", "clinical/chexbert/u_neg/micro_f1_5"),
    ("CheXbert macro-F1 5 (U-)", "clinical/chexbert/u_neg/macro_f1_5"),
    ("CheXbert micro-F1 14 (U+)", "clinical/chexbert/u_pos/micro_f1"),
    ("RadGraph F1 (partial)", "clinical/radgraph_f1"),
    ("BERTScore F1", "clinical/bertscore_f1"),
)


def _clinical_section(e: dict, model_arms: ModelArms) -> list[str]:
    """The labeler / RadGraph / BERTScore table on the Impression text, and a line per metric skipped."""
    cols = [(title, key) for title, key in CLINICAL_COLUMNS if any(key in a["ci"] for _, _, a in model_arms)]
    lines = ["", "## Clinical metrics (Impression text)", ""]
    if cols:
        lines += [
            "CheXbert labeler run on the generated and the reference Impression (U- = Uncertain as negative, "
            "as published tables report); weights from local directories (training/metrics/clinical.py).",
            "",
            *_table(
                ["model / arm", *[t for t, _ in cols]],
                [[f"{n} / {arm}", *[_ci(a, k) for _, k in cols]] for n, arm, a in model_arms],
            ),
            "",
        ]
    lines += [f"- {line}" for line in e["clinical"]["skipped"]]
    return lines


def _icd_section(model_arms: ModelArms) -> list[str]:
    if not any("icd" in a for _, _, a in model_arms):
        return []
    return [
        "",
        "## ICD flags",
        "",
        *_table(
            ["model / arm", "micro-F1", "macro-F1"],
            [
                [f"{n} / {arm}", _ci(a, "icd/micro_f1"), _ci(a, "icd/macro_f1")]
                for n, arm, a in model_arms
                if "icd" in a
            ],
        ),
    ]


def _arm_comparison_section(name: str, comp: str, metrics: dict[str, dict]) -> list[str]:
    """One model's paired arm comparison (`comp` = "a-b"): every metric both arms have."""
    a, b = comp.split("-")
    title = "The EHR A/B test" if comp == "ehr_on-ehr_off" else f"{a} against {b}"
    n_common = next(iter(metrics.values()))["n"] if metrics else 0
    return [
        "",
        f"## {title} ({name})",
        "",
        f"Paired per study: `{a}` - `{b}`, same model, same images, the {n_common} studies both cover.",
        "",
        *_table(["metric", a, b, *DIFF_HEADER], _diff_rows(metrics, list(metrics))),
    ]


def _model_comparison_section(comp: str, metrics: dict[str, dict]) -> list[str]:
    """The model against the baseline or another model on one arm: the headline metrics only."""
    keys = [
        k
        for k in metrics
        if k.startswith(("chexpert/u_pos/macro", "text/rouge", "text/bleu_4_13a", "icd/micro", "validity/"))
    ]
    if not keys:
        return []
    intro = (
        [
            "Trained-baseline protocol: two separately trained models, the same studies, arm and paired "
            "tests (Holm over this table).",
            "",
        ]
        if TRAINED_BASELINE in comp
        else []
    )
    return [
        "",
        f"## Comparison {comp}",
        "",
        *intro,
        *_table(["metric", "model", "other", *DIFF_HEADER], _diff_rows(metrics, keys)),
    ]


def _per_label_sections(main: dict, model_arms: ModelArms, base: dict) -> list[str]:
    """CheXpert F1 per label (every model and arm, the baseline) and ICD F1 per flag (the evaluated model)."""
    first = next(iter(main["arms"].values()))["chexpert"]
    lines = [
        "",
        "## Per-label CheXpert F1 (U+)",
        "",
        *_table(
            ["label", "support", *[f"{n}/{arm}" for n, arm, _ in model_arms], "baseline"],
            [
                [
                    lab,
                    str(int(first[f"u_pos/support/{lab}"])),
                    *[_f(a["chexpert"][f"u_pos/f1/{lab}"]) for _, _, a in model_arms],
                    _f(base["chexpert"][f"u_pos/f1/{lab}"]),
                ]
                for lab in CHEXPERT_LABELS
            ],
        ),
    ]
    icd_arms = [(arm, a["icd"]) for arm, a in main["arms"].items() if "icd" in a]
    if icd_arms:
        flags = [k.split("/", 1)[1] for k in icd_arms[0][1] if k.startswith("f1/")]
        lines += [
            "",
            "## Per-flag ICD F1 (the evaluated model)",
            "",
            *_table(
                ["flag", "support", *[arm for arm, _ in icd_arms]],
                [
                    [f, str(int(icd_arms[0][1][f"support/{f}"])), *[_f(s[f"f1/{f}"]) for _, s in icd_arms]]
                    for f in flags
                ],
            ),
        ]
    return lines


def _problems_and_plots(model_arms: ModelArms, plots: Sequence[Path]) -> list[str]:
    lines = []
    problems = [(f"{n}/{arm}", a["problems"]) for n, arm, a in model_arms if a["problems"]]
    if problems:
        lines += ["", "## Format problems (counts)", ""]
        lines += [f"- {k}: " + ", ".join(f"{p} x{c}" for p, c in v.items()) for k, v in problems]
    if plots:
        lines += ["", "## Plots", "", *[f"![{p.stem}](plots/{p.name})" for p in plots]]
    return lines


def summary_lines(result: dict) -> list[str]:
    """What `launcher evaluate` prints at the end."""
    h, e = result["headline"], result["evaluation"]
    out = [
        f"[eval] {e['n_studies']} studies, arms {', '.join(e['arms'])}, generation {e['generation_s']} s",
        f"  CheXpert macro-F1 ({h['arm']}, U+): 14 labels {_f(h['chexpert_u_pos_macro_f1'])} "
        f"(baseline {_f(h['baseline_u_pos_macro_f1'])}), 5 labels {_f(h['chexpert_u_pos_macro_f1_5'])} "
        f"(baseline {_f(h['baseline_u_pos_macro_f1_5'])})",
    ]
    icd = [
        f"{k[len('icd_micro_f1_') :]} {_f(v)}"
        for k, v in h.items()
        if k.startswith("icd_micro_f1_") and k[len("icd_micro_f1_") :] in ("ehr_on", "ehr_off")
    ]
    if icd:
        line = "  ICD micro-F1: " + ", ".join(icd)
        if "icd_micro_f1_p_value" in h:
            lo, hi = h["icd_micro_f1_diff_ci"]
            line += (
                f"; on - off {_f(h['icd_micro_f1_diff_on_off'])} [{_f(lo)}, {_f(hi)}], "
                f"p = {_p(h['icd_micro_f1_p_value'])}"
            )
        out.append(line)
    out.append(
        "  validity: "
        + ", ".join(f"{k[len('validity_') :]} {_f(v)}" for k, v in h.items() if k.startswith("validity_"))
    )
    return out


# --------------------------------------------------------------------------------------------- MLflow's view
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
    keys = (
        "checkpoint",
        "model_uri",
        "baseline_checkpoint",
        "data",
        "data_root",
        "ehr",
        "limit",
        "batch_size",
        "max_new_tokens",
        "seed",
        "n_resamples",
        "device",
        "n_studies",
    )
    params = {f"eval.{k}": str(e[k]) for k in keys}
    params["eval.arms"] = ",".join(e["arms"])
    params["eval.compared_models"] = ",".join(f"{k}={v}" for k, v in e["models"].items())
    params["eval.baseline_fit_on"] = result["baseline"]["fit_on"]
    return params
