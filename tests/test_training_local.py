"""The model, the loop and the local runtime on a tiny model built from config (seconds per run, no download)."""

import json
import os
from pathlib import Path

import pytest
import torch

from datasets_io.errors import LauncherError
from launcher.local import resolve_device, run_local

EXPECTED_BUNDLE = {
    "adapter_config.json",
    "adapter_model.safetensors",
    "config.yaml",
    "optimizer.safetensors",
    "rng_state.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "trainer_state.json",
    "README.md",
}


def test_device_resolution():
    assert resolve_device("auto", ["cuda", "mps", "cpu"]) == "cuda"
    assert resolve_device("auto", ["mps", "cpu"]) == "mps"
    assert resolve_device("auto", ["cpu"]) == "cpu"
    with pytest.raises(LauncherError, match="--device cuda: not available on this machine \\(available: cpu\\)"):
        resolve_device("cuda", ["cpu"])
    with pytest.raises(LauncherError, match="--device mps: not available"):
        resolve_device("mps", ["cpu"])


def test_lora_only_in_the_language_model(tiny_cfg):
    from launcher.local import corpus_texts, load_run_data
    from training.model import build_model

    cfg = tiny_cfg(**{"model.train_vision_tower": "false", "model.train_token_embeddings": "false"})
    bundle = build_model(cfg, corpus_texts(load_run_data(cfg)))
    lora = [n for n, _ in bundle.model.named_parameters() if "lora_" in n]
    assert lora and all(".language_model.layers." in n for n in lora)
    assert not any("vision_tower" in n for n in lora)
    kinds = {n.split(".")[-4] for n in lora}  # ...q_proj.lora_A.default.weight
    assert kinds == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    trainable = {n for n, p in bundle.model.named_parameters() if p.requires_grad}
    assert trainable == set(lora) | {n for n in trainable if "multi_modal_projector.modules_to_save" in n}


def model_and_stage_b_batch(cfg, rows: int, spec, prompt_loss: bool = False):
    """The tiny model built from `cfg` and one Stage B batch of its training data (the first `rows` positions); with
    `prompt_loss` the batch has `prompt_labels` too."""
    from launcher.local import corpus_texts, load_run_data
    from training.data import Preprocessor, StageStream, to_torch
    from training.model import build_model

    data = load_run_data(cfg)
    bundle = build_model(cfg, corpus_texts(data))
    pre = Preprocessor(
        bundle.tokenizer,
        bundle.image_spec,
        bundle.image_token_id,
        bundle.num_image_tokens,
        512,
        "shorten_ehr",
        cfg.data.root,
        prompt_loss=prompt_loss,
    )
    stream = StageStream("B", data.train["B"], spec)
    return bundle, to_torch(pre.batch([stream.item(i) for i in range(rows)]))


def test_after_a_step_only_adapter_and_projector_changed(tiny_cfg):
    from training.data import StreamSpec
    from training.engines import AccelerateEngine

    cfg = tiny_cfg(**{"model.train_vision_tower": "false", "model.train_token_embeddings": "false", "train.lr": "0.01"})
    bundle, batch = model_and_stage_b_batch(cfg, 4, StreamSpec(0))
    before = {n: p.detach().clone() for n, p in bundle.model.named_parameters()}
    engine = AccelerateEngine(bundle.model, cfg.train, "cpu")
    engine.forward_backward(batch, 1.0)
    engine.optimizer_step(1.0)
    changed = {n for n, p in bundle.model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed and all("lora_" in n or "multi_modal_projector.modules_to_save" in n for n in changed)
    assert any("lora_B" in n for n in changed) and any("multi_modal_projector" in n for n in changed)


def test_label_loss_equals_the_models_own_loss_and_gradients(tiny_cfg):
    from training.data import StreamSpec
    from training.model import label_loss

    bundle, batch = model_and_stage_b_batch(tiny_cfg(), 6, StreamSpec(0, ehr_dropout=0.5))  # mixed lengths: padding
    batch.pop("shortened", None)
    model = bundle.model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    ours = label_loss(model, batch)
    g_ours = torch.autograd.grad(ours, params, allow_unused=True)  # CLIP's unused post-layernorm
    theirs = model(**batch).loss
    g_theirs = torch.autograd.grad(theirs, params, allow_unused=True)
    assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-6)
    assert [a is None for a in g_ours] == [b is None for b in g_theirs]
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-7) for a, b in zip(g_ours, g_theirs) if a is not None)
    first = int((batch["labels"][0] != -100).nonzero()[0])
    batch["labels"][0, first : first + 3] = -100  # it follows the labels, not a fixed layout
    changed = label_loss(model, batch)
    assert not torch.allclose(changed, theirs) and torch.allclose(changed, model(**batch).loss, rtol=1e-5)
    batch["labels"][:] = -100  # nothing to learn from: zero loss and zero gradients, not NaN poisoning the step
    empty = label_loss(model, batch)
    empty.backward()
    assert float(empty) == 0.0 and all(p.grad is None or not p.grad.any() for p in params)


def test_prompt_loss_adds_the_prompts_own_mean_loss_at_its_weight(tiny_cfg):
    """loss = the target's mean next-token loss + w x the prompt's: each part is what the model's own loss gives with
    that part as its labels, so the parts' balance is w whatever their token counts."""
    from training.data import StreamSpec
    from training.model import label_loss

    bundle, batch = model_and_stage_b_batch(tiny_cfg(), 6, StreamSpec(0, ehr_dropout=0.5), prompt_loss=True)
    batch.pop("shortened", None)
    prompt = batch.pop("prompt_labels")
    assert int((prompt != -100).sum()) > 100 and int((batch["labels"] != -100).sum()) > 100  # both parts present
    assert not ((prompt != -100) & (batch["labels"] != -100)).any()  # no token is in both parts
    model = bundle.model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    target_only = label_loss(model, batch)
    prompt_part = model(**dict(batch, labels=prompt)).loss
    for weight in (0.5, 1.0):
        ours = label_loss(model, dict(batch, prompt_labels=prompt), weight)
        theirs = model(**batch).loss + weight * prompt_part
        assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-6), (weight, ours, theirs)
    g_ours = torch.autograd.grad(ours, params, allow_unused=True)
    g_theirs = torch.autograd.grad(theirs, params, allow_unused=True)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-7) for a, b in zip(g_ours, g_theirs) if a is not None)
    assert torch.allclose(label_loss(model, dict(batch, prompt_labels=prompt), 0.0), target_only)  # weight 0: off
    assert float(prompt_part) > 0.1 and not torch.allclose(ours, target_only)


def test_run_writes_bundle_summary_and_mlflow(tiny_cfg):
    cfg = tiny_cfg(**{"train.grad_accum": "2", "train.max_steps": "5", "mlflow.log_checkpoints": "true"})
    env_before = os.environ.get("MLFLOW_TRACKING_URI")
    summary = run_local(cfg, device="cpu", show_progress=False)
    assert os.environ.get("MLFLOW_TRACKING_URI") == env_before  # no global state leaks into the next run
    out = Path(cfg.output.dir)
    assert summary["global_step"] == 5 and summary["stage_switch_step"] == 2  # round(0.35 * 5) optimizer steps
    on_disk = json.loads((out / "run_summary.json").read_text())
    for key in ("global_step", "stage_switch_step", "final_loss", "mlflow_run_id", "checkpoints"):
        assert on_disk[key] is not None
    final = out / "checkpoints" / "final"
    assert {p.name for p in final.iterdir()} == EXPECTED_BUNDLE
    state = json.loads((final / "trainer_state.json").read_text())
    # the cursor counts global positions: 2 x 4 samples per optimizer step, drawn only from the step's stage
    assert state["cursor"] == {"A": 2 * 8, "B": 3 * 8} and state["stage"] == "done"
    a_end = json.loads((out / "checkpoints" / "stage_A_end" / "trainer_state.json").read_text())
    assert a_end["global_step"] == 2 and a_end["cursor"] == {"A": 16, "B": 0} and a_end["stage"] == "B"

    import mlflow

    client = mlflow.MlflowClient(on_disk["tracking_uri"])
    run = client.get_run(on_disk["mlflow_run_id"])
    assert run.data.params["curriculum.stage_split"] == "0.35" and run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [1, 2, 3, 4, 5]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "curriculum/stage_switch")] == [2]
    assert run.data.tags["stage_switch_step"] == "2" and run.data.tags["checkpoint.final"] == str(final)
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")}
    assert logged == {"checkpoints/stage_A_end", "checkpoints/final"}


def test_bundle_loads_with_plain_peft_and_gives_the_same_logits(tiny_cfg):
    from peft import PeftModel
    from transformers import LlavaForConditionalGeneration

    from launcher.local import corpus_texts, load_run_data
    from training.data import Preprocessor, StageStream, StreamSpec, to_torch
    from training.model import build_model

    cfg = tiny_cfg(**{"train.max_steps": "3"})
    summary = run_local(cfg, device="cpu", show_progress=False)
    final = summary["checkpoints"]["final"]
    base = LlavaForConditionalGeneration.from_pretrained(Path(cfg.output.dir) / "base_model")
    model = PeftModel.from_pretrained(base, final).eval()
    # the same trained weights, reached a second way: the run's own model after training, rebuilt from the bundle
    data = load_run_data(cfg)
    bundle = build_model(cfg, corpus_texts(data))
    pre = Preprocessor(
        bundle.tokenizer,
        bundle.image_spec,
        bundle.image_token_id,
        bundle.num_image_tokens,
        512,
        "shorten_ehr",
        cfg.data.root,
    )
    batch = to_torch(pre.batch([StageStream("B", data.train["B"], StreamSpec(0)).item(i) for i in range(2)]))
    batch.pop("labels")
    with torch.no_grad():
        trained = model(**batch).logits
        untrained = bundle.model.eval()(**batch).logits
    from safetensors.torch import load_file

    saved = load_file(str(Path(final) / "adapter_model.safetensors"))
    assert any("multi_modal_projector" in k for k in saved)  # projector travels with the adapter
    assert not any(
        "lora" not in k
        and "modules_to_save" not in k
        and "multi_modal_projector" not in k
        and "vision_tower" not in k
        and "embed_tokens" not in k
        and "lm_head" not in k
        for k in saved
    )
    assert not torch.allclose(trained, untrained)  # the bundle carries the training
    model.load_adapter(final, adapter_name="again")
    model.set_adapter("again")
    with torch.no_grad():
        assert torch.allclose(model(**batch).logits, trained, atol=1e-6)


def test_resume_is_exact(tiny_cfg, tmp_path):
    steps = {"train.max_steps": "6"}
    full = run_local(tiny_cfg(**steps, **{"output.dir": str(tmp_path / "full")}), device="cpu", show_progress=False)
    cfg = tiny_cfg(**steps, **{"output.dir": str(tmp_path / "split")})
    first = run_local(cfg, device="cpu", stop_after=4, show_progress=False)
    assert first["global_step"] == 4 and "step-000004" in first["checkpoints"]
    resumed = run_local(cfg, device="cpu", resume="auto", show_progress=False)
    assert resumed["global_step"] == 6
    assert resumed["losses"] == full["losses"]  # bit-exact on CPU fp32, same seed
    assert resumed["mlflow_run_id"] == first["mlflow_run_id"]  # the same MLflow run continues


def test_resume_fails_loudly(tiny_cfg):
    cfg = tiny_cfg()
    with pytest.raises(LauncherError, match="no checkpoint under"):
        run_local(cfg, device="cpu", resume="auto", show_progress=False)
    with pytest.raises(LauncherError, match="not a checkpoint directory"):
        run_local(cfg, device="cpu", resume="/nonexistent/ckpt", show_progress=False)


def test_unreachable_tracking_server_fails_before_training(tiny_cfg):
    cfg = tiny_cfg(**{"mlflow.tracking_uri": "http://127.0.0.1:9"})
    with pytest.raises(LauncherError, match="MLflow tracking server http://127.0.0.1:9 is not reachable"):
        run_local(cfg, device="cpu", show_progress=False)
    assert not (Path(cfg.output.dir) / "checkpoints").exists()


def test_cli_local_reports_clear_errors(tmp_path, capsys):
    from launcher.cli import main

    assert main(["local", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err


@pytest.mark.slow
def test_tiny_end_to_end_loss_goes_down(tiny_cfg):
    summary = run_local(
        tiny_cfg(**{"train.max_steps": "40", "train.lr": "0.003", "train.warmup_steps": "4"}),
        device="cpu",
        show_progress=False,
    )
    losses = summary["losses"]
    a_end = summary["stage_switch_step"]
    assert sum(losses[:3]) / 3 > 1.5 * sum(losses[a_end - 3 : a_end]) / 3  # Stage A learns
    assert sum(losses[-3:]) / 3 < sum(losses[a_end : a_end + 3]) / 3  # and Stage B keeps learning
