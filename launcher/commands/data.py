"""`launcher data`: make, check and build curriculum data.

    launcher data synth --out data/synth --studies 1200 --seed 0 [--image-size 3056 2544]
    launcher data validate data/synth/curriculum_train.jsonl --data-root data/synth [--policy skip]
    launcher data validate data/mimic/curriculum_{train,val}.jsonl --config configs/llava_med_7b.yaml [--set k=v]
        (with a config: the token budget with the model's tokenizer and image-token count)
    launcher data build --cxr-jpg DIR --reports DIR --mimic-iv DIR --out DIR     (from raw MIMIC, see README)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from launcher.errors import LauncherError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="synthesize, validate or build curriculum data", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    dsub = p.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")

    s = dsub.add_parser("synth", help="write a synthetic MIMIC-like curriculum with learnable signal")
    s.add_argument("--out", required=True, help="output directory (the data root)")
    s.add_argument("--studies", type=int, default=1200, help="number of studies (default: %(default)s)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--image-size", type=int, nargs=2, default=[256, 256], metavar=("H", "W"),
                   help="image height and width (MIMIC size: 3056 2544; default: %(default)s)")
    s.add_argument("--val-fraction", type=float, default=0.1, help="fraction of PATIENTS in validation")
    s.add_argument("--ehr-detail", choices=["basic", "mimic"], default="basic",
                   help="Patient Data size: basic (the demo's) or mimic (as large as `data build` writes: full lab "
                        "panel with units, ranges, hours before; vitals). Default: %(default)s")
    s.set_defaults(func=run_synth)

    v = dsub.add_parser("validate", help="check curriculum JSONL files and print a summary")
    v.add_argument("files", nargs="+", metavar="FILE")
    v.add_argument("--data-root", help="directory (or URI) image paths are relative to (default: the config's "
                                        "data.root; required without --config)")
    v.add_argument("--policy", choices=["error", "skip"], default="error",
                   help="error: exit non-zero on any bad record (all are listed); skip: count and report them")
    v.add_argument("--images", choices=["decode", "exists", "none"], default="decode",
                   help="how images are checked (default: %(default)s)")
    v.add_argument("--json", action="store_true", help="print the summary as JSON")
    v.add_argument("--config", metavar="YAML", help="training config: also report the token budget with its model's "
                   "tokenizer, image-token count, data.max_seq_len and data.overlong")
    v.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override (repeatable), as for `launcher local`")
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

    summary = write_synthetic(args.out, args.studies, args.seed, tuple(args.image_size), args.val_fraction,
                              ehr_detail=args.ehr_detail)
    print(json.dumps(summary, indent=2))
    return 0


def run_validate(args: argparse.Namespace) -> int:
    from datasets_io.validate import summarize_files

    cfg = None
    if args.config:
        from launcher.config import load_config

        cfg = load_config(args.config, args.overrides)
    elif args.overrides:
        raise LauncherError("--set needs --config")
    data_root = args.data_root or (cfg.data.root if cfg else None)
    if not data_root:
        raise LauncherError("--data-root is required without --config")
    summary = summarize_files(args.files, data_root, images=args.images)
    if cfg is not None:
        summary["token_budget"] = budget_summary(cfg, args.files, data_root)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(format_summary(summary))
    bad = summary["bad_records"] + sum(b["rows_over_budget"] for b in summary.get("token_budget", {}).values())
    if bad and args.policy == "error":
        print(f"\n{bad} bad record(s): failing (use --policy skip to count and skip them)", file=sys.stderr)
        return 1
    return 0


def budget_summary(cfg, files: list[str], data_root: str) -> dict:
    """The token budget of each file with the config's model tokenizer (training.data_checks.token_spec)."""
    from datasets_io.jsonl import read_records
    from datasets_io.validate import token_budgets
    from launcher.config import data_path
    from training.data_checks import token_spec

    def corpus() -> list[str]:  # what the tiny tokenizer is trained on: the config's training file, else FILE...
        train = data_path(cfg, "train_file")
        sources = [train] if "://" in train or Path(train).is_file() else files
        return [t for f in sources for r in read_records(f, data_root, policy="skip", check_images="none")[0]
                for t in (r.prompt, r.target)]

    spec = token_spec(cfg, corpus)
    out = token_budgets(files, data_root, spec.tokenizer, spec.image_token_id, spec.num_image_tokens,
                        cfg.data.max_seq_len, cfg.data.overlong)
    for b in out.values():
        b["tokenizer"] = spec.source
    return out


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
    for o in s["subject_overlap"]:
        lines.append(f"subjects shared by {o['files'][0]} and {o['files'][1]}: {o['shared_subjects']}"
                     + (f" (e.g. {', '.join(o['examples'])}): patient leakage if one is a train file"
                        if o["shared_subjects"] else ""))
    for path, b in s.get("token_budget", {}).items():
        lines.append(f"{path}: tokenizer {b['tokenizer']}")
        lines += [f"  {line}" for line in b["lines"]]
    if s["problems"]:
        lines.append(f"problems ({len(s['problems'])}):")
        lines += [f"  {p}" for p in s["problems"][:50]]
        if len(s["problems"]) > 50:
            lines.append(f"  ... and {len(s['problems']) - 50} more (--json lists all)")
    return "\n".join(lines)
