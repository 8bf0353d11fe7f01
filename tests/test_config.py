"""The typed config: every shipped YAML validates, overrides apply, all problems are reported at once."""

from pathlib import Path

import pytest

from datasets_io.config import ConfigError, from_dict, load_config, to_dict

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted(p for p in (REPO / "configs").glob("*.yaml") if not p.name.startswith("icd_map"))  # ICD maps: test_mimic_build


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_every_shipped_config_validates(path):
    cfg = load_config(path)
    assert from_dict(to_dict(cfg)) == cfg  # survives the trip to a Ray worker as plain data


def test_seed_settings_in_llava_med_config():
    cfg = load_config(REPO / "configs" / "llava_med_7b.yaml")
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == (64, 128, 0.05)
    assert (cfg.train.lr, cfg.train.micro_batch_size, cfg.train.grad_accum, cfg.train.epochs) == (2e-4, 4, 4, 3)
    assert (cfg.train.warmup_steps, cfg.curriculum.stage_split) == (100, 0.35)
    assert cfg.model.dtype == "bf16" and cfg.model.gradient_checkpointing and cfg.model.tiny.image_size == 336


def test_overrides_parse_yaml_scalars():
    cfg = load_config(REPO / "configs" / "tiny.yaml", ["train.max_steps=7", "curriculum.stage_split=0.5",
                                                      "data.root=/x", "mlflow.tracking_uri=http://h:1"])
    assert (cfg.train.max_steps, cfg.curriculum.stage_split, cfg.data.root) == (7, 0.5, "/x")
    assert cfg.mlflow.tracking_uri == "http://h:1"


def test_all_problems_reported_at_once_with_key_names():
    with pytest.raises(ConfigError) as e:
        load_config(REPO / "configs" / "tiny.yaml", ["train.max_stepz=3", "train.lr=fast", "data.overlong=maybe",
                                                      "model.tiny.image_size=true"])
    msg = str(e.value)
    assert len(e.value.problems) == 4
    assert "train.max_stepz: unknown key" in msg and "train.lr: expected float" in msg
    assert "data.overlong: expected one of 'shorten_ehr', 'error'" in msg and "model.tiny.image_size: expected int" in msg


def test_range_checks():
    with pytest.raises(ConfigError, match="stage_split: must be in"):
        load_config(None, ["curriculum.stage_split=1.5"])
    with pytest.raises(ConfigError, match="not a multiple of patch_size"):
        load_config(None, ["model.tiny.image_size=100", "model.tiny.patch_size=32"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("nope.yaml")
