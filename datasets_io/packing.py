"""Exact multimodal sequence packing: a micro-batch's samples laid out in rows of a fixed token budget.

    padded (B=4, T=max length)                 packed (rows of <= data.max_seq_len tokens)
    [s0 s0 s0 s0 s0 s0 s0 s0]                  [s0 s0 s0 s0 s0 s0 s0 s0 s3 s3 s3 pad]
    [s1 s1 s1 s1 pad ... pad]                  [s1 s1 s1 s1 s2 s2 s2 s2 s2 pad ... ]
    [s2 s2 s2 s2 s2 pad  pad]
    [s3 s3 s3 pad ...    pad]

Every sample keeps its own tokens, image tokens included, so one forward computes the same per-token values as the
padded batch as long as attention stays inside each sample:
- `position_ids` restart at 0 at every sample (and at the row's tail padding), so rotary positions are the padded
  batch's; transformers 5.24 (masking_utils.find_packed_sequence_indices) turns restarting position ids with no
  2D attention mask into a block-diagonal causal mask for SDPA / eager / flex, and FlashAttention-2 takes its
  variable-length path from them (training/packing.py flattens the rows to the one row it needs);
- `labels` (and `prompt_labels` with a prompt loss) are each sample's own, and the first label of every segment is
  IGNORE_INDEX, so no token is ever trained to predict the next sample's first token;
- `segment_ids` (-1 on padding) say which sample of the micro-batch each token belongs to (per-sample losses, tests);
- `pixel_values` are stacked in layout order (row by row, left to right): LLaVA fills the image-token positions in
  that order, so each sample's image features land in its own segment.

Rows of one width leave the narrower rows' tails as padding (SDPA and eager take a rectangular batch). With
`forwards` > 1 (train.packing_forwards) the rows, widest first, are split into up to that many runs of rows, each
computed by its own forward pass at its own width (`forwards`: rows, width and samples of each pass); their
label-token losses are summed over the one micro-batch's label count (training.model.label_loss), so the loss and
the gradients are those of one pass, with one backward. On the benchmark's Stage B mix this takes SDPA's padding
efficiency from 0.945 (one width: 0.947 at best, whatever the layout) to 0.988 (README, "Packing" and "Measured").

Packing changes only the layout of one micro-batch: which samples form it (the sampler's positions) is untouched,
so data order, the cursor and resume are exactly those of the padded path. Rows are planned at the least compute,
attention's cost included (`plan_rows`), and each pass is as wide as its fullest row, not always the budget. numpy
only: this runs in Ray Data's processes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np

from datasets_io.tokens import IGNORE_INDEX, TokenizedSample

PACKED_SDPA = "packed_sdpa"
"""The attention backend of training.packing.packed_sdpa_attention: SDPA on each sample of a padding-free row."""

NON_MODEL_KEYS = ("labels", "prompt_labels", "segment_ids", "shortened", "forwards")
"""Batch keys that are not forward() arguments of the model."""


@dataclass
class PackedRows:
    input_ids: np.ndarray  # (R, W) int64, W = the fullest row's length <= budget
    labels: np.ndarray  # (R, W) int64
    position_ids: np.ndarray  # (R, W) int64, restart at every sample
    segment_ids: np.ndarray  # (R, W) int64, sample index in the micro-batch; -1 on padding
    order: list[int]  # sample indices in layout order (the order of their image tokens)
    prompt_labels: np.ndarray | None = None  # (R, W) int64, when the samples carry them
    forwards: np.ndarray | None = None  # (passes, 3) int64: rows, width, samples of each forward pass, in row order


def plan_rows(lengths: list[int], budget: int, attention_span: float = math.inf, forwards: int = 1) -> list[list[int]]:
    """Sample lengths -> sample indices per row, widest row first, rows of at most `budget` tokens, laid out at the
    least compute (with `forwards` > 1: the least `split_forwards` cost of the rows in up to that many passes):
    R rows of width W (the fullest row) cost R x W x (1 + W / attention_span): the per-token layers on R x W tokens,
    plus attention, which SDPA / eager compute on every (query, key) pair of a row, masked or not (R x W^2).
    `attention_span` (`attention_span` below: the width at which attention costs a token as much as its matrix
    multiplies) is 27,264 for Mistral-7B with configs/llava_med_7b.yaml's LoRA, so its rows fill the budget; 1,589
    for configs/tiny.yaml's model, whose rows stay narrower (one 1,800-token row costs it more than 8 padded rows of
    280). math.inf: tokens alone (ties: narrower rows). Candidates: for every row count, longest-first to the
    least-filled row (balanced rows; n rows = one sample per row is the padded layout, so packing never costs more
    than padding); for 65 row capacities between the longest sample and the budget, first-fit decreasing (full
    rows). Deterministic and cheap (pure Python over a micro-batch's lengths)."""
    for i, n in enumerate(lengths):
        if n > budget:
            raise ValueError(f"sample {i}: {n} tokens > packing budget {budget} (data.max_seq_len)")
    if not lengths:
        return []
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    longest = lengths[order[0]]
    candidates = [
        _balanced_rows(lengths, order, n, budget)
        for n in range(max(1, math.ceil(sum(lengths) / budget)), len(lengths) + 1)
    ]
    candidates += [_first_fit_rows(lengths, order, longest + (budget - longest) * k // 64) for k in range(65)]

    def widest_first(rows: list[list[int]]) -> list[list[int]]:
        return sorted(rows, key=lambda row: -sum(lengths[i] for i in row))  # stable: ties keep their order

    def cost(rows: list[list[int]]) -> tuple[float, int]:
        widths = [sum(lengths[i] for i in row) for row in rows]
        return split_forwards(widths, forwards, attention_span)[0], widths[0]

    unique = {tuple(map(tuple, widest_first(rows))): None for rows in candidates if rows}  # FFD repeats itself
    return min(([list(row) for row in rows] for rows in unique), key=cost)


def split_forwards(widths: list[int], forwards: int, attention_span: float = math.inf) -> tuple[float, list[int]]:
    """Row widths, widest first -> (cost, rows per forward pass): the rows cut into at most `forwards` runs of
    consecutive rows, each pass as wide as its first row, at the least cost sum(rows x width x (1 + width /
    attention_span)) (plan_rows' cost, per pass); a pass is added only where it lowers that cost (ties: fewer passes).
    Exact (dynamic programming over cut points; rows are few)."""
    n, k_max = len(widths), max(1, min(forwards, len(widths)))
    run = [w * (1 + w / attention_span) for w in widths]  # a row's cost in a pass as wide as row i
    # cost[k][j]: rows 0..j-1 in k passes, at the least; cut[k][j]: where its last pass begins
    cost = [[math.inf] * (n + 1) for _ in range(k_max + 1)]
    cut = [[0] * (n + 1) for _ in range(k_max + 1)]
    for j in range(1, n + 1):
        cost[1][j] = j * run[0]
    for k in range(2, k_max + 1):
        for j in range(k, n + 1):
            for i in range(k - 1, j):
                c = cost[k - 1][i] + (j - i) * run[i]
                if c < cost[k][j]:
                    cost[k][j], cut[k][j] = c, i
    k = min(range(1, k_max + 1), key=lambda k: cost[k][n])  # ties: fewer passes
    sizes, j = [], n
    for kk in range(k, 0, -1):
        i = cut[kk][j] if kk > 1 else 0
        sizes.append(j - i)
        j = i
    return cost[k][n], sizes[::-1]


def attention_span(text_config: Any, lora_r: int = 0, lora_targets: Iterable[str] = ()) -> float:
    """The row width at which attention costs a token as much as the matrix multiplies of its layer, for a Llama /
    Mistral decoder layer (a transformers text config) with LoRA: multiply-adds per token (q, k, v, o, gate, up,
    down, and r x (in + out) per LoRA target) / multiply-adds per (query, key) pair (scores and weighted sum:
    2 x heads x head_dim)."""
    t = text_config
    heads = t.num_attention_heads
    head_dim = getattr(t, "head_dim", None) or t.hidden_size // heads
    q, kv = heads * head_dim, (getattr(t, "num_key_value_heads", None) or heads) * head_dim
    h, inter = t.hidden_size, t.intermediate_size
    shapes = {
        "q_proj": (h, q),
        "k_proj": (h, kv),
        "v_proj": (h, kv),
        "o_proj": (q, h),
        "gate_proj": (h, inter),
        "up_proj": (h, inter),
        "down_proj": (inter, h),
    }
    lora = sum(lora_r * sum(shapes[name]) for name in lora_targets if name in shapes)
    return (sum(i * o for i, o in shapes.values()) + lora) / (2 * heads * head_dim)


def padding_free(attn_implementation: str) -> bool:
    """FlashAttention and packed_sdpa: packed rows reach them as one row of the real tokens
    (training.packing.model_layout), so they compute no padding, and attention only within each sample whatever the
    layout."""
    return attn_implementation.startswith("flash") or attn_implementation == PACKED_SDPA


def _balanced_rows(lengths: list[int], order: list[int], n_rows: int, budget: int) -> list[list[int]] | None:
    """Longest first, each sample to the least-filled of `n_rows` rows; None when one does not fit."""
    rows: list[list[int]] = [[] for _ in range(n_rows)]
    load = [0] * n_rows
    for i in order:
        r = min(range(n_rows), key=lambda r: (load[r], r))
        if load[r] + lengths[i] > budget:  # the least-filled row is full: so is every other
            return None
        rows[r].append(i)
        load[r] += lengths[i]
    return [row for row in rows if row]


def _first_fit_rows(lengths: list[int], order: list[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing into rows of `capacity` tokens (each sample fits: capacity >= the longest)."""
    rows: list[list[int]] = []
    load: list[int] = []
    for i in order:
        r = next((r for r in range(len(rows)) if load[r] + lengths[i] <= capacity), len(rows))
        if r == len(rows):
            rows.append([])
            load.append(0)
        rows[r].append(i)
        load[r] += lengths[i]
    return rows


def pack_samples(
    samples: list[TokenizedSample], budget: int, pad_id: int, attention_span: float = math.inf, forwards: int = 1
) -> PackedRows:
    """Lay the samples out in rows of at most `budget` tokens, in up to `forwards` forward passes (see the module
    docstring for what each array holds; `attention_span`: plan_rows)."""
    lengths = [len(s.input_ids) for s in samples]
    rows = plan_rows(lengths, budget, attention_span, forwards)
    widths = [sum(lengths[i] for i in row) for row in rows]  # widest first
    width = widths[0]
    passes, at = [], 0
    for n_rows in split_forwards(widths, forwards, attention_span)[1]:
        passes.append((n_rows, widths[at], sum(len(row) for row in rows[at : at + n_rows])))
        at += n_rows
    shape = (len(rows), width)
    input_ids = np.full(shape, pad_id, dtype=np.int64)
    labels = np.full(shape, IGNORE_INDEX, dtype=np.int64)
    with_prompt = samples[0].prompt_labels is not None
    prompt_labels = np.full(shape, IGNORE_INDEX, dtype=np.int64) if with_prompt else None
    position_ids = np.zeros(shape, dtype=np.int64)
    segment_ids = np.full(shape, -1, dtype=np.int64)
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            n = len(samples[i].input_ids)
            input_ids[r, at : at + n] = samples[i].input_ids
            labels[r, at : at + n] = samples[i].labels
            labels[r, at] = IGNORE_INDEX  # never predicted from the previous sample's last token
            if prompt_labels is not None:
                prompt_labels[r, at : at + n] = samples[i].prompt_labels
                prompt_labels[r, at] = IGNORE_INDEX
            position_ids[r, at : at + n] = np.arange(n)
            segment_ids[r, at : at + n] = i
            at += n
        position_ids[r, at:] = np.arange(width - at)  # the tail padding is a segment of its own
    order = [i for row in rows for i in row]
    forwards_out = np.asarray(passes, dtype=np.int64)
    return PackedRows(input_ids, labels, position_ids, segment_ids, order, prompt_labels, forwards_out)


def packed_batch(
    pixels: list[np.ndarray],
    samples: list[TokenizedSample],
    budget: int,
    pad_id: int,
    attention_span: float = math.inf,
    forwards: int = 1,
) -> dict:
    """The packed counterpart of `Preprocessor.collate`'s padded batch (numpy arrays; no attention_mask: the
    restarting position ids are the mask)."""
    p = pack_samples(samples, budget, pad_id, attention_span, forwards)
    batch = {
        "pixel_values": np.stack([pixels[i] for i in p.order]).astype(np.float32),  # (B, 3, S, S), layout order
        "input_ids": p.input_ids,  # (R, W)
        "labels": p.labels,
        "position_ids": p.position_ids,
        "segment_ids": p.segment_ids,
        "shortened": np.asarray([s.shortened for s in samples], dtype=bool),
        "forwards": p.forwards,  # (passes, 3): rows, width, samples of each forward pass
    }
    if p.prompt_labels is not None:
        batch["prompt_labels"] = p.prompt_labels
    return batch


def computed_tokens(forwards: Any) -> int:
    """Tokens a packed micro-batch's forward passes compute on: sum of rows x width over its pass plan (`forwards`,
    numpy or torch, (passes, 3))."""
    return int((forwards[:, 0] * forwards[:, 1]).sum())


def padding_efficiency(lengths: list[int], computed_tokens: int) -> float:
    """Real tokens / tokens the model computes on (rows x width)."""
    return sum(lengths) / computed_tokens if computed_tokens else 0.0
