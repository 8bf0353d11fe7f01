"""Resume safety on the local runtime: a changed plan is refused key by key, a finished run is left alone, a replayed
step is never logged twice, LoRA dropout resumes exactly, incomplete bundles and foreign tiny bases are errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from conftest import REPO, tiny_overrides
from datasets_io.errors import LauncherError
from launcher.local import run_local


def make_cfg(data_root: Path, out: Path, **extra):
    from datasets_io.config import load_config

    return load_config(REPO / "configs" / "tiny.yaml", tiny_overrides(data_root, out, **extra))


def metric_steps(summary: dict, key: str) -> list[int]:
    import mlflow

    client = mlflow.MlflowClient(summary["tracking_uri"])
    return sorted(m.step for m in client.get_metric_history(summary["mlflow_run_id"], key))


@pytest.fixture(scope="module")
def finished_run(synth_dir, tmp_path_factory):
    """A finished 4-step run (its output dir), shared by the refusal tests."""
    out = tmp_path_factory.mktemp("finished")
    summary = run_local(make_cfg(synth_dir, out, **{"train.max_steps": "4"}), device="cpu", show_progress=False)
    assert summary["global_step"] == 4
    return out


def test_rng_of_every_device_round_trips():
    from training.engines import restore_rng, rng_tensors

    saved = rng_tensors()
    first = torch.rand(3)
    torch.rand(5)
    restore_rng(saved, Path("ckpt"))
    assert torch.equal(torch.rand(3), first)
    with pytest.raises(RuntimeError, match="RNG state saved for devices \\['cuda_0', 'torch_cpu'\\]"):
        restore_rng({**saved, "cuda_0": saved["torch_cpu"]}, Path("ckpt"))


def test_replayed_steps_are_not_logged_twice_and_dropout_resumes_exactly(synth_dir, tmp_path):
    extra = {"train.max_steps": "6", "lora.dropout": "0.05", "train.save_every": "2"}
    full = run_local(make_cfg(synth_dir, tmp_path / "full", **extra), device="cpu", show_progress=False)
    cfg = make_cfg(synth_dir, tmp_path / "split", **extra)
    first = run_local(cfg, device="cpu", stop_after=5, show_progress=False)
    assert metric_steps(first, "train/loss") == [1, 2, 3, 4, 5]
    # a crash after step 5: the newest checkpoint is step 4, so step 5 is trained (and would be logged) again
    shutil.rmtree(Path(first["checkpoints"]["step-000005"]))
    resumed = run_local(cfg, device="cpu", resume="auto", show_progress=False)
    assert resumed["losses"] == full["losses"]  # bit-exact with LoRA dropout: every generator was restored
    assert metric_steps(resumed, "train/loss") == [1, 2, 3, 4, 5, 6]  # step 5 once


@pytest.mark.parametrize(
    "key,value,shown",
    [
        ("train.max_steps", "8", "total_steps: checkpoint 4, now 8"),
        ("train.micro_batch_size", "2", "train.micro_batch_size: checkpoint 4, now 2"),
        ("train.grad_accum", "2", "samples_per_step: checkpoint 4, now 8"),
        ("curriculum.stage_split", "0.5", "stage_a_steps: checkpoint 1, now 2"),
        ("curriculum.ehr_dropout", "0.3", "curriculum.ehr_dropout: checkpoint 0.15, now 0.3"),
        ("curriculum.replay_fraction", "0.25", "curriculum.replay_fraction: checkpoint 0.0, now 0.25"),
        ("train.seed", "7", "train.seed 0 (now 7)"),  # the tiny base is drawn with the seed: refused there first
    ],
)
def test_a_changed_plan_is_refused_naming_the_key(finished_run, synth_dir, key, value, shown):
    from datasets_io.config import load_config

    base = load_config(REPO / "configs" / "tiny.yaml", tiny_overrides(synth_dir, finished_run))
    assert str(getattr(getattr(base, key.split(".")[0]), key.split(".")[1])) != value  # it really is a change
    cfg = make_cfg(synth_dir, finished_run, **{"train.max_steps": "4", key: value})
    with pytest.raises(LauncherError, match="the run's plan changed|does not belong to this run's data") as e:
        run_local(cfg, device="cpu", resume="auto", show_progress=False)
    assert shown in str(e.value)


def test_other_training_data_is_refused(finished_run, synth_dir, tmp_path):
    import json

    from datasets_io.synth import write_synthetic

    # the same texts (so the same tiny base), two Stage A rows' images swapped: the cursor would point elsewhere
    moved = tmp_path / "moved"
    shutil.copytree(synth_dir, moved)
    train = moved / "curriculum_train.jsonl"
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    a = [i for i, r in enumerate(rows) if r["stage"] == "A"][:2]
    rows[a[0]]["image"], rows[a[1]]["image"] = rows[a[1]]["image"], rows[a[0]]["image"]
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(LauncherError, match="training data: checkpoint '[0-9a-f]+', now '[0-9a-f]+'"):
        run_local(
            make_cfg(moved, finished_run, **{"train.max_steps": "4"}), device="cpu", resume="auto", show_progress=False
        )
    # other texts in the same output dir: the tiny base (its tokenizer) is not silently reused, fresh or resumed
    other = tmp_path / "other"
    write_synthetic(other, 30, seed=5, image_size=(128, 128), progress=False)
    with pytest.raises(
        LauncherError, match="does not belong to this run's data and settings: it was built from corpus_texts"
    ):
        run_local(make_cfg(other, finished_run, **{"train.max_steps": "4"}), device="cpu", show_progress=False)


def test_resuming_a_finished_run_does_nothing(finished_run, synth_dir, capsys):
    final = finished_run / "checkpoints" / "final" / "trainer_state.json"
    before = final.stat().st_mtime_ns
    steps_before = len(metric_steps(_summary(finished_run), "train/loss"))
    out = run_local(
        make_cfg(synth_dir, finished_run, **{"train.max_steps": "4", "mlflow.register_at_end": "true"}),
        device="cpu",
        resume="auto",
        show_progress=False,
    )
    assert out["already_complete"] is True and out["global_step"] == 4 and "registered" not in out
    assert "already complete (4/4 steps); nothing to do" in capsys.readouterr().out
    assert final.stat().st_mtime_ns == before  # `final` not saved again
    assert len(metric_steps(_summary(finished_run), "train/loss")) == steps_before


def _summary(out: Path) -> dict:
    import json

    return json.loads((out / "run_summary.json").read_text())


def test_missing_adapter_tensors_are_an_error(finished_run, synth_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    out = tmp_path / "copy"
    shutil.copytree(finished_run, out)
    ckpt = out / "checkpoints" / "final"
    tensors = load_file(str(ckpt / "adapter_model.safetensors"))
    kept = {k: v for k, v in tensors.items() if "multi_modal_projector" not in k}
    assert len(kept) < len(tensors)
    save_file(kept, str(ckpt / "adapter_model.safetensors"))
    # point the copy's checkpoint at its own tiny base and ask for more steps with the same plan: resume from `final`
    from training.model import load_adapter_weights
    from launcher.local import corpus_texts, load_run_data
    from training.model import build_model

    cfg = make_cfg(synth_dir, out, **{"train.max_steps": "4"})
    bundle = build_model(cfg, corpus_texts(load_run_data(cfg)))
    with pytest.raises(
        LauncherError,
        match="trained tensor\\(s\\) missing from adapter_model.safetensors, e.g. "
        "\\['base_model.model.model.multi_modal_projector",
    ):
        load_adapter_weights(bundle.model, ckpt)
