"""`launcher`: the command line.

    launcher data synth --out data/synth --studies 1200 --seed 0
    launcher data validate data/synth/curriculum_train.jsonl --data-root data/synth
    launcher local --config configs/tiny.yaml --device auto
    ray job submit --working-dir . -- launcher ray --config configs/tiny.yaml --num-workers 2
    launcher evaluate --checkpoint runs/tiny/checkpoints/final --data data/synth/curriculum_val.jsonl \\
        --data-root data/synth --ehr both --out runs/tiny/eval
    launcher register --checkpoint runs/tiny/checkpoints/final --name cxr-report-generator --alias candidate
    launcher predict --checkpoint runs/tiny/checkpoints/final --image x.jpg --ehr ehr.json
    launcher export --checkpoint runs/tiny/checkpoints/final --format hf --out exports/tiny-hf
    launcher doctor --config configs/tiny.yaml
    launcher config show --config configs/tiny.yaml --set train.max_steps=20
    launcher config schema > config.schema.json

Each command group lives in its own module under `launcher/commands/` with `add_parser(subparsers)`; the heavy
imports (torch, ray, mlflow) happen inside the command, so `launcher --help` is instant. Errors that users can act
on (LauncherError, a ConfigError among them; RecordError) print one clear message and exit 2, never a bare traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

COMMAND_MODULES = (
    "launcher.commands.data",
    "launcher.commands.local",
    "launcher.commands.ray",
    "launcher.commands.evaluate",
    "launcher.commands.model",
    "launcher.commands.export",
    "launcher.commands.doctor",
    "launcher.commands.config",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="launcher", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # command group not built yet
                continue
            raise
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    from datasets_io.records import RecordError
    from datasets_io.errors import LauncherError

    try:
        return int(args.func(args) or 0)
    except (LauncherError, RecordError) as e:
        print(f"launcher {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
