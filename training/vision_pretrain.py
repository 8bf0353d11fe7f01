"""Pre-train a tiny base's random vision tower on the training images' CheXpert labels, before the curriculum starts.

A real LLaVA-Med brings a pretrained CLIP tower: its patch features already tell a large heart from a small one, and
LoRA teaches the LM to read them. The tiny base's tower is random, and the next-token loss reaches it only through a
random LM: on curricula whose findings are faint or small, a run can stay on the plateau of predicting each label's
frequency for its whole Stage A (README "Learning on other generators" has the measured runs, before and after).
`model.tiny.vision_pretrain_steps` steps stand in for the pretrained tower:

- a linear head on the tower's patch tokens, its logits max-pooled over patches (a finding anywhere in the image);
- binary cross-entropy on the 14 CheXpert labels of the Stage A TRAINING records (Positive = 1, Uncertain =
  `model.tiny.vision_pretrain_uncertain`, anything else 0: the recipe does not know which labels a curriculum draws in
  the pixels); no validation row is ever read;
- each label's positives weighted by its negatives / positives in those images (`positive_weights`), so a finding
  drawn in 2% of the studies pulls on the tower as hard as one in 30% (README "Learning on other generators": the
  tower alone then sees `default`'s pleural other, 16 of 1,079 images, at AUC 0.90 instead of 0.78);
- AdamW at `train.lr` (torch's fused kernel: a step 16.0 ms instead of 18.5 ms), batches of `train.micro_batch_size`
  drawn with `train.seed`, on one CPU thread, so the weights are the same bits wherever the tiny base is built (the
  local runtime, or rank 0 of a Ray run); the recipe drops the head (benchmarks/tower_probe.py scores with it).

Part of the tiny base (its origin records the step count and a non-zero Uncertain target), built once per output
dir like its tokenizer.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from datasets_io.image_cache import ImageCache, load_pixels
from datasets_io.images import ImageSpec
from datasets_io.jsonl import join
from datasets_io.records import CHEXPERT_LABELS, parse_target

MAX_IMAGES = 4096  # images decoded for the pre-training (a random subset of larger curricula), ~200 MB at 128 px


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """torch on one intra-op thread for the block: CPU kernels then sum in one order, whatever the process's setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def label_matrix(targets: Sequence[str], uncertain: float = 0.0) -> np.ndarray:
    """(n, 14) float32: 1 where a target's CheXpert block says Positive, `uncertain` where it says Uncertain, else 0."""
    value = {"Positive": 1.0, "Uncertain": uncertain}
    out = np.zeros((len(targets), len(CHEXPERT_LABELS)), dtype=np.float32)
    for i, target in enumerate(targets):
        chexpert = parse_target(target, expect_icd=False).chexpert or {}
        out[i] = [value.get(chexpert.get(label), 0.0) for label in CHEXPERT_LABELS]
    return out


def positive_weights(labels: torch.Tensor) -> torch.Tensor:
    """(14,) BCE pos_weight from an (n, 14) label matrix (0/1, Uncertain entries at their target): negatives /
    positives per label, each summed; 1 for a label that is never or always positive (nothing to balance)."""
    positives = labels.sum(dim=0)
    negatives = len(labels) - positives
    return torch.where((positives > 0) & (negatives > 0), negatives / positives.clamp(min=1), 1.0)


def head_logits(tower: Any, head: torch.nn.Linear, pixels: torch.Tensor) -> torch.Tensor:
    """(n, 14) label logits: the head on each patch token (CLS dropped, as LLaVA does), max-pooled over patches."""
    return head(tower(pixel_values=pixels).last_hidden_state[:, 1:]).amax(dim=1)


def pretrain_vision_tower(
    tower: Any,
    images: Sequence[str],
    targets: Sequence[str],
    *,
    data_root: str,
    spec: ImageSpec,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    uncertain: float = 0.0,
    image_cache: ImageCache | None = None,
) -> tuple[torch.nn.Linear, dict[str, float]]:
    """Train `tower` (a CLIPVisionModel, in place) for `steps` steps on (image path, target) pairs of Stage A training
    records, their images read through the run's `image_cache` (so the first epoch finds them decoded); returns the
    label head (the recipe drops it; benchmarks/tower_probe.py scores what the tower sees with it) and what it did
    (for the log)."""
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    keep = np.sort(rng.choice(len(images), size=min(len(images), MAX_IMAGES), replace=False))
    pixels = torch.from_numpy(np.stack([load_pixels(join(data_root, images[i]), spec, image_cache) for i in keep]))
    labels = torch.from_numpy(label_matrix([targets[i] for i in keep], uncertain))
    pos_weight = positive_weights(labels)
    with one_thread():
        torch.manual_seed(seed)
        head = torch.nn.Linear(tower.config.hidden_size, len(CHEXPERT_LABELS))
        optimizer = torch.optim.AdamW([*tower.parameters(), *head.parameters()], lr=lr, fused=True)
        tower.train()
        losses = []
        for _ in range(steps):
            idx = torch.from_numpy(rng.integers(0, len(keep), size=batch_size))
            logits = head_logits(tower, head, pixels[idx])
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels[idx], pos_weight=pos_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    tail = losses[-max(1, steps // 10) :]  # the last tenth: one batch's loss is noisy
    return head, {
        "steps": steps,
        "images": len(keep),
        "first_loss": round(losses[0], 4) if losses else None,
        "final_loss": round(sum(tail) / len(tail), 4) if losses else None,
        "seconds": time.perf_counter() - t0,
    }
