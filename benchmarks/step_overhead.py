"""The local loop's step time against a minimal hand-written PyTorch loop, same model, same batch, one run.

    python benchmarks/step_overhead.py [--steps 30] [--rounds 4] [--batch 8]
Target: at most 1.05x. Both sides do forward, backward, clip, AdamW step on the tiny model with LoRA; the loop side
runs `training.loop.train` through the AccelerateEngine with a real MLflow tracker (sqlite, log_every=10), so what
is measured is everything the project adds per step: stage lookup, LR schedule, metrics, progress bar, cursor.
Checkpoint writes (the stage_A_end bundle, the one at the stop) are events, not step cost: timed and printed apart.
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from pathlib import Path

import torch

from datasets_io.config import load_config
from datasets_io.sampler import row_table
from launcher.local import corpus_texts, load_run_data
from training.checkpoint import Checkpointer
from training.curriculum import plan_steps
from training.data import Preprocessor, StageStream, StreamSpec, to_torch
from training.engines import AccelerateEngine
from training.loop import LoopIO, train
from training.model import build_model, label_loss
from training.tracking import MlflowTracker

REPO = Path(__file__).resolve().parents[1]


def hand_loop(model, batch, steps: int, lr: float, prompt_weight: float) -> float:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, fused=True)  # the engine's kernel (training.engines.make_optimizer)
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = label_loss(model, batch, prompt_weight)  # the engine's loss (tiny.yaml's prompt loss included)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
    return (time.perf_counter() - t0) / steps


class TimedCheckpointer(Checkpointer):
    """Checkpoint writes (the stage_A_end bundle, the one at the stop) are events, not step cost: timed apart."""

    seconds = 0.0

    def save(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return super().save(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - t0


def project_loop(cfg, model, tokenizer, batch, steps: int, out: Path) -> tuple[float, float]:
    """(seconds per step without checkpoint writes, seconds of checkpoint writes)"""
    engine = AccelerateEngine(model, cfg.train, "cpu")
    plan = plan_steps(cfg, 100, 100)
    plan = type(plan)(steps, steps // 3, 0, plan.min_lr_ratio, plan.samples_per_step)
    tracker = MlflowTracker.from_config(cfg)
    ckpt = TimedCheckpointer(out / "ckpt", cfg, tokenizer, 1)
    io = LoopIO(
        engine=engine,
        plan=plan,
        source=lambda stage, start: itertools.repeat(batch),
        val_source=lambda s: [],
        tracker=tracker,
        checkpointer=ckpt,
        grad_accum=1,
        log_every=10,
        show_progress=True,
    )
    t0 = time.perf_counter()
    train(io, stop_after=steps - 1)
    dt = time.perf_counter() - t0
    tracker.close()
    return (dt - ckpt.seconds) / (steps - 1), ckpt.seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8, help="micro-batch size (tiny.yaml trains with 16)")
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        cfg = load_config(
            REPO / "configs" / "tiny.yaml",
            [
                f"data.root={d}/data",
                f"output.dir={d}/run",
                "data.synth_studies=80",
                f"train.micro_batch_size={args.batch}",
            ],
        )
        from launcher.local import ensure_data

        ensure_data(cfg)
        data = load_run_data(cfg)
        bundle = build_model(cfg, corpus_texts(data), stage_a=row_table(data.train["A"]))
        pre = Preprocessor.for_run(cfg, bundle, image_cache=False)
        stream = StageStream("B", data.train["B"], StreamSpec(0))
        batch = to_torch(pre.batch([stream.item(i) for i in range(cfg.train.micro_batch_size)]))
        hand, ours, ckpt_times = [], [], []
        bundle.model.train()  # both sides train in train mode
        for r in range(args.rounds):  # interleaved rounds, alternating which side goes first: noise hits both alike
            for side in ("hand", "ours") if r % 2 == 0 else ("ours", "hand"):
                if side == "hand":
                    hand.append(hand_loop(bundle.model, batch, args.steps, cfg.train.lr, cfg.train.prompt_loss_weight))
                else:
                    step_s, ckpt_s = project_loop(cfg, bundle.model, bundle.tokenizer, batch, args.steps, d / f"r{r}")
                    ours.append(step_s)
                    ckpt_times.append(ckpt_s)
    h, o = min(hand), min(ours)
    print(
        f"\nbatch {cfg.train.micro_batch_size} x {batch['input_ids'].shape[1]} tokens, tiny model, CPU, "
        f"best of {args.rounds} rounds x {args.steps} steps"
    )
    print(f"hand-written loop: {h * 1000:7.1f} ms/step")
    print(
        f"launcher loop:     {o * 1000:7.1f} ms/step (+ 2 checkpoint writes, stage_A_end and at the stop: "
        f"{min(ckpt_times) * 1000:.0f} ms in all, not step cost)"
    )
    print(f"ratio: {o / h:.3f}x (target <= 1.05x)")


if __name__ == "__main__":
    main()
