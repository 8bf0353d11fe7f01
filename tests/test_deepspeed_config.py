"""The DeepSpeed JSON is a pure function of the typed config and the world size; the DeepSpeedEngine keeps the loop's
contract (accumulation, per-group lr, grad norm, gathered adapter saving, exact resume) under ZeRO-2 and ZeRO-3.

    python -m pytest tests/test_deepspeed_config.py -q

The engine checks run DeepSpeed in a child process (world size 1, gloo on 127.0.0.1): DeepSpeed and transformers keep
process-global state (the ZeRO-3 config weakref, the comm backend) that must not leak into other tests.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from datasets_io.config import load_config
from datasets_io.errors import LauncherError
from training.deepspeed_engine import deepspeed_config, resolve_ds_dtype

REPO = Path(__file__).resolve().parents[1]


def cfg_with(**sets):
    return load_config(REPO / "configs" / "tiny.yaml", [f"{k}={v}" for k, v in sets.items()])


@pytest.mark.parametrize(
    "stage, dtype, micro, accum, world, clip",
    [
        (2, "fp32", 4, 1, 2, 1.0),
        (3, "fp32", 4, 2, 2, 1.0),
        (2, "bf16", 16, 4, 8, 0.5),
        (3, "bf16", 1, 16, 64, 0.0),
        (2, "fp16", 2, 3, 5, 1.0),
    ],
)
def test_deepspeed_config_table(stage, dtype, micro, accum, world, clip):
    cfg = cfg_with(
        **{
            "deepspeed.zero_stage": stage,
            "train.micro_batch_size": micro,
            "train.grad_accum": accum,
            "train.max_grad_norm": clip,
        }
    )
    ds = deepspeed_config(cfg, world, dtype)
    assert ds["train_batch_size"] == micro * accum * world
    assert ds["train_micro_batch_size_per_gpu"] == micro
    assert ds["gradient_accumulation_steps"] == accum
    assert ds["gradient_clipping"] == clip
    assert ds["zero_optimization"]["stage"] == stage
    assert ds["bf16"]["enabled"] is (dtype == "bf16")
    assert ds["fp16"]["enabled"] is (dtype == "fp16")
    assert ("stage3_param_persistence_threshold" in ds["zero_optimization"]) is (stage == 3)
    # a torch optimizer is passed in: an optimizer/scheduler section would make DeepSpeed JIT-build its own
    assert "optimizer" not in ds and "scheduler" not in ds
    assert "offload_optimizer" not in ds["zero_optimization"]
    json.dumps(ds)  # plain JSON


def test_deepspeed_config_options_and_errors():
    cfg = cfg_with(
        **{
            "deepspeed.zero_stage": 3,
            "deepspeed.offload_optimizer": "true",
            "deepspeed.stage3_param_persistence_threshold": 0,
        }
    )
    ds = deepspeed_config(cfg, 4, "bf16")
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_optimization"]["stage3_param_persistence_threshold"] == 0
    with pytest.raises(ValueError, match="dtype"):
        deepspeed_config(cfg, 2, "float32")
    with pytest.raises(ValueError, match="world_size"):
        deepspeed_config(cfg, 0, "fp32")


def test_resolve_ds_dtype():
    assert resolve_ds_dtype("auto", use_gpu=False) == "fp32"
    assert resolve_ds_dtype("auto", use_gpu=True) == "bf16"
    assert resolve_ds_dtype("fp16", use_gpu=True) == "fp16"
    with pytest.raises(LauncherError, match="fp32"):
        resolve_ds_dtype("bf16", use_gpu=False)


def test_deepspeed_accepts_the_generated_config():
    """DeepSpeed's own parser (world size 1 outside a process group) takes it, batch identity included."""
    from deepspeed.runtime.config import DeepSpeedConfig

    for stage in (2, 3):
        cfg = cfg_with(**{"deepspeed.zero_stage": stage, "train.grad_accum": 3})
        parsed = DeepSpeedConfig(deepspeed_config(cfg, 1, "fp32"))
        assert parsed.train_batch_size == cfg.train.micro_batch_size * 3
        assert parsed.zero_optimization_stage == stage


def test_every_shipped_config_gives_a_deepspeed_config():
    for path in sorted((REPO / "configs").glob("*.yaml")):
        if path.name.startswith("icd_map"):  # ICD maps, not run configs
            continue
        cfg = load_config(path)
        ds = deepspeed_config(cfg, cfg.ray.num_workers, resolve_ds_dtype(cfg.model.dtype, cfg.ray.use_gpu))
        assert ds["train_batch_size"] == cfg.train.micro_batch_size * cfg.train.grad_accum * cfg.ray.num_workers


# ------------------------------------------------------------------------------------------ the engine (child process)
ENGINE_CHECK = r"""
import json, os, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
import torch, torch.distributed as dist
from conftest import tiny_overrides
from datasets_io.config import load_config
from launcher.local import corpus_texts, load_run_data
from training.recipe import build_lora_model
from training.model import resolve_base_path
from training.data import Preprocessor, to_torch
from training.deepspeed_engine import (DeepSpeedEngine, deepspeed_config, init_deepspeed_comm, prepare_deepspeed_cpu,
                                       zero3_init)

out = Path(sys.argv[1])
dist.init_process_group("gloo", rank=0, world_size=1)
prepare_deepspeed_cpu(); init_deepspeed_comm()
cfg = load_config({config!r}, tiny_overrides(Path({data!r}), out, **{{"train.grad_accum": 2,
                                                                     "train.projector_lr": 1e-3}}))
data = load_run_data(cfg)
resolve_base_path(cfg, corpus_texts(data))  # builds the tiny base once
rows = data.train["A"][:12]

def fresh():
    return build_lora_model(cfg, resolve_base_path(cfg, None))

ref = fresh()  # plain torch reference, built before ZeRO-3's init context exists
pre = Preprocessor(ref.tokenizer, ref.image_spec, ref.image_token_id, ref.num_image_tokens, cfg.data.max_seq_len,
                   cfg.data.overlong, cfg.data.root)
batches = [to_torch(pre.batch([(r.prompt, r.target, r.image, r.where) for r in rows[i:i + 4]])) for i in (0, 4, 8)]
loss = (ref.model(**batches[0]).loss + ref.model(**batches[1]).loss) / 2
loss.backward()
ref_norm = float(torch.nn.utils.clip_grad_norm_([p for p in ref.model.parameters() if p.requires_grad], 1e9))

results = {{}}
for stage in (2, 3):  # ZeRO-2 first: zero3_init switches transformers into partitioned loading for good
    ds = deepspeed_config(load_config({config!r}, tiny_overrides(Path({data!r}), out, **{{
        "deepspeed.zero_stage": stage, "deepspeed.stage3_param_persistence_threshold": 0, "train.grad_accum": 2,
        "train.projector_lr": 1e-3}})), 1, "fp32")
    zero3_init(ds)
    bundle = fresh()
    eng = DeepSpeedEngine(bundle.model, cfg.train, ds)
    full = lambda: {{n: t.clone() for n, t in eng.gathered_adapter_state().items()}}
    before = full()
    eng.forward_backward(batches[0], 0.5)
    mid = full()
    eng.forward_backward(batches[1], 0.5)
    norm = eng.optimizer_step(0.5)
    after = full()
    groups = {{g["name"]: g["lr"] for g in eng.optimizer.param_groups}}
    fused = [g["fused"] for g in eng.optimizer.param_groups]
    ckpt = out / f"bundle{{stage}}"
    ckpt.mkdir()
    eng.save_adapter(ckpt)
    meta = eng.save_training_state(ckpt)
    # the next step from here, then the same step from a fresh engine that loaded the checkpoint
    eng.forward_backward(batches[2], 0.5); eng.forward_backward(batches[0], 0.5); eng.optimizer_step(1.0)
    next_loss = float(eng.eval_loss(batches[1]))
    eng2 = DeepSpeedEngine(fresh().model, cfg.train, ds)
    eng2.load_training_state(ckpt, meta)
    eng2.forward_backward(batches[2], 0.5); eng2.forward_backward(batches[0], 0.5); eng2.optimizer_step(1.0)
    resumed_loss = float(eng2.eval_loss(batches[1]))
    results[stage] = {{
        "ref_norm": ref_norm, "norm": norm, "groups": groups, "fused": fused,
        "zero_params": sum(1 for p in bundle.model.parameters() if p.numel() == 0),
        "changed_mid": [n for n in before if not torch.equal(before[n], mid[n])],
        "changed": sorted(n for n in before if not torch.equal(before[n], after[n])),
        "trainable": sorted(before), "shapes": {{n: list(t.shape) for n, t in after.items()}},
        "next_loss": next_loss, "resumed_loss": resumed_loss, "meta": meta,
        "engine_files": sorted(p.name for p in (ckpt / "engine").iterdir()),
    }}
import deepspeed.runtime.compiler
results["inductor_imported"] = "torch._inductor.compile_fx" in sys.modules  # DeepSpeed's Muon module: uncompiled
results["torch_compile_restored"] = deepspeed.runtime.compiler.compile() is torch.compile
json.dump(results, open(out / "result.json", "w"))
dist.destroy_process_group()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_deepspeed_engine_contract(synth_dir, tmp_path):
    """ZeRO-2 then ZeRO-3, world size 1. ZeRO-3 still partitions every parameter (persistence threshold 0), so the
    live module holds Size([0]) tensors and saving must gather. DeepSpeed's Muon module is imported uncompiled
    (training.deepspeed_engine.import_muon_uncompiled): no torch._inductor import, torch.compile left as it was."""
    script = tmp_path / "check.py"
    script.write_text(
        ENGINE_CHECK.format(tests=str(REPO / "tests"), config=str(REPO / "configs" / "tiny.yaml"), data=str(synth_dir))
    )
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "HF_HUB_OFFLINE": "1",
    }
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], env=env, cwd=REPO, capture_output=True, text=True, timeout=400
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads((tmp_path / "result.json").read_text())
    # two engines per stage stepped without importing torch._inductor (import_muon_uncompiled: ~1 s per worker)
    assert results.pop("inductor_imported") is False and results.pop("torch_compile_restored") is True
    from safetensors.torch import load_file

    for stage in (2, 3):
        r = results[str(stage)]
        # DeepSpeed's accumulation (engine.backward scales by 1/accum) and norm equal the plain-torch gradient
        assert r["norm"] == pytest.approx(r["ref_norm"], rel=1e-4), stage
        assert r["changed_mid"] == []  # no optimizer step before the accumulation boundary
        assert r["changed"] and set(r["changed"]) <= set(r["trainable"])
        assert any("lora_" in n for n in r["changed"]) and any("multi_modal_projector" in n for n in r["changed"])
        assert r["groups"]["lora"] == pytest.approx(0.5 * 2.5e-3)  # each group: its own base lr x the loop's factor
        assert r["groups"]["projector"] == pytest.approx(0.5 * 1e-3)
        assert r["fused"] == [True, True]  # ZeRO steps the client AdamW's fused kernel (make_optimizer)
        assert (r["zero_params"] > 0) is (stage == 3)  # ZeRO-3's live module really is partitioned
        assert all(0 not in shape for shape in r["shapes"].values())
        assert r["resumed_loss"] == pytest.approx(r["next_loss"], abs=1e-6)  # weights + Adam state restored exactly
        assert r["meta"]["zero_stage"] == stage and r["meta"]["world_size"] == 1
        assert any(f.endswith("optim_states.pt") for f in r["engine_files"])
        # the adapter bundle is plain PEFT with full-shape tensors
        saved = load_file(str(tmp_path / f"bundle{stage}" / "adapter_model.safetensors"))
        assert saved and all(t.numel() > 0 for t in saved.values())
        assert (tmp_path / f"bundle{stage}" / "adapter_config.json").is_file()
