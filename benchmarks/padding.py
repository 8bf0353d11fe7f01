"""Padding efficiency (real tokens / computed tokens) of the Stage B mix, padded vs packed (`train.packing`), and the
step-time ratio, on the tiny model.

    python benchmarks/padding.py [--batches 12] [--batch 16] [--budget 2048] [--ehr-detail 6] [--ehr-dropout 0.15]

The Stage B mix: the curriculum's Stage B stream (`curriculum.ehr_dropout` empties some Patient Data blocks: short
prompts) with MIMIC-size Patient Data on the others. The project's synthetic data has four labs and three vitals
per study, far shorter than a MIMIC admission's lab history; this benchmark appends a `Lab_history` of repeated
draws of a basic metabolic panel + blood count (a log-normal number of draws, median `--ehr-detail`, as many as fit
`--budget`) to each kept block, so prompts run from ~100 to ~2,000 tokens as real extracts do. (`launcher data
synth --ehr-detail mimic` writes the MIMIC build's block size without a lab history: samples of ~220-280 tokens
with the tiny tokenizer.)

Computed tokens: padded = micro-batch size x its longest sample; packed = rows x the fullest row (datasets_io/
packing.py), what SDPA / eager compute on (FlashAttention-2 gets the real tokens only: 1.00, printed apart). The row
plan weighs attention, which SDPA computes on rows x width^2 pairs, by the language model's attention span
(datasets_io.packing.attention_span): the last line is the plan for Mistral-7B with configs/llava_med_7b.yaml's LoRA
(production); the tiny model's own plan (narrower rows where its span makes wide ones cost more; on these long
samples the rows came out the same) is printed above it and is the one timed. Beside them:
the most any layout in rows of one width (all SDPA can take) reaches on the same micro-batches, by exhaustive search
over row counts and assignments (`best_layout_tokens`): what no row plan can beat, whatever its rule.
Step time: forward + backward of `label_loss` (what every engine runs) on the same micro-batches in each layout, and
with `packed_sdpa` (the tiny config's backend: one padding-free row, SDPA per sample), alternating rounds (the CPU
is shared: noise hits both alike), median per micro-batch.
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from gpu_throughput import SHAPES  # the production shape, one table for both benchmarks
from transformers import MistralConfig

from datasets_io.packing import PACKED_SDPA, attention_span, computed_tokens, pack_samples, padding_efficiency
from datasets_io.records import ehr_from_prompt, prompt_b
from datasets_io.tokens import OverBudgetError
from datasets_io.config import load_config
from datasets_io.sampler import row_table
from launcher.local import corpus_texts, ensure_data, load_run_data
from training.data import Preprocessor, StageStream, StreamSpec, to_torch
from training.model import build_model, label_loss

REPO = Path(__file__).resolve().parents[1]
PANEL = {
    "Sodium": (135, 145),
    "Potassium": (3.5, 5.1),
    "Chloride": (98, 107),
    "Bicarbonate": (22, 29),
    "BUN": (7, 20),
    "Creatinine": (0.6, 1.3),
    "Glucose": (70, 140),
    "Hemoglobin": (11, 16),
    "Hematocrit": (34, 47),
    "Platelets": (150, 400),
    "WBC": (4, 11),
}


def lab_history(rng: np.random.Generator, draws: int) -> list[dict]:
    """`draws` panels, newest first, values scattered around their reference ranges."""
    out = []
    for d in range(draws):
        panel = {k: round(float(rng.uniform(lo * 0.8, hi * 1.2)), 1) for k, (lo, hi) in PANEL.items()}
        out.append({"hours_before_study": int(6 * d + rng.integers(0, 6)), **panel})
    return out


def detailed(prompt: str, rng: np.random.Generator, median_draws: float) -> str:
    """A kept Patient Data block with a MIMIC-size lab history appended; an emptied block stays empty."""
    ehr = ehr_from_prompt(prompt)
    if not ehr:
        return prompt
    draws = int(rng.lognormal(np.log(median_draws), 0.8)) if median_draws > 0 else 0
    return prompt_b({**ehr, "Lab_history": lab_history(rng, draws)})


def stage_b_samples(pre: Preprocessor, stream: StageStream, n: int, median_draws: float, budget: int) -> list:
    """n (pixels, TokenizedSample) of the Stage B mix; a lab history too long for the budget is shortened (counted)."""
    out, shortened = [], 0
    for pos in range(n):
        prompt, target, image, where = stream.item(pos)
        rng = np.random.default_rng([11, pos])
        long_prompt = detailed(prompt, rng, median_draws)
        while True:
            try:  # over the budget, the Patient Data block is shortened by the training rule (counted)
                pixels, tok = pre.sample(long_prompt, target, image, where)
                shortened += tok.shortened
                break
            except OverBudgetError:  # not even the emptied block fits: a shorter lab history
                ehr = ehr_from_prompt(long_prompt)
                ehr["Lab_history"] = ehr["Lab_history"][: len(ehr["Lab_history"]) * 3 // 4]
                long_prompt = prompt_b(ehr)
        out.append((pixels, tok))
    print(f"{n} Stage B samples; Patient Data shortened to fit --budget {budget}: {shortened}")
    return out


def least_width(lengths: list[int], rows: int, budget: int, node_cap: int) -> tuple[int | None, bool]:
    """(the narrowest width `rows` rows can hold `lengths` in, None when they cannot within `budget`; whether that is
    exact): exhaustive branch and bound (multiway number partitioning). Past `node_cap` search nodes: the trivial lower
    bound max(longest, ceil(total / rows)), not exact."""
    items = sorted(lengths, reverse=True)
    floor = max(items[0], math.ceil(sum(items) / rows))
    best, load, nodes = budget + 1, [0] * rows, 0

    def search(k: int, width: int) -> None:
        nonlocal best, nodes
        nodes += 1
        if width >= best:  # this branch cannot beat a layout found since it began
            return
        if k == len(items):
            best = width
            return
        tried = set()
        for r in range(rows):
            new = load[r] + items[k]
            if load[r] in tried or new >= best or new > budget or nodes > node_cap:
                continue
            tried.add(load[r])  # rows of equal load are interchangeable
            load[r] = new
            search(k + 1, max(width, new))
            load[r] -= items[k]
            if best == floor:
                return

    search(0, 0)
    if nodes > node_cap:
        return floor, False
    return (best if best <= budget else None), True


def best_layout_tokens(lengths: list[int], budget: int, node_cap: int = 100_000) -> tuple[int, bool]:
    """(the fewest computed tokens, rows x width, of any layout of these samples in rows of one width, whether the
    search proved it): what no row plan for SDPA / eager can beat; a lower bound where a search hit `node_cap`."""
    best, exact = math.inf, True
    for rows in range(max(1, math.ceil(sum(lengths) / budget)), len(lengths) + 1):
        if rows * max(lengths) >= best:
            break
        width, proved = least_width(lengths, rows, budget, node_cap)
        if width is not None and rows * width < best:
            best = rows * width
        exact = exact and proved
    return int(best), exact


def step_seconds(model, batch: dict) -> float:
    t0 = time.perf_counter()
    loss = label_loss(model, batch)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", type=int, default=12, help="micro-batches measured")
    ap.add_argument(
        "--batch",
        type=int,
        default=16,
        help="samples per micro-batch (tiny.yaml's micro_batch_size); "
        "with SDPA rows the efficiency grows with it: the README lists 4, 8 and 16",
    )
    ap.add_argument("--budget", type=int, default=2048, help="data.max_seq_len: the packed row's token budget")
    ap.add_argument("--ehr-detail", type=float, default=6.0, help="median lab-history draws per kept EHR block")
    ap.add_argument("--ehr-dropout", type=float, default=0.15, help="curriculum.ehr_dropout (llava_med_7b.yaml)")
    ap.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="timing rounds, alternating which layout goes first (0: padding efficiency only)",
    )
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        run(args, Path(d))


def run(args: argparse.Namespace, tmp: Path) -> None:
    cfg = load_config(
        REPO / "configs" / "tiny.yaml",
        [
            f"data.root={tmp}/data",
            f"output.dir={tmp}/run",
            "data.synth_studies=80",
            f"data.max_seq_len={args.budget}",
            "model.attn_implementation=sdpa",  # rows with transformers' mask; packed_sdpa is timed apart below
        ],
    )
    ensure_data(cfg)
    data = load_run_data(cfg)
    bundle = build_model(cfg, corpus_texts(data), stage_a=row_table(data.train["A"]))
    pre = Preprocessor.for_run(cfg, bundle, image_cache=False)  # data.max_seq_len = --budget (above)
    stream = StageStream("B", data.train["B"], StreamSpec(0, ehr_dropout=args.ehr_dropout))
    samples = stage_b_samples(pre, stream, args.batches * args.batch, args.ehr_detail, args.budget)
    lengths = [len(t.input_ids) for _, t in samples]
    micro = [samples[k * args.batch : (k + 1) * args.batch] for k in range(args.batches)]
    real = sum(lengths)
    padded_cost = sum(len(m) * max(len(t.input_ids) for _, t in m) for m in micro)
    print(
        f"tokens per sample: min {min(lengths)}, median {int(statistics.median(lengths))}, max {max(lengths)} "
        f"({bundle.num_image_tokens} image tokens each); {args.batches} micro-batches of {args.batch}"
    )
    prod = load_config(REPO / "configs" / SHAPES["7b"]["config"])  # Mistral-7B's LoRA
    passes = prod.train.packing_forwards
    spans = {
        "Mistral-7B": attention_span(MistralConfig(**SHAPES["7b"]["text"]), prod.lora.r, prod.lora.target_modules),
        "the tiny model (timed below)": pre.attention_span,
    }
    packed_cost = {}
    for name, span in spans.items():  # the row plan weighs attention (SDPA: rows x width^2) by the model's span
        for forwards in sorted({1, passes}):
            pad_id = bundle.tokenizer.pad_token_id
            plans = [pack_samples([t for _, t in m], args.budget, pad_id, span, forwards).forwards for m in micro]
            packed_cost[name, forwards] = sum(computed_tokens(f) for f in plans)
            efficiency = padding_efficiency(lengths, packed_cost[name, forwards])
            print(
                f"rows planned for {name} (attention span {span:,.0f} tokens) in up to {forwards} forward "
                f"pass(es): (rows, width) of each pass per micro-batch {[f[:, :2].tolist() for f in plans]}; "
                f"padding efficiency {efficiency:.3f}"
            )

    bests = [best_layout_tokens([len(t.input_ids) for _, t in m], args.budget) for m in micro]
    best, proved = sum(b for b, _ in bests), sum(p for _, p in bests)
    how = (
        "exhaustive search"
        if proved == len(micro)
        else f"exhaustive for {proved} of {len(micro)}, bounded for the rest"
    )
    print(
        f"the most any layout of these micro-batches in rows of one width reaches (fewest rows x width, {how}): "
        f"{'' if proved == len(micro) else 'at most '}{padding_efficiency(lengths, best):.3f}; the Mistral-7B plan "
        f"in one pass is {best / packed_cost['Mistral-7B', 1]:.1%} of it; in up to {passes} passes (rows of their "
        f"own widths) it computes {packed_cost['Mistral-7B', passes] / best:.1%} of its tokens"
    )

    layouts = {}
    kinds = (("padded", False, 1), ("packed, 1 pass", True, 1), (f"packed, up to {passes} passes", True, passes))
    for name, packing, forwards in kinds:
        pre.packing, pre.packing_forwards = packing, forwards
        layouts[name] = [to_torch(pre.collate([p for p, _ in m], [t for _, t in m])) for m in micro]
    layouts[PACKED_SDPA] = layouts["packed, 1 pass"]  # the same rows, flattened to one padding-free row by the model
    if args.rounds:
        step_times(bundle.model.train(), layouts, args.rounds)
    print(
        f"with flash_attention_2 (CUDA) or packed_sdpa the packed rows become one padding-free row "
        f"(training/packing.py): {padding_efficiency(lengths, real):.2f}; the rows below are what sdpa / eager compute on"
    )
    print(
        f"padding efficiency: {padding_efficiency(lengths, packed_cost['Mistral-7B', passes]):.2f} packed vs "
        f"{padding_efficiency(lengths, padded_cost):.2f} padded"
    )


def step_times(model, layouts: dict[str, list[dict]], rounds: int) -> None:
    """Forward + backward of each micro-batch in every layout, rotating which goes first; prints the medians. The
    layout named PACKED_SDPA runs with that attention backend (one padding-free row, SDPA per sample), the rest with
    sdpa (rows, transformers' block-diagonal mask)."""
    times: dict[str, list[float]] = {name: [] for name in layouts}
    names = list(layouts)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            model.get_base_model().set_attn_implementation(PACKED_SDPA if name == PACKED_SDPA else "sdpa")
            times[name] += [step_seconds(model, b) for b in layouts[name]]
    med = {name: statistics.median(t) for name, t in times.items()}
    padded = names[0]
    print(
        f"step (forward+backward, one micro-batch, CPU, median of {len(times[padded])}, [min-max] ms): "
        + ", ".join(f"{n} {med[n] * 1000:.0f} [{min(t) * 1000:.0f}-{max(t) * 1000:.0f}]" for n, t in times.items())
        + "; vs padded: "
        + ", ".join(f"{n} {med[n] / med[padded]:.2f}x" for n in names[1:])
    )


if __name__ == "__main__":
    main()
