"""`launcher local`: train on one machine (CUDA, Apple MPS or CPU) with the plain-PyTorch/Accelerate engine.

launcher local --config configs/tiny.yaml                      # the demo: synthetic data + tiny model
launcher local --config configs/tiny.yaml --device mps --set train.max_steps=200
launcher local --config configs/tiny.yaml --resume auto        # continue from the newest checkpoint
"""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "local",
        help="train on this machine (no Ray, no DeepSpeed)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", default="configs/tiny.yaml", help="YAML config (default: %(default)s)")
    p.add_argument(
        "--device",
        default="auto",
        choices=["auto", "cuda", "mps", "cpu"],
        help="auto picks cuda, then mps, then cpu (default: %(default)s)",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set train.max_steps=50 (repeatable)",
    )
    p.add_argument(
        "--resume",
        default=None,
        metavar="auto|PATH",
        help="resume from the newest checkpoint (auto) or a checkpoint directory; fails if none",
    )
    p.add_argument(
        "--stop-after",
        type=int,
        default=None,
        metavar="STEPS",
        help="stop with a checkpoint after this global step (resume later with --resume auto)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from datasets_io.config import load_config
    from launcher.local import run_local

    cfg = load_config(args.config, args.overrides)
    summary = run_local(
        cfg, device=args.device, resume=args.resume, stop_after=args.stop_after, show_progress=not args.no_progress
    )
    out = cfg.output.dir
    print(
        f"\n[done] {summary['global_step']}/{summary['total_steps']} steps, final loss {summary['final_loss']:.4f}"
        f" ({summary['wall_time_s']} s)"
    )
    for name, path in summary["checkpoints"].items():
        print(f"  checkpoint {name}: {path}")
    print(f"  run summary: {out}/run_summary.json")
    print(f"  MLflow run {summary['mlflow_run_id']} in {summary['tracking_uri']}")
    if summary["tracking_uri"].startswith("sqlite:"):
        print(f"  open the UI: mlflow ui --backend-store-uri {summary['tracking_uri']} --port 5000")
    return 0
