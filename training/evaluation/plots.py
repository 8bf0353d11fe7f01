"""The evaluation's plots (matplotlib, Agg backend): per-label F1 of each arm and the baseline, and the paired arm
differences with their intervals."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from datasets_io.records import CHEXPERT_LABELS

# The paired differences plotted (each comparison's, when it has them).
DIFF_METRICS = (
    "text/rouge_l",
    "text/bleu_4",
    "chexpert/u_pos/macro_f1",
    "chexpert/u_pos/macro_f1_5",
    "icd/micro_f1",
    "icd/macro_f1",
    "validity/report",
)


def write_plots(result: dict, plot_dir: Path) -> list[Path]:
    """per_label_f1.png (CheXpert per label, each arm and the baseline; ICD per flag) and ab_differences.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plot_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, figure in (("per_label_f1", per_label_figure), ("ab_differences", ab_figure)):
        fig = figure(result, plt)
        if fig is not None:
            fig.tight_layout()
            paths.append(plot_dir / f"{name}.png")
            fig.savefig(paths[-1], dpi=90)
            plt.close(fig)
    return paths


def per_label_figure(result: dict, plt: Any) -> Any:
    """CheXpert F1 per label for each arm of the evaluated model and the majority baseline; ICD F1 per flag."""
    arms = result["models"]["model"]["arms"]
    has_icd = any("icd" in a for a in arms.values())
    fig, axes = plt.subplots(1 + has_icd, 1, figsize=(11, 4.5 * (1 + has_icd)), squeeze=False)
    series = [(arm, sec["chexpert"]) for arm, sec in arms.items()]
    series.append(("majority baseline", result["baseline"]["chexpert"]))
    _bars(
        axes[0][0],
        list(CHEXPERT_LABELS),
        [(name, [_nan0(c[f"u_pos/f1/{lab}"]) for lab in CHEXPERT_LABELS]) for name, c in series],
        "CheXpert per-label F1 (Uncertain = positive; undefined F1 shown as 0)",
    )
    if has_icd:
        icd_arms = [(arm, sec["icd"]) for arm, sec in arms.items() if "icd" in sec]
        flags = [k.split("/", 1)[1] for k in icd_arms[0][1] if k.startswith("f1/")]
        _bars(
            axes[1][0], flags, [(arm, [_nan0(s[f"f1/{f}"]) for f in flags]) for arm, s in icd_arms], "ICD per-flag F1"
        )
    return fig


def ab_figure(result: dict, plt: Any) -> Any | None:
    """The evaluated model's paired arm differences (DIFF_METRICS) with their intervals and p-values; None when
    there is no comparison."""
    rows = [
        (f"{comp}: {k}", metrics[k])
        for comp, metrics in result["models"]["model"]["ab"].items()
        for k in DIFF_METRICS
        if k in metrics
    ]
    if not rows:
        return None
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
    return fig


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
