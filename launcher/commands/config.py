"""`launcher config`: the resolved config of a run, and the JSON schema that editors validate the YAML with.

    launcher config show --config configs/tiny.yaml --set train.max_steps=20      (YAML, after every check)
    launcher config show --config configs/llava_med_7b.yaml --format json
    launcher config schema > config.schema.json

`show` loads the file as `launcher local` / `launcher ray` do (overrides applied, every key, type and range checked;
a problem exits 2 naming its dotted key) and prints the whole tree, defaults included. `schema` prints a JSON schema
(draft 2020-12) of the pydantic models in datasets_io/config.py, each field's description and bounds with it and
unknown keys rejected. An editor with a YAML language server validates and completes a config that starts with
`# yaml-language-server: $schema=config.schema.json`. The schema checks keys, types and bounds (stage_split in
[0, 1], ...); the cross-field checks (image_size a multiple of patch_size, ...) are validators that run at load, so
`show` is the full check.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "config",
        help="print a resolved run config, or the JSON schema of the config tree",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    csub = p.add_subparsers(dest="config_command", required=True, metavar="SUBCOMMAND")

    s = csub.add_parser("show", help="load, override and validate a config; print the whole resolved tree")
    s.add_argument("--config", default=None, metavar="FILE", help="YAML config (default: the built-in defaults)")
    s.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set train.max_steps=20 (repeatable)",
    )
    s.add_argument("--format", choices=["yaml", "json"], default="yaml")
    s.set_defaults(func=run_show)

    sc = csub.add_parser("schema", help="print the JSON schema of the config tree (field docs as descriptions)")
    sc.set_defaults(func=run_schema)


def run_show(args: argparse.Namespace) -> int:
    import yaml

    from datasets_io.config import load_config

    resolved = load_config(args.config, args.overrides).model_dump()
    if args.format == "json":
        print(json.dumps(resolved, indent=2))
    else:
        print(yaml.safe_dump(resolved, sort_keys=False), end="")
    return 0


def run_schema(args: argparse.Namespace) -> int:
    print(json.dumps(config_json_schema(), indent=2))
    return 0


def config_json_schema() -> dict[str, Any]:
    """pydantic's JSON schema of `Config`, the model that validates at load, so the two cannot drift."""
    from datasets_io.config import Config

    return {"$schema": JSON_SCHEMA_DIALECT, **Config.model_json_schema()}
