"""What does the tiny base's vision tower see after its pre-training, before the LM ever reads it?

    python benchmarks/tower_probe.py [--styles default] [--seeds 0] [--work runs/styles] [--eval-studies 1000]
        [--set model.tiny.vision_pretrain_steps=N ...]

For each style (its data made or reused as benchmarks/styles.py does: the 1,200-study training file and a held-out
evaluation file of other patients) and seed: a tower of `configs/tiny.yaml`'s `model.tiny` shape (with `--set`
overrides) is drawn with the seed and pre-trained exactly as the recipe does (training/vision_pretrain.py: the Stage A
training rows' CheXpert labels, weighted BCE, max over patches, `train.lr`, `train.micro_batch_size`,
`model.tiny.vision_pretrain_steps`). Its pre-training head then scores every image, and for each label the style
draws in the pixels the probe prints:
- AUC and F1 (at logit 0) on the evaluation file, Uncertain counted as present (the U+ scoring of
  benchmarks/styles.py): what the tower sees in patients it never trained on;
- AUC on its own training images: a label seen there but not on the evaluation file was memorized (each training
  image's other features), not learned.
The tower here is drawn on its own (CLIPVisionModel), not inside the whole tiny LLaVA, so its random start differs
from the recipe's for the same seed; the pre-training is the same code. One thread, ~90 s per run at the default
shape on a 2-core machine. Last line: the mean AUC over the drawn labels and the lowest label, with its train AUC.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from styles import EVAL_STUDIES, pixel_labels, style_data

from datasets_io.config import load_config
from datasets_io.image_cache import load_pixels
from datasets_io.images import ImageSpec
from datasets_io.jsonl import join, read_records
from datasets_io.records import CHEXPERT_LABELS
from training.metrics.scores import f1_counts, f1_from_counts
from training.model import tiny_vision_config
from training.vision_pretrain import head_logits, label_matrix, one_thread, pretrain_vision_tower

REPO = Path(__file__).resolve().parents[1]


def auc(scores: np.ndarray, truth: np.ndarray) -> float | None:
    """Area under the ROC curve: P(a positive scores above a negative), ties counting half; None without both."""
    pos, neg = scores[truth == 1], scores[truth == 0]
    if not len(pos) or not len(neg):
        return None
    return float((pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean())


def stage_a_rows(path: Path) -> tuple[list[str], list[str]]:
    """(image paths, targets) of a curriculum file's Stage A rows: one per study, what the pre-training reads."""
    records, _ = read_records(str(path), str(path.parent))
    rows = [r for r in records if r.stage == "A"]
    return [r.image for r in rows], [r.target for r in rows]


def logits_of(tower, head, images: list[str], root: str, spec: ImageSpec) -> np.ndarray:
    pixels = torch.from_numpy(np.stack([load_pixels(join(root, i), spec, None) for i in images]))
    tower.eval()
    with one_thread(), torch.no_grad():
        return torch.cat([head_logits(tower, head, pixels[i : i + 64]) for i in range(0, len(pixels), 64)]).numpy()


def probe(style: str, seed: int, work: Path, sets: list[str], eval_studies: int) -> dict:
    from transformers import CLIPVisionModel

    cfg = load_config(REPO / "configs" / "tiny.yaml", sets)
    data, eval_file = style_data(style, work, eval_studies)
    train_images, train_targets = stage_a_rows(data / cfg.data.train_file)
    eval_images, eval_targets = stage_a_rows(eval_file)
    spec = ImageSpec(cfg.model.tiny.image_size)
    torch.manual_seed(seed)
    tower = CLIPVisionModel(tiny_vision_config(cfg))
    head, done = pretrain_vision_tower(
        tower,
        train_images,
        train_targets,
        data_root=str(data),
        spec=spec,
        steps=cfg.model.tiny.vision_pretrain_steps,
        lr=cfg.train.lr,
        batch_size=cfg.train.micro_batch_size,
        seed=seed,
        uncertain=cfg.model.tiny.vision_pretrain_uncertain,
    )
    on_eval = logits_of(tower, head, eval_images, str(eval_file.parent), spec)
    on_train = logits_of(tower, head, train_images, str(data), spec)
    # the evaluation file as the evaluation scores it (U+: Uncertain counts as present); the training images as the
    # pre-training saw them
    eval_truth = label_matrix(eval_targets, uncertain=1.0)
    train_truth = label_matrix(train_targets, cfg.model.tiny.vision_pretrain_uncertain)
    # per-label F1 at logit 0 with the evaluation's own machinery (a label with nothing predicted or present: 0)
    f1 = f1_from_counts(f1_counts(on_eval > 0, eval_truth == 1).sum(0), "none", zero_division=0.0)
    labels = {}
    for label in pixel_labels(style):
        j = CHEXPERT_LABELS.index(label)
        labels[label] = {
            "auc": auc(on_eval[:, j], eval_truth[:, j]),
            "f1": float(f1[j]),
            "positives": int(eval_truth[:, j].sum()),
            "train_auc": auc(on_train[:, j], train_truth[:, j]),
            "train_positives": int(train_truth[:, j].sum()),
        }
    return {"style": style, "seed": seed, "pretrain_seconds": done["seconds"], "labels": labels}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--styles", nargs="+", default=["default"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--work", type=Path, default=REPO / "runs" / "styles")
    ap.add_argument("--eval-studies", type=int, default=EVAL_STUDIES)
    ap.add_argument("--set", dest="sets", action="append", default=[], help="config override, as launcher --set")
    args = ap.parse_args()
    results = []
    for style in args.styles:
        for seed in args.seeds:
            t0 = time.perf_counter()
            r = probe(style, seed, args.work, args.sets, args.eval_studies)
            results.append(r)
            print(f"{style} seed {seed}: pre-training {r['pretrain_seconds']:.0f}s ({time.perf_counter() - t0:.0f}s)")
            for label, v in r["labels"].items():
                shown = "   -  " if v["auc"] is None else f"{v['auc']:.3f}"
                print(
                    f"  {label:27s} eval AUC {shown}  F1 {v['f1']:.2f}  ({v['positives']} positives)"
                    f"   train AUC {v['train_auc'] or 0:.3f} ({v['train_positives']})"
                )
    (args.work / "tower_probe.json").write_text(json.dumps({"sets": args.sets, "runs": results}, indent=2))
    per_label: dict[str, list[tuple[float, float]]] = {}
    for r in results:
        for label, v in r["labels"].items():
            if v["auc"] is not None:
                per_label.setdefault(label, []).append((v["auc"], v["train_auc"] or 0.0))
    means = {label: statistics.fmean(a for a, _ in vs) for label, vs in per_label.items()}
    lowest = min(means, key=means.get)
    train_lowest = statistics.fmean(t for _, t in per_label[lowest])
    print(
        f"tower alone: mean eval AUC {statistics.fmean(means.values()):.3f} over {len(means)} drawn labels; "
        f"lowest {lowest} {means[lowest]:.3f} (train AUC {train_lowest:.3f})"
    )


if __name__ == "__main__":
    main()
