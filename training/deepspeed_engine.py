"""The DeepSpeed ZeRO-2/3 engine the Ray workers use: the same Engine interface as `training.engines.AccelerateEngine`.

    ds_config = deepspeed_config(cfg, world_size=2, dtype="fp32")   # pure: the JSON DeepSpeed gets (tested)
    keep = zero3_init(ds_config)          # ZeRO-3 only: from_pretrained then builds the model already partitioned
    bundle = build_model(cfg)             # LoRA on the LM, projector (and any fully trained module) in modules_to_save
    engine = DeepSpeedEngine(bundle.model, cfg.train, ds_config)

What differs from the local engine, and why:
- Gradient accumulation is DeepSpeed's: `engine.backward(loss)` scales by 1/grad_accum itself, and `engine.step()` is
  called per micro-batch (it only steps the optimizer at the accumulation boundary). The boundary micro-batch's
  `step()` is deferred to `optimizer_step(lr_factor)`, so the loop's one place that sets the lr and reads the grad
  norm stays the same for both engines.
- The optimizer is a plain torch AdamW with one parameter group per learning rate (LoRA, projector), built by
  `training.engines.make_optimizer`: naming an optimizer in the DeepSpeed JSON would JIT-compile FusedAdam/CPUAdam.
- Saving the adapter gathers the trainable parameters first (under ZeRO-3 each rank holds a 1/world slice and the
  module sees `Size([0])` tensors), then rank 0 writes a plain PEFT bundle from the gathered full tensors.
- Engine checkpoints (`save_checkpoint(dir, tag="engine", exclude_frozen_parameters=True)`) hold the fp32 master
  weights and optimizer partitions of the TRAINABLE parameters only: the frozen base is rebuilt from its source.
  Loading needs the same number of ranks (ZeRO partitions are per rank).
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any

import torch

from safetensors.torch import load_file, save_file

from training.engines import make_optimizer, restore_rng, rng_tensors, set_lr
from training.model import label_loss
from training.packing import model_layout, to_device

DTYPES = ("fp32", "bf16", "fp16")
ENGINE_SUBDIR = "engine"  # DeepSpeed's checkpoint tag: <checkpoint>/engine/{mp_rank_00_model_states,zero_pp_rank_*}.pt

_HF_DS_CONFIG: Any = None  # transformers keeps only a weakref to HfDeepSpeedConfig: this keeps it alive


def deepspeed_config(cfg: Any, world_size: int, dtype: str) -> dict:
    """The DeepSpeed JSON for this run, derived from the typed config and the world size (pure).

    `dtype` is the resolved training precision: fp32 (CPU), bf16 or fp16 (GPU). No optimizer or scheduler section:
    the engine passes a torch optimizer and sets the lr itself (see module docstring)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    t, ds = cfg.train, cfg.deepspeed
    micro, accum = t.micro_batch_size, t.grad_accum
    train_batch_size = micro * accum * world_size
    assert train_batch_size == micro * accum * world_size  # DeepSpeed re-checks this identity at initialize
    zero: dict[str, Any] = {
        "stage": ds.zero_stage,
        "contiguous_gradients": True,
        "overlap_comm": False,  # gloo on CPU has no side streams to overlap with; harmless to leave off on GPU
        "reduce_scatter": True,
    }
    if ds.zero_stage == 3:
        zero.update(
            {
                # Parameters smaller than this stay whole on every rank (fewer tiny all-gathers); 0 partitions all.
                "stage3_param_persistence_threshold": ds.stage3_param_persistence_threshold,
                "stage3_gather_16bit_weights_on_model_save": False,  # the adapter is saved from gathered params instead
            }
        )
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return {
        "train_batch_size": train_batch_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": float(t.max_grad_norm) if t.max_grad_norm > 0 else 0.0,
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == "bf16"},
        "fp16": {"enabled": dtype == "fp16", "loss_scale": 0, "initial_scale_power": 16, "min_loss_scale": 1},
        "zero_allow_untested_optimizer": True,  # the client torch AdamW
        "zero_force_ds_cpu_optimizer": False,  # offload with a torch optimizer: slower than CPUAdam, but no JIT build
        "steps_per_print": 10**9,  # the loop logs; DeepSpeed's own step prints are noise
        "wall_clock_breakdown": False,
    }


def resolve_ds_dtype(cfg_dtype: str, use_gpu: bool) -> str:
    """auto -> bf16 on GPU, fp32 on CPU; fp16/bf16 on CPU are refused (CPU DeepSpeed is tested in fp32)."""
    from datasets_io.errors import LauncherError

    choice = cfg_dtype if cfg_dtype != "auto" else ("bf16" if use_gpu else "fp32")
    if not use_gpu and choice != "fp32":
        raise LauncherError(
            f"model.dtype={choice} with the CPU DeepSpeed path: use model.dtype=fp32 (or auto), "
            "or --use-gpu on a GPU cluster"
        )
    return choice


def prepare_deepspeed_cpu() -> None:
    """Skip the JIT build of DeepSpeed's shared-memory comm op (about a minute per process on CPU).

    importlib, not `import deepspeed.ops`: a module attribute named `ops` in this file's globals would make
    cloudpickle choke when Ray ships the worker function."""
    ops = importlib.import_module("deepspeed.ops")
    ops.__compatible_ops__["deepspeed_shm_comm"] = False


MUON_MODULE = "deepspeed.runtime.zero.muon.original_muon"


def import_muon_uncompiled() -> None:
    """Import DeepSpeed's Muon optimizer module with its kernels left uncompiled, before `deepspeed.initialize` does.

    DeepSpeed imports that module in `deepspeed.initialize` (the ZeRO optimizer check) and in ZeRO's gradient
    reduction, only to test `isinstance(optimizer, MuonWithAuxAdam)`. It wraps its kernels in torch.compile at
    import, which imports torch._inductor: 1.1 of the 1.2 s `deepspeed.initialize` took for the tiny model on 2
    cores, on every worker's way to its first step. This launcher never trains with Muon (make_optimizer: AdamW), so
    the module is imported here with DeepSpeed's own no-op decorator (`deepspeed.runtime.compiler.dummy_decorator`,
    what DeepSpeed uses where torch has no compile) in place of torch.compile: the same classes, no inductor."""
    if MUON_MODULE in sys.modules:
        return
    compiler = importlib.import_module("deepspeed.runtime.compiler")
    compile_ = compiler.compile
    compiler.compile = lambda: compiler.dummy_decorator
    try:
        importlib.import_module(MUON_MODULE)
    finally:
        compiler.compile = compile_


def init_deepspeed_comm() -> None:
    """Put DeepSpeed's comm layer on the process group Ray Train made (gloo / NCCL). Must precede ZeRO-3 model
    building: `zero.Init` reads the world size from DeepSpeed's comm, which would otherwise say 1."""
    import deepspeed
    import torch.distributed as dist

    if not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialized (Ray Train's TorchTrainer sets it up)")
    deepspeed.init_distributed(dist_backend=dist.get_backend())


def zero3_init(ds_config: dict) -> Any:
    """Under ZeRO-3, make transformers build models inside `deepspeed.zero.Init` (partitioned as they load).
    Returns the HfDeepSpeedConfig (also kept alive here); None for other stages."""
    global _HF_DS_CONFIG
    if ds_config["zero_optimization"]["stage"] != 3:
        return None
    from transformers.integrations import HfDeepSpeedConfig

    _HF_DS_CONFIG = HfDeepSpeedConfig(ds_config)
    return _HF_DS_CONFIG


class DeepSpeedEngine:
    """ZeRO-2/3 over torch.distributed (NCCL on GPU, gloo on CPU). Every method that touches parameters or
    gradients is collective: all ranks must call it the same number of times (the loop guarantees this)."""

    def __init__(self, model: Any, train_cfg: Any, ds_config: dict):
        import deepspeed
        import torch.distributed as dist

        if not dist.is_initialized():
            raise RuntimeError("DeepSpeedEngine needs an initialized torch.distributed group (Ray Train makes one)")
        self.optimizer = make_optimizer(model, train_cfg)  # param groups carry base_lr: LoRA and projector rates
        import_muon_uncompiled()
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=self.optimizer, config=ds_config)
        self.grad_accum = ds_config["gradient_accumulation_steps"]
        self.prompt_weight = train_cfg.prompt_loss_weight
        self.zero_stage = ds_config["zero_optimization"]["stage"]
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.is_writer = self.rank == 0
        self.device = torch.device(self.engine.device)
        self.compute_dtype = (
            torch.bfloat16
            if ds_config["bf16"]["enabled"]
            else torch.float16
            if ds_config["fp16"]["enabled"]
            else torch.float32
        )
        self._boundary_pending = False

    # ------------------------------------------------------------------------------------------- one step
    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = to_device(batch, self.device)
        out["pixel_values"] = out["pixel_values"].to(self.compute_dtype)
        return out

    def forward_backward(self, batch: dict[str, torch.Tensor], scale: float) -> torch.Tensor:
        """One micro-batch. `scale` (1/grad_accum from the loop) is applied by DeepSpeed itself: engine.backward
        divides by gradient_accumulation_steps, so it is only checked here."""
        if abs(scale * self.grad_accum - 1.0) > 1e-6:
            raise ValueError(
                f"the loop's grad_accum (scale {scale}) != DeepSpeed's gradient_accumulation_steps {self.grad_accum}"
            )
        if not self.engine.training:  # train() walks every submodule: once after an evaluation, not every step
            self.engine.train()
        loss = label_loss(self.engine, self._to_device(batch), self.prompt_weight)
        self.engine.backward(loss)
        if self.engine.is_gradient_accumulation_boundary():
            self._boundary_pending = True  # the optimizer step happens in optimizer_step(), after the lr is set
        else:
            self.engine.step()  # not a boundary: DeepSpeed only advances its micro-step counter
        return loss.detach()

    def optimizer_step(self, lr_factor: float) -> float:
        if not self._boundary_pending:
            raise RuntimeError("optimizer_step() before a full accumulation window of forward_backward() calls")
        set_lr(self.optimizer, lr_factor)
        self.engine.step()  # boundary: clip, optimizer step, zero grads (ZeRO-partitioned)
        self._boundary_pending = False
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")  # host-device sync, once per optimizer step

    def reduce_mean(self, value: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        v = value.detach().to(self.device, torch.float32).clone()
        dist.all_reduce(v, op=dist.ReduceOp.SUM)
        return v / self.world_size

    def current_lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    @torch.no_grad()
    def eval_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        self.engine.eval()  # ZeRO-3: the forward all-gathers parameters, so every rank evaluates as many batches
        return label_loss(self.engine, self._to_device(batch), self.prompt_weight).detach()

    @torch.no_grad()
    def logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Eval-mode logits (rows, T, V) on this rank (collective under ZeRO-3), padded or packed batches alike (the
        forward arguments of training.packing.model_layout: no KV cache, so packed samples stay apart)."""
        self.engine.eval()
        inputs, _ = model_layout(self.engine, self._to_device(batch))
        return self.engine(**inputs).logits.float().cpu()

    def trainable_model(self) -> Any:
        return self.engine.module

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()

    # ------------------------------------------------------------------------------------------- saving
    def gathered_adapter_state(self) -> dict[str, torch.Tensor] | None:
        """Full-shape copies of the trainable parameters (collective: under ZeRO-3 they are all-gathered).
        Returns the dict on the writer rank, None elsewhere."""
        import deepspeed

        named = [(n, p) for n, p in self.engine.module.named_parameters() if p.requires_grad]
        with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
            if not self.is_writer:
                return None
            state = {n: p.detach().to("cpu", torch.float32).clone() for n, p in named}
        empty = [n for n, t in state.items() if t.numel() == 0]
        if empty:
            raise RuntimeError(f"gathered adapter has empty tensors (ZeRO-3 partitions leaked): {empty[:3]}")
        return state

    def save_adapter(self, out_dir: Path) -> None:
        """Plain PEFT bundle (adapter_config.json + adapter_model.safetensors) from gathered full tensors."""
        state = self.gathered_adapter_state()  # every rank takes part in the gather
        if self.is_writer:
            self.engine.module.save_pretrained(str(out_dir), state_dict=state, safe_serialization=True)

    def save_training_state(self, out_dir: Path) -> dict:
        """DeepSpeed's own checkpoint into <out_dir>/engine (collective; each rank writes its partitions)."""
        self.engine.save_checkpoint(str(out_dir), tag=ENGINE_SUBDIR, save_latest=False, exclude_frozen_parameters=True)
        save_file(rng_tensors(), str(out_dir / ENGINE_SUBDIR / f"rng_rank{self.rank}.safetensors"))  # per rank
        return {
            "kind": "deepspeed",
            "tag": ENGINE_SUBDIR,
            "zero_stage": self.zero_stage,
            "world_size": self.world_size,
            "global_steps": int(self.engine.global_steps),
        }

    def load_training_state(self, ckpt_dir: Path, meta: dict) -> None:
        if meta.get("kind") != "deepspeed":
            raise RuntimeError(
                f"{ckpt_dir}: not a DeepSpeed checkpoint (engine meta {meta}); "
                "a local-runtime checkpoint cannot resume a Ray/DeepSpeed run"
            )
        if meta["world_size"] != self.world_size or meta["zero_stage"] != self.zero_stage:
            raise RuntimeError(
                f"{ckpt_dir}: saved with {meta['world_size']} ranks / ZeRO-{meta['zero_stage']}, "
                f"now {self.world_size} / ZeRO-{self.zero_stage}: ZeRO partitions cannot be reloaded"
            )
        path, _ = self.engine.load_checkpoint(
            str(ckpt_dir),
            tag=meta["tag"],
            load_module_strict=False,
            load_optimizer_states=True,
            load_lr_scheduler_states=False,
        )
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load {ckpt_dir}/{meta['tag']}")
        # each rank's generators as they were at the checkpoint (LoRA dropout), not a reseed; DeepSpeed's fp16 loss
        # scaler is part of its own checkpoint
        restore_rng(load_file(str(Path(ckpt_dir) / meta["tag"] / f"rng_rank{self.rank}.safetensors")), ckpt_dir)
