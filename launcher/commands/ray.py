"""`launcher ray` / `launcher submit`: train on a Ray cluster (Ray Train + DeepSpeed ZeRO), or submit that to one.

    launcher ray --config configs/tiny.yaml --num-workers 2          # no RAY_ADDRESS: starts a local Ray (127.0.0.1)
    ray job submit --address http://HEAD:8265 --working-dir . -- python -m launcher.cli ray --config configs/tiny.yaml
    launcher submit --address http://HEAD:8265 --config configs/tiny.yaml --num-workers 8 --use-gpu \\
        --runtime-env cluster/runtime_env.yaml                        # ships the config + working dir, streams logs

Running the same command again with the same `ray.storage_path` + `ray.name` resumes the run (and its MLflow run).
A cluster with token authentication (Ray's default) needs RAY_AUTH_MODE=token on every client call; see
cluster/README.md.
"""

from __future__ import annotations

import argparse
import os


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        default="configs/tiny.yaml",
        help="YAML config (default: %(default)s); env:NAME reads the YAML text from $NAME",
    )
    p.add_argument(
        "--num-workers", type=int, default=None, metavar="N", help="training workers (default: ray.num_workers)"
    )
    p.add_argument(
        "--use-gpu",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="one GPU per worker, NCCL, bf16 by default (default: ray.use_gpu)",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set deepspeed.zero_stage=3 (repeatable)",
    )


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ray",
        help="train with Ray Train + DeepSpeed ZeRO (joins RAY_ADDRESS, else a local Ray)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common(p)
    p.set_defaults(func=run)

    s = sub.add_parser(
        "submit",
        help="submit `launcher ray` to a Ray cluster through the Jobs API and stream its logs",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    s.add_argument(
        "--address",
        default=os.environ.get("RAY_API_SERVER_ADDRESS") or None,
        required=False,
        help="the cluster's dashboard, http://HOST:8265 (default: $RAY_API_SERVER_ADDRESS)",
    )
    _common(s)
    s.add_argument("--working-dir", default=".", help="shipped to the cluster as the job's working_dir (default: .)")
    s.add_argument(
        "--runtime-env",
        default=None,
        metavar="YAML",
        help="base runtime environment, e.g. cluster/runtime_env.yaml (its working_dir is replaced)",
    )
    s.add_argument("--no-wait", action="store_true", help="print the job id and return instead of streaming logs")
    s.set_defaults(func=run_submit)


def run(args: argparse.Namespace) -> int:
    from launcher.ray_train import run_ray

    from launcher.submit import load_cli_config

    cfg = load_cli_config(args.config, args.overrides)
    summary = run_ray(cfg, num_workers=args.num_workers, use_gpu=args.use_gpu)
    print(
        f"\n[done] {summary['global_step']}/{summary['total_steps']} steps on {summary['num_workers']} workers "
        f"(ZeRO-{summary['zero_stage']}), final loss {summary['final_loss']:.4f} ({summary['wall_time_s']} s)"
    )
    print(f"  checkpoint (Ray storage): {summary['ray_checkpoint']}")
    for name, path in summary["checkpoints"].items():
        print(f"  checkpoint {name} (rank 0's node): {path}")
    print(f"  MLflow run {summary['mlflow_run_id']} in {summary['tracking_uri']}")
    return 0


def run_submit(args: argparse.Namespace) -> int:
    from datasets_io.errors import LauncherError
    from launcher.submit import submit_job

    if not args.address:
        raise LauncherError("--address http://HEAD:8265 is required (or set RAY_API_SERVER_ADDRESS)")
    return submit_job(
        address=args.address,
        config=args.config,
        overrides=args.overrides,
        num_workers=args.num_workers,
        use_gpu=args.use_gpu,
        working_dir=args.working_dir,
        runtime_env_file=args.runtime_env,
        wait=not args.no_wait,
    )
