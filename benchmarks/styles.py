"""Does the tiny default learn curricula it was not tuned on? The README's own commands on every synth style x seed.

    python benchmarks/styles.py [--styles default blocks inverted faint] [--seeds 0 1 2] [--work runs/styles]
        [--set train.max_steps=300 ...]
For each style: `launcher data synth --style S` (1,200 studies, data seed 0, once), then per seed
`launcher local --config configs/tiny.yaml --set data.root=... --set output.dir=... --set train.seed=N` (timed) and
`launcher evaluate --checkpoint .../final --data .../curriculum_val.jsonl --ehr both`. From each metrics.json:
- CheXpert macro-F1 (U+) of the EHR-on arm over the labels the style draws in the pixels (all 14 for the default);
- ICD micro-F1 with EHR on, off, their paired difference and its p-value;
- format validity of both arms; training wall time (setup included).
Prints one row per run and a table of mean [min, max] per style (the README's table), and writes results.json.
Run it on an otherwise idle machine: the training time is part of what is measured.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from datasets_io.records import CHEXPERT_LABELS
from datasets_io.synth_styles import STYLES

REPO = Path(__file__).resolve().parents[1]
LAUNCHER = [sys.executable, "-m", "launcher.cli"]


def pixel_labels(style: str) -> tuple[str, ...]:
    """The labels a style decides by what it draws (the default draws every finding, faintly when uncertain)."""
    return CHEXPERT_LABELS if style == "default" else STYLES[style].pixel_labels


def run_figures(metrics: dict, labels: tuple[str, ...]) -> dict:
    """The issue's figures from one metrics.json."""
    model = metrics["models"]["model"]
    on, off = model["arms"]["ehr_on"], model["arms"]["ehr_off"]
    ab = model["ab"]["ehr_on-ehr_off"]["icd/micro_f1"]
    return {
        # a label with no positive in the val file and none predicted has no F1 (None): left out of the mean, as the
        # evaluation's own macro-F1 does
        "chexpert_pixel_macro_f1": statistics.fmean(
            f1 for label in labels if (f1 := on["chexpert"][f"u_pos/f1/{label}"]) is not None
        ),
        "icd_micro_f1_on": on["icd"]["micro_f1"],
        "icd_micro_f1_off": off["icd"]["micro_f1"],
        "icd_on_minus_off": ab["diff"],
        "icd_p_value": ab["p_value"],
        "validity_on": on["validity"]["report"],
        "validity_off": off["validity"]["report"],
    }


def run(cmd: list[str], log: Path) -> float:
    """Run a launcher command, its output to `log`; seconds taken. A failure stops the benchmark, naming the log."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        code = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO)
    if code:
        raise SystemExit(f"{' '.join(cmd[2:4])} failed (exit {code}); see {log}")
    return time.perf_counter() - t0


def one_run(style: str, seed: int, work: Path, extra: list[str]) -> dict:
    data, out = work / "data" / style, work / f"{style}-seed{seed}"
    out.mkdir(parents=True, exist_ok=True)
    if not (data / "curriculum_train.jsonl").is_file():
        run(
            [*LAUNCHER, "data", "synth", "--out", str(data), "--studies", "1200", "--seed", "0", "--style", style],
            work / f"synth-{style}.log",
        )
    sets = [f"data.root={data}", f"output.dir={out}", f"train.seed={seed}", *extra]
    train_s = run(
        [
            *LAUNCHER,
            "local",
            "--config",
            "configs/tiny.yaml",
            "--no-progress",
            *[a for s in sets for a in ("--set", s)],
        ],
        out / "train.log",
    )
    run(
        [
            *LAUNCHER,
            "evaluate",
            "--checkpoint",
            str(out / "checkpoints" / "final"),
            "--data",
            str(data / "curriculum_val.jsonl"),
            "--data-root",
            str(data),
            "--ehr",
            "both",
            "--out",
            str(out / "eval"),
            "--no-stage-a-end",
            "--no-progress",
        ],
        out / "eval.log",
    )  # the figures are the final model's
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    return {"style": style, "seed": seed, "train_s": train_s, **run_figures(metrics, pixel_labels(style))}


def table(rows: list[dict]) -> str:
    """Markdown: per style, each figure as mean [min, max] over its seeds."""
    keys = ["chexpert_pixel_macro_f1", "icd_on_minus_off", "icd_p_value", "validity_on", "validity_off", "train_s"]
    lines = ["| style | seeds | " + " | ".join(keys) + " |", "|" + "---|" * (len(keys) + 2)]
    for style in dict.fromkeys(r["style"] for r in rows):
        mine = [r for r in rows if r["style"] == style]
        cells = []
        for k in keys:
            v = [r[k] for r in mine]
            fmt = "{:.0f}" if k == "train_s" else "{:.3f}"
            cells.append(f"{fmt.format(statistics.fmean(v))} [{fmt.format(min(v))}, {fmt.format(max(v))}]")
        lines.append(f"| {style} | {len(mine)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--styles", nargs="+", default=["default", *STYLES], choices=["default", *STYLES])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--work", type=Path, default=REPO / "runs" / "styles")
    ap.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra config overrides for every run (e.g. train.max_steps=300)",
    )
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    for style in args.styles:
        for seed in args.seeds:
            rows.append(one_run(style, seed, args.work, args.sets))
            print(json.dumps(rows[-1]), flush=True)
            (args.work / "results.json").write_text(json.dumps(rows, indent=2))
    print(table(rows))


if __name__ == "__main__":
    main()
