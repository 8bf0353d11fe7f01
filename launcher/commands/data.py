"""`launcher data`: make, check and build curriculum data.

    launcher data synth --out data/synth --studies 1200 --seed 0 [--image-size 3056 2544] [--style blocks]
    launcher data validate data/synth/curriculum_train.jsonl --data-root data/synth [--policy skip]
    launcher data build --cxr-jpg DIR --reports DIR --mimic-iv DIR --out DIR     (from raw MIMIC, see README)
"""

from __future__ import annotations

import argparse
import json
import sys


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="synthesize, validate or build curriculum data", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    dsub = p.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")

    s = dsub.add_parser("synth", help="write a synthetic MIMIC-like curriculum with learnable signal")
    s.add_argument("--out", required=True, help="output directory (the data root)")
    s.add_argument("--studies", type=int, default=1200, help="number of studies (default: %(default)s)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--image-size", type=int, nargs=2, default=None, metavar=("H", "W"),
                   help="image height and width (MIMIC size: 3056 2544; default: 256 256, or the style's own)")
    s.add_argument("--style", default="default", metavar="NAME",
                   help="generator: default (the demo's), blocks, inverted or faint (datasets_io/synth_styles.py)")
    s.add_argument("--val-fraction", type=float, default=0.1, help="fraction of PATIENTS in validation")
    s.set_defaults(func=run_synth)

    v = dsub.add_parser("validate", help="check curriculum JSONL files and print a summary")
    v.add_argument("files", nargs="+", metavar="FILE")
    v.add_argument("--data-root", required=True, help="directory (or URI) image paths are relative to")
    v.add_argument("--policy", choices=["error", "skip"], default="error",
                   help="error: exit non-zero on any bad record (all are listed); skip: count and report them")
    v.add_argument("--images", choices=["decode", "exists", "none"], default="decode",
                   help="how images are checked (default: %(default)s)")
    v.add_argument("--json", action="store_true", help="print the summary as JSON")
    v.set_defaults(func=run_validate)

    try:
        from datasets_io.mimic_build import add_build_arguments, run_build
    except ModuleNotFoundError:
        return
    b = dsub.add_parser("build", help="build the curriculum from raw MIMIC-CXR-JPG + MIMIC-IV")
    add_build_arguments(b)
    b.set_defaults(func=run_build)


def run_synth(args: argparse.Namespace) -> int:
    from datasets_io.synth import write_synthetic
    from datasets_io.synth_styles import get_style
    from launcher.errors import LauncherError

    try:
        style = None if args.style == "default" else get_style(args.style)
    except ValueError as e:
        raise LauncherError(f"--style: {e}") from None
    size = tuple(args.image_size) if args.image_size else (style.image_size if style else (256, 256))
    summary = write_synthetic(args.out, args.studies, args.seed, size, args.val_fraction, style=style)
    print(json.dumps(summary, indent=2))
    return 0


def run_validate(args: argparse.Namespace) -> int:
    from datasets_io.validate import summarize_files

    summary = summarize_files(args.files, args.data_root, images=args.images)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(format_summary(summary))
    bad = summary["bad_records"]
    if bad and args.policy == "error":
        print(f"\n{bad} bad record(s): failing (use --policy skip to count and skip them)", file=sys.stderr)
        return 1
    return 0


def format_summary(s: dict) -> str:
    lines = [f"files: {', '.join(s['files'])}",
             f"records: {s['rows']} good, {s['bad_records']} bad, {s['blank_lines']} blank lines",
             "rows per stage: " + ", ".join(f"{k}={v}" for k, v in s["per_stage"].items()),
             f"studies: {s['studies']}  patients (from image paths): {s['patients']}",
             "CheXpert prevalence (Positive / Uncertain, share of rows):"]
    for label, p in s["chexpert_prevalence"].items():
        lines.append(f"  {label:28s} {p['Positive']:6.1%}  {p['Uncertain']:6.1%}")
    lines.append("ICD flag prevalence (Stage B rows):")
    for flag, p in s["icd_prevalence"].items():
        lines.append(f"  {flag:28s} {p:6.1%}")
    lines.append("EHR field coverage (Stage B rows with a non-empty value):")
    for fld, p in s["ehr_coverage"].items():
        lines.append(f"  {fld:28s} {p:6.1%}")
    if s["problems"]:
        lines.append(f"problems ({len(s['problems'])}):")
        lines += [f"  {p}" for p in s["problems"][:50]]
        if len(s["problems"]) > 50:
            lines.append(f"  ... and {len(s['problems']) - 50} more (--json lists all)")
    return "\n".join(lines)
