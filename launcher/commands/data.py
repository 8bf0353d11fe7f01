"""`launcher data`: make, check and build curriculum data.

launcher data synth --out data/synth --studies 1200 --seed 0 [--image-size 3056 2544] [--style blocks]
launcher data validate data/synth/curriculum_train.jsonl --data-root data/synth [--policy skip]
launcher data validate data/mimic/curriculum_{train,val}.jsonl --config configs/llava_med_7b.yaml [--set k=v]
    (with a config: the token budget with the model's tokenizer and image-token count)
launcher data build --cxr-jpg DIR --reports DIR --mimic-iv DIR --out DIR     (from raw MIMIC, see README)
launcher data plan --config configs/tiny.yaml --num-workers 2 --steps 5 [--set k=v ...] [--format json]
launcher data prepare --config configs/tiny.yaml [--set data.image_cache=DIR] [--processes N]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from datasets_io.errors import LauncherError

if TYPE_CHECKING:
    from datasets_io.images import ImageSpec
    from datasets_io.config import Config
    from datasets_io.mimic_build.options import BuildOptions


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "data",
        help="synthesize, validate or build curriculum data",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    dsub = p.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")

    s = dsub.add_parser("synth", help="write a synthetic MIMIC-like curriculum with learnable signal")
    s.add_argument("--out", required=True, help="output directory (the data root)")
    s.add_argument("--studies", type=int, default=1200, help="number of studies (default: %(default)s)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument(
        "--image-size",
        type=int,
        nargs=2,
        default=None,
        metavar=("H", "W"),
        help="image height and width (MIMIC size: 3056 2544; default: 256 256, or the style's own)",
    )
    s.add_argument(
        "--style",
        default="default",
        metavar="NAME",
        help="generator: default (the demo's), blocks, inverted or faint (datasets_io/synth_styles.py)",
    )
    s.add_argument(
        "--val-fraction", type=float, default=0.1, help="fraction of PATIENTS in validation (1: an evaluation-only set)"
    )
    s.add_argument(
        "--ehr-detail",
        choices=["basic", "mimic"],
        default="basic",
        help="Patient Data size: basic (the demo's) or mimic (as large as `data build` writes: full lab "
        "panel with units, ranges, hours before; vitals). Default: %(default)s",
    )
    s.set_defaults(func=run_synth)

    v = dsub.add_parser("validate", help="check curriculum JSONL files and print a summary")
    v.add_argument("files", nargs="+", metavar="FILE")
    v.add_argument(
        "--data-root",
        help="directory (or URI) image paths are relative to (default: the config's "
        "data.root; required without --config)",
    )
    v.add_argument(
        "--policy",
        choices=["error", "skip"],
        default="error",
        help="error: exit non-zero on any bad record (all are listed); skip: count and report them",
    )
    v.add_argument(
        "--images",
        choices=["decode", "exists", "none"],
        default="decode",
        help="how images are checked (default: %(default)s)",
    )
    v.add_argument("--json", action="store_true", help="print the summary as JSON")
    v.add_argument(
        "--config",
        metavar="YAML",
        help="training config: also report the token budget with its model's "
        "tokenizer, image-token count, data.max_seq_len and data.overlong",
    )
    v.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override (repeatable), as for `launcher local`",
    )
    v.set_defaults(func=run_validate)

    pl = dsub.add_parser("plan", help="print which samples each optimizer step (and each rank) trains on")
    pl.add_argument("--config", required=True, help="YAML config")
    pl.add_argument(
        "--num-workers",
        type=int,
        default=None,
        help="ranks to lay the global batch out over (default: ray.num_workers of the config)",
    )
    pl.add_argument("--steps", type=int, default=None, help="only the first K optimizer steps (default: all)")
    pl.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set train.global_batch_size=16 (repeatable)",
    )
    pl.add_argument("--format", choices=["text", "json"], default="text")
    pl.set_defaults(func=run_plan)
    pr = dsub.add_parser("prepare", help="decode every image of a config's curriculum into its image cache")
    pr.add_argument("--config", required=True, help="YAML config (data.*, model.*, data.image_cache)")
    pr.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set data.image_cache=/shared/cache (repeatable)",
    )
    pr.add_argument(
        "--processes",
        type=int,
        default=os.cpu_count() or 1,
        help="decoding processes (default: the CPU count, %(default)s)",
    )
    pr.set_defaults(func=run_prepare)

    b = dsub.add_parser("build", help="build the curriculum from raw MIMIC-CXR-JPG + MIMIC-IV")
    add_build_arguments(b)
    b.set_defaults(func=run_build)


def add_build_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `launcher data build` (the work is in datasets_io/mimic_build/)."""
    from datasets_io.mimic_build.options import DEFAULT_ICD_MAP  # light: no numpy, pyarrow or yaml

    parser.add_argument(
        "--cxr-jpg",
        required=True,
        metavar="DIR",
        help="MIMIC-CXR-JPG 2.x folder (mimic-cxr-2.0.0-{metadata,chexpert,split}.csv.gz, files/)",
    )
    parser.add_argument(
        "--reports", required=True, metavar="DIR", help="MIMIC-CXR folder with files/pXX/p<subject>/s<study>.txt"
    )
    parser.add_argument("--mimic-iv", required=True, metavar="DIR", help="MIMIC-IV folder with hosp/*.csv.gz")
    parser.add_argument("--mimic-iv-ed", metavar="DIR", help="MIMIC-IV-ED folder with ed/vitalsign.csv.gz (vitals)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output data root (use as --data-root)")
    parser.add_argument("--subjects", metavar="LIST", help="subject folders to keep, e.g. p10 or p10,p11 (default all)")
    parser.add_argument("--views", default="PA,AP", help="ViewPosition preference, most preferred first")
    parser.add_argument("--max-studies", type=int, default=0, metavar="N", help="stop after N kept studies (0 = all)")
    parser.add_argument(
        "--icd-map",
        default=str(DEFAULT_ICD_MAP),
        metavar="YAML",
        help="versioned ICD flag map (default: %(default)s; the original project's eight flags: "
        "configs/icd_map_seed.yaml)",
    )
    parser.add_argument(
        "--unmentioned",
        choices=("omit", "negative"),
        default="omit",
        help="CheXpert blank (not mentioned): omit from the block, or render Negative",
    )
    parser.add_argument(
        "--no-admission",
        choices=("stage-a-only", "icd-none"),
        default="stage-a-only",
        help="a study inside no admission: no Stage B row, or Stage B with ICD findings None",
    )
    parser.add_argument(
        "--admission-start",
        choices=("admittime", "edregtime"),
        default="admittime",
        help="admission window start: admittime, or the ED registration before it",
    )
    parser.add_argument("--lab-window-hours", type=float, default=24.0)
    parser.add_argument("--vital-window-hours", type=float, default=24.0)
    parser.add_argument("--image-mode", choices=("symlink", "copy"), default="symlink")


def options_from_args(args: argparse.Namespace) -> BuildOptions:
    """The parsed arguments as BuildOptions, checked."""
    from datasets_io.mimic_build.options import BuildOptions, parse_subject_selectors

    views = tuple(v.strip().upper() for v in args.views.split(",") if v.strip())
    if not views:
        raise LauncherError("--views: give at least one ViewPosition, e.g. PA,AP")
    if args.max_studies < 0 or args.lab_window_hours <= 0 or args.vital_window_hours <= 0:
        raise LauncherError("--max-studies must be >= 0 and the window hours > 0")
    return BuildOptions(
        cxr_jpg=args.cxr_jpg,
        reports=args.reports,
        mimic_iv=args.mimic_iv,
        out=args.out,
        mimic_iv_ed=args.mimic_iv_ed,
        subjects=parse_subject_selectors(args.subjects),
        views=views,
        max_studies=args.max_studies,
        icd_map=args.icd_map,
        unmentioned=args.unmentioned,
        no_admission=args.no_admission,
        admission_start=args.admission_start,
        lab_window_hours=args.lab_window_hours,
        vital_window_hours=args.vital_window_hours,
        image_mode=args.image_mode,
    )


def run_build(args: argparse.Namespace) -> int:
    from datasets_io.mimic_build.build import build, summary

    report = build(options_from_args(args))
    print(summary(report))
    print(f"  report: {Path(args.out) / 'build_report.json'}")
    return 0


def run_synth(args: argparse.Namespace) -> int:
    from datasets_io.synth import write_synthetic
    from datasets_io.synth_styles import get_style
    from datasets_io.errors import LauncherError

    try:
        style = None if args.style == "default" else get_style(args.style)
    except ValueError as e:
        raise LauncherError(f"--style: {e}") from None
    if style is not None and args.ehr_detail != "basic":
        raise LauncherError("--ehr-detail applies to the default generator only, not to --style")
    size = tuple(args.image_size) if args.image_size else (style.image_size if style else (256, 256))
    if not 0.0 <= args.val_fraction <= 1.0:
        raise LauncherError(f"--val-fraction {args.val_fraction}: expected a fraction of the patients, 0 to 1")
    summary = write_synthetic(
        args.out, args.studies, args.seed, size, args.val_fraction, ehr_detail=args.ehr_detail, style=style
    )
    print(json.dumps(summary, indent=2))
    return 0


def run_validate(args: argparse.Namespace) -> int:
    from datasets_io.validate import summarize_files

    cfg = None
    if args.config:
        from datasets_io.config import load_config

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


def run_prepare(args: argparse.Namespace) -> int:
    """Fill `data.image_cache` with every train and validation image, so the run's first epoch decodes nothing."""
    import time
    from pathlib import Path

    from datasets_io.image_cache import fill_cache, open_image_cache
    from datasets_io.jsonl import join, read_records
    from datasets_io.config import data_path, image_cache_dir, load_config
    from datasets_io.errors import LauncherError

    cfg = load_config(args.config, args.overrides)
    directory = image_cache_dir(cfg)
    if not directory:
        raise LauncherError("data.image_cache is '' (the cache is off): nothing to prepare; set it to a directory")
    cache = open_image_cache(directory)
    paths: list[str] = []
    for name in ("train_file", "val_file"):
        path = data_path(cfg, name)
        if name == "val_file" and "://" not in path and not Path(path).exists():
            continue  # as training: the validation file is optional
        records, report = read_records(path, cfg.data.root, policy=cfg.data.bad_records, check_images="exists")
        if report.skipped:
            print(f"{path}: skipped {report.skipped} bad record(s) (data.bad_records=skip)", file=sys.stderr)
        paths += [join(cfg.data.root, r.image) for r in records]
    t0 = time.perf_counter()
    r = fill_cache(cache, paths, image_spec_for_config(cfg), processes=max(1, args.processes))
    print(
        f"image cache {directory}: {r.images} images ({len(paths)} rows): {r.misses} decoded and stored, {r.hits} "
        f"already there, {r.rebuilt} rebuilt, {r.write_errors} write errors, {r.read_errors} read errors, "
        f"{len(r.failed)} failed; "
        f"{time.perf_counter() - t0:.1f} s with {max(1, args.processes)} process(es)"
    )
    for problem in r.failed[:20]:
        print(f"  {problem}", file=sys.stderr)
    return 1 if r.failed or r.write_errors or r.read_errors else 0


def image_spec_for_config(cfg: Config) -> ImageSpec:
    """The image spec training will use. The cache key needs only its size: the tiny model's is in the config (its
    base's image_spec.json says the same); a real model's comes from its directory."""
    from datasets_io.images import ImageSpec

    if not cfg.model.name_or_path:
        return ImageSpec(cfg.model.tiny.image_size)
    from transformers import LlavaConfig

    from training.model import image_spec_for

    return image_spec_for(cfg.model.name_or_path, LlavaConfig.from_pretrained(cfg.model.name_or_path))


def budget_summary(cfg, files: list[str], data_root: str) -> dict:
    """The token budget of each file with the config's model tokenizer (training.data_checks.token_spec)."""
    from datasets_io.jsonl import read_records
    from datasets_io.validate import token_budgets
    from datasets_io.config import data_path
    from training.data_checks import token_spec

    def corpus() -> list[str]:  # what the tiny tokenizer is trained on: the config's training file, else FILE...
        train = data_path(cfg, "train_file")
        sources = [train] if "://" in train or Path(train).is_file() else files
        return [
            t
            for f in sources
            for r in read_records(f, data_root, policy="skip", check_images="none")[0]
            for t in (r.prompt, r.target)
        ]

    spec = token_spec(cfg, corpus)
    out = token_budgets(
        files,
        data_root,
        spec.tokenizer,
        spec.image_token_id,
        spec.num_image_tokens,
        cfg.data.max_seq_len,
        cfg.data.overlong,
    )
    for b in out.values():
        b["tokenizer"] = spec.source
    return out


def format_summary(s: dict) -> str:
    lines = [
        f"files: {', '.join(s['files'])}",
        f"records: {s['rows']} good, {s['bad_records']} bad, {s['blank_lines']} blank lines",
        "rows per stage: " + ", ".join(f"{k}={v}" for k, v in s["per_stage"].items()),
        f"studies: {s['studies']}  patients (from image paths): {s['patients']}",
        "CheXpert prevalence (Positive / Uncertain, share of rows):",
    ]
    for label, p in s["chexpert_prevalence"].items():
        lines.append(f"  {label:28s} {p['Positive']:6.1%}  {p['Uncertain']:6.1%}")
    lines.append("ICD flag prevalence (Stage B rows):")
    for flag, p in s["icd_prevalence"].items():
        lines.append(f"  {flag:28s} {p:6.1%}")
    lines.append("EHR field coverage (Stage B rows with a non-empty value):")
    for fld, p in s["ehr_coverage"].items():
        lines.append(f"  {fld:28s} {p:6.1%}")
    for o in s["subject_overlap"]:
        lines.append(
            f"subjects shared by {o['files'][0]} and {o['files'][1]}: {o['shared_subjects']}"
            + (
                f" (e.g. {', '.join(o['examples'])}): patient leakage if one is a train file"
                if o["shared_subjects"]
                else ""
            )
        )
    for path, b in s.get("token_budget", {}).items():
        lines.append(f"{path}: tokenizer {b['tokenizer']}")
        lines += [f"  {line}" for line in b["lines"]]
    if s["problems"]:
        lines.append(f"problems ({len(s['problems'])}):")
        lines += [f"  {p}" for p in s["problems"][:50]]
        if len(s["problems"]) > 50:
            lines.append(f"  ... and {len(s['problems']) - 50} more (--json lists all)")
    return "\n".join(lines)


def data_plan(cfg, num_workers: int, steps: int | None = None) -> dict:
    """The run's data order as the sampler lays it out for `num_workers` ranks: the step plan and, per optimizer
    step, the global batch (study ids, EHR dropped, replay) and each rank's [first, end) positions in the stage."""
    from pathlib import Path

    from datasets_io.sampler import BatchLayout, row_table
    from datasets_io.config import data_path
    from datasets_io.errors import LauncherError
    from launcher.local import load_run_data
    from training import curriculum
    from training.data import planned_order, sampler_spec

    train_path = data_path(cfg, "train_file")
    if "://" not in train_path and not Path(train_path).exists():
        raise LauncherError(f"training file {train_path} not found (`launcher data synth` makes one)")
    try:
        cfg = curriculum.with_derived_grad_accum(cfg, num_workers)
    except ValueError as e:
        raise LauncherError(str(e)) from None
    data = load_run_data(cfg)
    n_rows = {s: len(data.train[s]) for s in ("A", "B")}
    plan = curriculum.plan_steps(cfg, n_rows["A"], n_rows["B"], world_size=num_workers)
    layout = BatchLayout(cfg.train.micro_batch_size, cfg.train.grad_accum, num_workers)
    tables = {s: row_table(data.train[s]) for s in ("A", "B")}
    order = planned_order(sampler_spec(cfg, n_rows), tables, plan, layout, steps)
    return {
        "num_workers": num_workers,
        "micro_batch_size": layout.micro_batch_size,
        "grad_accum": layout.grad_accum,
        "samples_per_step": layout.global_batch,
        "seed": cfg.train.seed,
        "rows": n_rows,
        "plan": dict(plan.__dict__),
        "steps": order,
    }


def run_plan(args: argparse.Namespace) -> int:
    from datasets_io.config import load_config

    cfg = load_config(args.config, args.overrides)
    plan = data_plan(cfg, args.num_workers or cfg.ray.num_workers, args.steps)
    if args.format == "json":
        print(json.dumps(plan, indent=1))
        return 0
    p = plan["plan"]
    print(
        f"{plan['num_workers']} rank(s) x accum {plan['grad_accum']} x micro {plan['micro_batch_size']} = "
        f"{plan['samples_per_step']} samples/step; {p['total_steps']} steps (stage A {p['stage_a_steps']}, "
        f"stage B {p['total_steps'] - p['stage_a_steps']}); seed {plan['seed']}; rows {plan['rows']}"
    )
    print("study ids per rank; (-ehr) = Patient Data dropped, (replay) = a Stage A row replayed in Stage B")
    for st in plan["steps"]:
        print(f"step {st['step']} stage {st['stage']}")
        for rank, (first, end) in enumerate(st["ranks"]):
            k0 = rank * (end - first)
            ids = [
                sid + ("(-ehr)" if st["ehr_dropped"][k0 + i] else "") + ("(replay)" if st["replay"][k0 + i] else "")
                for i, sid in enumerate(st["study_ids"][k0 : k0 + end - first])
            ]
            print(f"  rank {rank} positions {first}-{end - 1}: {' '.join(ids)}")
    return 0
