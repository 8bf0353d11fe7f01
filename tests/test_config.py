"""The typed config: every shipped YAML validates, overrides apply, all problems are reported at once."""

from pathlib import Path

import pytest

from datasets_io.config import ConfigError, from_dict, load_config
from datasets_io.errors import LauncherError

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted(
    p for p in (REPO / "configs").glob("*.yaml") if not p.name.startswith("icd_map")
)  # ICD maps: test_mimic_build


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_every_shipped_config_validates(path):
    cfg = load_config(path)
    assert from_dict(cfg.model_dump()) == cfg  # survives the trip to a Ray worker as plain data


def test_seed_settings_in_llava_med_config():
    cfg = load_config(REPO / "configs" / "llava_med_7b.yaml")
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == (64, 128, 0.05)
    assert (cfg.train.lr, cfg.train.micro_batch_size, cfg.train.grad_accum, cfg.train.epochs) == (2e-4, 4, 4, 3)
    assert (cfg.train.warmup_steps, cfg.curriculum.stage_split) == (100, 0.35)
    assert cfg.model.dtype == "bf16" and cfg.model.gradient_checkpointing and cfg.model.tiny.image_size == 336


def test_an_int_given_for_a_float_is_stored_as_a_float():
    # `epochs: 3` in the YAML: saved configs, MLflow params and resume keys hold 3.0 as they always have
    cfg = load_config(REPO / "configs" / "llava_med_7b.yaml")
    assert type(cfg.train.epochs) is float and type(cfg.ray.cpus_per_worker) is float
    assert repr(cfg.model_dump()["train"]["epochs"]) == "3.0"


def test_overrides_parse_yaml_scalars():
    cfg = load_config(
        REPO / "configs" / "tiny.yaml",
        ["train.max_steps=7", "curriculum.stage_split=0.5", "data.root=/x", "mlflow.tracking_uri=http://h:1"],
    )
    assert (cfg.train.max_steps, cfg.curriculum.stage_split, cfg.data.root) == (7, 0.5, "/x")
    assert cfg.mlflow.tracking_uri == "http://h:1"


def test_exponent_floats_are_numbers_in_files_and_overrides(tmp_path):
    # YAML 1.1 (PyYAML) reads `1e-3` as a string: `lr: 1e-3` was refused as "expected a valid number, got '1e-3'"
    path = tmp_path / "c.yaml"
    path.write_text((REPO / "configs" / "tiny.yaml").read_text().replace("lr: 2.5e-3", "lr: 2e-3", 1))
    cfg = load_config(path, ["train.projector_lr=5E-4", "train.weight_decay=1e-2", "output.dir=1e3x"])
    assert (cfg.train.lr, cfg.train.projector_lr, cfg.train.weight_decay) == (0.002, 0.0005, 0.01)
    assert cfg.output.dir == "1e3x"  # not a number: stays a string


def test_the_former_prompt_loss_key_still_loads(tmp_path):
    # bundles trained by 458350d..7662a02 carry `train.prompt_loss` in their config.yaml: they must still evaluate,
    # register and serve
    text = (REPO / "configs" / "tiny.yaml").read_text()
    assert "  prompt_loss_weight: 0.5" in text
    for legacy, weight in (("true", 1.0), ("false", 0.0)):
        path = tmp_path / f"{legacy}.yaml"
        path.write_text(text.replace("  prompt_loss_weight: 0.5", f"  prompt_loss: {legacy}", 1))
        assert load_config(path).train.prompt_loss_weight == weight
    path.write_text(text.replace("  prompt_loss_weight: 0.5", "  prompt_loss: sometimes", 1))
    with pytest.raises(ConfigError, match="prompt_loss .now prompt_loss_weight.: expected true or false"):
        load_config(path)


def test_all_problems_reported_at_once_with_key_names():
    with pytest.raises(ConfigError) as e:
        load_config(
            REPO / "configs" / "tiny.yaml",
            [
                "train.max_stepz=3",
                "train.lr=fast",
                "data.overlong=maybe",
                "model.tiny.image_size=true",
                "curriculum.stage_split=1.5",
            ],
        )
    msg = str(e.value)
    assert isinstance(e.value, LauncherError) and msg.startswith(f"{REPO / 'configs' / 'tiny.yaml'}: 5 problem(s):")
    assert sorted(e.value.problems) == [
        "curriculum.stage_split: must be <= 1, got 1.5",
        "data.overlong: expected 'shorten_ehr' or 'error', got 'maybe'",
        "model.tiny.image_size: expected a valid integer, got True",
        "train.lr: expected a valid number, got 'fast'",
        "train.max_stepz: unknown key (known: epochs, eval_every, global_batch_size, grad_accum, keep_last, "
        "log_every, lr, max_grad_norm, max_steps, micro_batch_size, min_lr_ratio, num_workers, packing, packing_forwards, "
        "projector_lr, prompt_loss_weight, "
        "record_data_order, save_every, seed, val_batches, warmup_steps, weight_decay)",
    ]


@pytest.mark.parametrize(
    "overrides, problem",
    [
        (["curriculum.stage_split=-0.1"], "curriculum.stage_split: must be >= 0, got -0.1"),
        (["curriculum.replay_fraction=1"], "curriculum.replay_fraction: must be < 1, got 1"),
        (["train.lr=0"], "train.lr: must be > 0, got 0"),
        (["train.packing_forwards=0"], "train.packing_forwards: must be >= 1, got 0"),
        (["train.keep_last=0"], "train.keep_last: must be >= 1, got 0"),
        (["train.max_steps=0", "train.epochs=0"], "train.epochs: must be > 0 when train.max_steps is 0, got 0.0"),
        (
            ["train.micro_batch_size=4", "train.global_batch_size=6"],
            "train.global_batch_size: 6 is not a multiple of train.micro_batch_size 4",
        ),
        (["data.max_seq_len=8"], "data.max_seq_len: must be >= 16, got 8"),
        (["model.tiny.image_size=100"], "model.tiny.patch_size: image_size 100 is not a multiple of patch_size 32"),
        (["model.tiny.text_kv_heads=4"], "model.tiny.text_kv_heads: text_heads 6 is not a multiple of text_kv_heads 4"),
        (["model.tiny.patch_size=0"], "model.tiny.patch_size: must be >= 1, got 0"),
        (["ray.num_workers=0"], "ray.num_workers: must be >= 1, got 0"),
        (["ray.cpus_per_worker=0"], "ray.cpus_per_worker: must be > 0, got 0"),
        (["ray.max_failures=-1"], "ray.max_failures: must be >= 0, got -1"),
        (["ray.num_to_keep=0"], "ray.num_to_keep: must be >= 1, got 0"),
        (["data=3"], "data: expected a valid dictionary or instance of DataConfig, got 3"),
        (["deepspeed.zero_stage=4"], "deepspeed.zero_stage: expected 0, 1, 2 or 3, got 4"),
        (["lora.target_modules=q_proj"], "lora.target_modules: expected a valid list, got 'q_proj'"),
        (["nope=1"], "nope: unknown key (known: curriculum, data, deepspeed, lora, mlflow, model, output, ray, train)"),
        (["train.lr"], "--set 'train.lr': expected key=value"),
    ],
)
def test_each_check_names_its_dotted_key(overrides, problem):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert e.value.problems == [problem] and str(e.value).startswith("defaults: 1 problem(s):")


def test_the_config_file_is_named():
    with pytest.raises(ConfigError, match="(?s)nope.yaml: 1 problem.*config file not found"):
        load_config("nope.yaml")


def test_a_file_that_is_not_a_mapping(tmp_path):
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="(?s)list.yaml: 1 problem.*expected a mapping of sections, got list"):
        load_config(tmp_path / "list.yaml", ["train.lr=1"])
