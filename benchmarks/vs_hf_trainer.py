"""Training throughput of `launcher local` against transformers.Trainer: same tiny LLaVA + LoRA, same data, batch,
optimizer, schedule and step count.

    python benchmarks/vs_hf_trainer.py [--steps 60] [--batch 16] [--rounds 3] [--ehr-detail basic|mimic] [--budget N]

Both sides train the tiny model (configs/tiny.yaml: LoRA r=64, vision tower and embeddings trained) on the same
Stage B samples (stream positions 0 .. steps*batch, the EHR-dropout mix) of 80 synthetic studies: the demo's short
Patient Data (`--ehr-detail basic`, samples of ~60-130 tokens, data.max_seq_len 384) or the MIMIC build's block size
(`--ehr-detail mimic`: `launcher data synth --ehr-detail mimic`, ~220-280 tokens, data.max_seq_len 2048, the
production budget), micro-batch `--batch`, fused AdamW at the config's lr (weight decay 0), clip 1.0, warmup then
cosine, fp32 on CPU, data decoded in the training process, the target's loss only (`train.prompt_loss_weight=0`, as
for a real base: the Trainer's collator has no prompt loss).
- Trainer: its usual setup for a tokenized multimodal dataset: a map-style dataset of (input_ids, attention_mask,
  labels, pixel_values) per sample, `DataCollatorForSeq2Seq` (pads, labels with -100), the model's own loss,
  `save_strategy="no"`, no evaluation, then `trainer.save_model()` once at the end.
- launcher: `run_local` (the CLI's `launcher local`) with validation off and one checkpoint at the end, MLflow
  tracking on (sqlite), with its default exact packing (`train.packing: true`) and, as a second variant, padded
  micro-batches (`train.packing=false`: the Trainer's layout, so that row isolates what is not the layout).
What is timed: the steady state, from the end of optimizer step 10 to the end of the last step (`--steps`, a multiple
of 10; wall clock: Trainer's `on_step_end`, the launcher's MLflow metric timestamps), both logging every 10 steps:
data loading, the step and the bookkeeping between steps are in; start-up (imports, data index, model build), the
first steps' warm-up and the end-of-run save are out (printed apart: from the end of step 1 to the end of the run).
Rounds alternate which side goes first (the 2-core machine is shared with other jobs); medians and best rounds are
printed, and the last line is the ratio of the best rounds: other jobs only ever slow a run down (timeit's rule: the
minimum time is the estimate, the rest is interference).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from datasets_io.config import load_config
from datasets_io.sampler import row_table
from datasets_io.synth import write_synthetic
from launcher.local import corpus_texts, ensure_data, load_run_data, run_local
from training.data import Preprocessor, StageStream, StreamSpec
from training.model import build_model

REPO = Path(__file__).resolve().parents[1]
LOG_EVERY = 10  # both sides log every LOG_EVERY steps: the launcher's timestamps exist only at those steps
FIRST = LOG_EVERY  # the timed span runs from the end of this optimizer step to the end of the last


class StageBDataset(torch.utils.data.Dataset):
    """Trainer's input: sample i = the launcher's Stage B stream position i, decoded and tokenized on access."""

    def __init__(self, pre: Preprocessor, stream: StageStream, n: int):
        self.pre, self.stream, self.n = pre, stream, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        pixels, tok = self.pre.sample(*self.stream.item(i))
        return {
            "input_ids": tok.input_ids,
            "attention_mask": tok.attention_mask,
            "labels": tok.labels,
            "pixel_values": pixels,
        }


def trainer_run(cfg, steps: int, out: Path) -> tuple[float, float]:
    """(seconds from the end of step 10 to the end of the last step, from the end of step 1 to the end of the run)."""
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

    data = load_run_data(cfg)
    torch.manual_seed(cfg.train.seed)
    bundle = build_model(cfg, corpus_texts(data), stage_a=row_table(data.train["A"]))
    pre = Preprocessor.for_run(cfg, bundle, image_cache=False)
    stream = StageStream("B", data.train["B"], StreamSpec(cfg.train.seed, ehr_dropout=cfg.curriculum.ehr_dropout))
    mb = cfg.train.micro_batch_size
    ends: dict[int, float] = {}

    class StepEnds(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            ends[state.global_step] = time.time()

    args = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=mb,
        max_steps=steps,
        learning_rate=cfg.train.lr,
        weight_decay=0.0,
        max_grad_norm=cfg.train.max_grad_norm,
        warmup_steps=cfg.train.warmup_steps,
        lr_scheduler_type="cosine",
        optim="adamw_torch_fused",  # the Trainer's default on torch >= 2.8, the launcher's kernel too
        logging_steps=cfg.train.log_every,
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        seed=cfg.train.seed,
        disable_tqdm=True,
    )
    collator = DataCollatorForSeq2Seq(bundle.tokenizer, padding="longest", label_pad_token_id=-100, return_tensors="pt")
    trainer = Trainer(
        model=bundle.model,
        args=args,
        train_dataset=StageBDataset(pre, stream, steps * mb),
        data_collator=collator,
        callbacks=[StepEnds()],
    )
    trainer.train()
    trainer.save_model(str(out / "final"))
    return ends[steps] - ends[FIRST], time.time() - ends[1]


def launcher_run(cfg) -> tuple[float, float]:
    """The same two spans for `launcher local`, from its MLflow metric timestamps (logged as each step ends)."""
    from mlflow import MlflowClient

    summary = run_local(cfg, device="cpu", show_progress=False)
    history = MlflowClient(summary["tracking_uri"]).get_metric_history(summary["mlflow_run_id"], "train/loss")
    ends = {m.step: m.timestamp / 1000 for m in history}
    tail = summary["wall_time_s"] - summary["time_to_first_step_s"]
    return ends[cfg.train.max_steps] - ends[FIRST], tail


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--steps", type=int, default=60, help=f"a multiple of {LOG_EVERY}, > {FIRST}: steps {FIRST + 1}.. are timed"
    )
    ap.add_argument(
        "--batch",
        type=int,
        default=load_config(REPO / "configs" / "tiny.yaml").train.micro_batch_size,
        help="micro-batch, both sides (default: configs/tiny.yaml's, what the demo trains with)",
    )
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--ehr-detail",
        choices=("basic", "mimic"),
        default="basic",
        help="Patient Data of the synthetic studies: the demo's (basic) or MIMIC-build-size blocks (mimic)",
    )
    ap.add_argument("--budget", type=int, default=None, help="data.max_seq_len (default: 384 basic, 2048 mimic)")
    args = ap.parse_args()
    budget = args.budget or (2048 if args.ehr_detail == "mimic" else 384)
    if args.steps <= FIRST or args.steps % LOG_EVERY:
        ap.error(f"--steps {args.steps}: expected a multiple of {LOG_EVERY} above {FIRST}")
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        common = [
            f"data.root={d}/data",
            "data.synth_studies=80",
            f"data.max_seq_len={budget}",
            f"train.max_steps={args.steps}",
            f"train.micro_batch_size={args.batch}",
            "curriculum.stage_split=0.0",
            "train.val_batches=0",
            "train.eval_every=0",
            "train.save_every=0",
            "train.warmup_steps=2",
            f"train.log_every={LOG_EVERY}",
            "train.prompt_loss_weight=0",
        ]
        base = load_config(REPO / "configs" / "tiny.yaml", common + [f"output.dir={d}/base"])
        if args.ehr_detail != "basic":  # ensure_data synthesizes the demo's blocks only
            write_synthetic(base.data.root, base.data.synth_studies, base.data.synth_seed, ehr_detail=args.ehr_detail)
        ensure_data(base)
        build_model(
            base, corpus_texts(data := load_run_data(base)), stage_a=row_table(data.train["A"])
        )  # the tiny base model every run loads
        base_model = [f"model.name_or_path={d}/base/base_model"]
        sides = {
            "trainer": lambda r: trainer_run(base, args.steps, d / f"trainer{r}"),
            "launcher": lambda r: launcher_run(  # its defaults: packed micro-batches
                load_config(REPO / "configs" / "tiny.yaml", common + base_model + [f"output.dir={d}/launcher{r}"])
            ),
            "launcher padded": lambda r: launcher_run(
                load_config(
                    REPO / "configs" / "tiny.yaml",
                    common + base_model + [f"output.dir={d}/padded{r}", "train.packing=false"],
                )
            ),
        }
        seconds: dict[str, list[float]] = {k: [] for k in sides}
        tails: dict[str, list[float]] = {k: [] for k in sides}
        for r in range(args.rounds):
            names = list(sides) if r % 2 == 0 else list(reversed(sides))
            for name in names:
                steady, tail = sides[name](r)
                seconds[name].append(steady)
                tails[name].append(tail)
                print(
                    f"round {r} {name}: steps {FIRST + 1}-{args.steps} {steady:.1f} s; end of step 1 to "
                    f"end of run {tail:.1f} s",
                    flush=True,
                )
    n = (args.steps - FIRST) * args.batch
    sps = {k: n / np.asarray(v) for k, v in seconds.items()}
    for k, v in sps.items():
        print(
            f"{k:17s} {statistics.median(v):6.2f} samples/s (rounds: {', '.join(f'{x:.2f}' for x in v)}); "
            f"end of step 1 to end of run: {', '.join(f'{x:.1f}' for x in tails[k])} s"
        )
    for how, pick in (("medians", statistics.median), ("best rounds", max)):
        print(
            f"{how}: launcher/Trainer {pick(sps['launcher']) / pick(sps['trainer']):.2f}x, "
            f"launcher padded/Trainer {pick(sps['launcher padded']) / pick(sps['trainer']):.2f}x"
        )
    print(f"launcher/Trainer: {max(sps['launcher']) / max(sps['trainer']):.2f}x")


if __name__ == "__main__":
    main()
