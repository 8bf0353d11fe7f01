"""`launcher config show` prints what load_config resolves; `launcher config schema` accepts every shipped run config
and rejects wrong types and unknown keys, with the field descriptions."""

import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from datasets_io.config import load_config
from launcher.cli import main

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted(p for p in (REPO / "configs").glob("*.yaml") if not p.name.startswith("icd_map"))  # run configs
OVERRIDES = ["train.max_steps=7", "curriculum.stage_split=0.5", "lora.target_modules=[q_proj, v_proj]"]


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    rc = main(list(args))
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft202012Validator:
    from launcher.commands.config import config_json_schema

    schema = config_json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)  # a well-formed schema of the dialect it names
    return jsonschema.Draft202012Validator(schema)


def test_shipped_configs_exist():
    assert {p.name for p in SHIPPED} >= {"tiny.yaml", "llava_med_7b.yaml"}


@pytest.mark.parametrize("fmt", ["yaml", "json"])
@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_show_prints_the_resolved_config(path, fmt, capsys):
    args = ["config", "show", "--config", str(path), "--format", fmt]
    for o in OVERRIDES:
        args += ["--set", o]
    rc, out, _ = _cli(capsys, *args)
    assert rc == 0
    shown = json.loads(out) if fmt == "json" else yaml.safe_load(out)
    assert shown == load_config(path, OVERRIDES).model_dump()
    assert shown["train"]["max_steps"] == 7 and shown["lora"]["target_modules"] == ["q_proj", "v_proj"]


def test_show_reports_every_problem_and_exits_2(capsys):
    rc, out, err = _cli(
        capsys,
        "config",
        "show",
        "--config",
        str(REPO / "configs" / "tiny.yaml"),
        "--set",
        "train.lr=fast",
        "--set",
        "train.max_stepz=3",
    )
    assert (rc, out) == (2, "")
    assert "train.lr: expected a valid number" in err and "train.max_stepz: unknown key" in err


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_schema_accepts_every_shipped_run_config(path, validator):
    validator.validate(yaml.safe_load(path.read_text()))
    validator.validate(load_config(path).model_dump())  # the resolved tree, every key present


@pytest.mark.parametrize(
    "section, key, value",
    [
        ("train", "lr", "fast"),
        ("train", "max_steps", True),
        ("data", "overlong", "maybe"),
        ("deepspeed", "zero_stage", 4),
        ("lora", "target_modules", "q_proj"),
        ("curriculum", "stage_split", 1.5),  # bounds are in the schema too
        ("train", "lr", 0),
    ],
)
def test_schema_rejects_a_wrong_type_or_range(section, key, value, validator):
    data = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    data.setdefault(section, {})[key] = value
    errors = list(validator.iter_errors(data))
    assert [list(e.absolute_path) for e in errors] == [[section, key]]


@pytest.mark.parametrize("where", [[], ["train"], ["model", "tiny"]], ids=["root", "section", "nested"])
def test_schema_rejects_an_unknown_key(where, validator):
    data = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    node = data
    for part in where:
        node = node.setdefault(part, {})
    node["max_stepz"] = 3
    errors = list(validator.iter_errors(data))
    assert len(errors) == 1 and errors[0].validator == "additionalProperties"
    assert list(errors[0].absolute_path) == where and "max_stepz" in errors[0].message


def test_schema_carries_the_field_descriptions(capsys):
    rc, out, _ = _cli(capsys, "config", "schema")
    assert rc == 0
    schema = json.loads(out)
    train = schema["$defs"]["TrainConfig"]["properties"]
    assert train["lr"]["description"] == "Learning rate of the LoRA adapters (and the vision tower when trained)."
    assert train["lr"]["default"] == 2e-4 and train["lr"]["type"] == "number"
    assert schema["$defs"]["DataConfig"]["properties"]["bad_records"]["enum"] == ["error", "skip"]
    assert schema["additionalProperties"] is False and set(schema["properties"]) == set(load_config(None).model_dump())
