"""Does the tiny default learn curricula it was not tuned on? The README's own commands on every synth style x seed.

    python benchmarks/styles.py [--styles default blocks inverted faint] [--seeds 0 1 2] [--work runs/styles]
        [--eval-studies 1000] [--set train.max_steps=300 ...] [--evaluate-only]
For each style: `launcher data synth --style S` (1,200 studies, data seed 0, once: the training file), and an
evaluation file of `--eval-studies` other patients from the same generator (data seed 1, `--val-fraction 1`, once;
checked to share no patient with the training file). Then per seed `launcher local --config configs/tiny.yaml --set
data.root=... --set output.dir=... --set train.seed=N` (timed) and `launcher evaluate --checkpoint .../final --data
<evaluation file> --ehr both`. From each metrics.json:
- CheXpert macro-F1 (U+) of the EHR-on arm over the labels the style draws in the pixels (the default generator:
  datasets_io.synth.DRAWN_FINDINGS), with each label's F1 and number of positives;
- ICD micro-F1 with EHR on, off, their paired difference and its p-value;
- format validity of both arms; training wall time (setup included).
Why a separate evaluation file: the training file's own 10% validation split has ~120 studies, so a finding drawn in
3% of studies has 0-4 positives there and its F1 is 0 or 1 by chance; 1,000 studies give every drawn label tens.
`--evaluate-only` evaluates the runs already in --work again (their training time from its results.json): a change
of the measurement without training again (training is deterministic for a seed and thread count).
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

from datasets_io.jsonl import read_records
from datasets_io.leakage import check_subject_overlap, subject_overlap
from datasets_io.synth import DRAWN_FINDINGS
from datasets_io.synth_styles import STYLES

REPO = Path(__file__).resolve().parents[1]
LAUNCHER = [sys.executable, "-m", "launcher.cli"]
TRAIN_STUDIES, TRAIN_DATA_SEED = 1200, 0
EVAL_DATA_SEED = 1  # other patients than the training file's
EVAL_STUDIES = 1000


def pixel_labels(style: str) -> tuple[str, ...]:
    """The labels a style decides by what it draws (the default generator: every finding but pneumonia, faintly when
    uncertain)."""
    return DRAWN_FINDINGS if style == "default" else STYLES[style].pixel_labels


def run_figures(metrics: dict, labels: tuple[str, ...]) -> dict:
    """The issue's figures from one metrics.json."""
    model = metrics["models"]["model"]
    on, off = model["arms"]["ehr_on"], model["arms"]["ehr_off"]
    ab = model["ab"]["ehr_on-ehr_off"]["icd/micro_f1"]
    f1 = {label: on["chexpert"][f"u_pos/f1/{label}"] for label in labels}
    return {
        # a label with no positive in the evaluation file and none predicted has no F1 (None): left out of the mean,
        # as the evaluation's own macro-F1 does
        "chexpert_pixel_macro_f1": statistics.fmean(v for v in f1.values() if v is not None),
        "pixel_f1": f1,
        "pixel_positives": {label: int(on["chexpert"][f"u_pos/support/{label}"]) for label in labels},
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
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        code = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO)
    if code:
        raise SystemExit(f"{' '.join(cmd[2:4])} failed (exit {code}); see {log}")
    return time.perf_counter() - t0


def synth(style: str, out: Path, studies: int, seed: int, val_fraction: float, log: Path) -> None:
    """`launcher data synth` once: kept when its files are there."""
    if not (out / "curriculum_val.jsonl").is_file():
        run(
            [*LAUNCHER, "data", "synth", "--out", str(out), "--studies", str(studies), "--seed", str(seed)]
            + ["--style", style, "--val-fraction", str(val_fraction)],
            log,
        )


def style_data(style: str, work: Path, eval_studies: int) -> tuple[Path, Path]:
    """(the training data root, the evaluation file): the evaluation file's patients are checked to be none of the
    training file's (a LauncherError names the shared ones)."""
    data, held = work / "data" / style, work / "data" / f"{style}-eval{eval_studies}"
    synth(style, data, TRAIN_STUDIES, TRAIN_DATA_SEED, 0.1, work / f"synth-{style}.log")
    synth(style, held, eval_studies, EVAL_DATA_SEED, 1.0, work / f"synth-{style}-eval.log")
    train_file, eval_file = data / "curriculum_train.jsonl", held / "curriculum_val.jsonl"
    (train_rows, _), (eval_rows, _) = (read_records(str(f), str(f.parent)) for f in (train_file, eval_file))
    overlap = subject_overlap(train_rows, eval_rows)
    check_subject_overlap(overlap, str(train_file), str(eval_file), allow=False)
    return data, eval_file


def one_run(
    style: str, seed: int, work: Path, extra: list[str], eval_studies: int = EVAL_STUDIES, train: bool = True
) -> dict:
    """Train (unless `train=False`: the run's final checkpoint is evaluated again) and evaluate one style x seed."""
    out = work / f"{style}-seed{seed}"
    out.mkdir(parents=True, exist_ok=True)
    data, eval_file = style_data(style, work, eval_studies)
    sets = [f"data.root={data}", f"output.dir={out}", f"train.seed={seed}", *extra]
    train_s = None
    if train:
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
            str(eval_file),
            "--data-root",
            str(eval_file.parent),
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
    ap.add_argument("--eval-studies", type=int, default=EVAL_STUDIES, help="studies in the evaluation file")
    ap.add_argument(
        "--evaluate-only",
        action="store_true",
        help="evaluate the final checkpoints already in --work again; training times from its results.json",
    )
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    results = args.work / "results.json"
    trained = (
        {(r["style"], r["seed"]): r["train_s"] for r in json.loads(results.read_text())} if results.is_file() else {}
    )
    rows = []
    for style in args.styles:
        for seed in args.seeds:
            if args.evaluate_only and (style, seed) not in trained:
                raise SystemExit(f"--evaluate-only: {results} has no {style} seed {seed} run")
            row = one_run(style, seed, args.work, args.sets, args.eval_studies, train=not args.evaluate_only)
            rows.append({**row, "train_s": trained[(style, seed)]} if args.evaluate_only else row)
            print(json.dumps(rows[-1]), flush=True)
            results.write_text(json.dumps(rows, indent=2))
    print(table(rows))


if __name__ == "__main__":
    main()
