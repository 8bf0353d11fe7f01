"""Samples/s per core turning MIMIC-size JPEGs (3056x2544) into model-ready tensors: the project's path (reduced-DCT
draft decode, grayscale until the end, pad, normalize) against a naive baseline (full-resolution decode, RGB,
resize), measured in the same run on the same files, one process (= one core).

    python benchmarks/data_pipeline.py [--images 12] [--size 336] [--repeats 3]
Target: >= 4x the naive path.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from datasets_io.images import ImageSpec, preprocess_image, preprocess_image_naive
from datasets_io.synth import write_synthetic


def rate(fn, blobs, spec, repeats) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for b in blobs:
            fn(b, spec)
        best = min(best, time.perf_counter() - t0)
    return len(blobs) / best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=12)
    ap.add_argument("--size", type=int, default=336, help="vision tower input (336 for CLIP ViT-L/14-336)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        write_synthetic(d, args.images, seed=0, image_size=(3056, 2544), progress=False)
        blobs = [p.read_bytes() for p in sorted(Path(d, "files").rglob("*.jpg"))]
    spec = ImageSpec(args.size)
    fast = rate(preprocess_image, blobs, spec, args.repeats)
    naive = rate(preprocess_image_naive, blobs, spec, args.repeats)
    print(f"images: {len(blobs)} x 3056x2544 JPEG -> (3, {args.size}, {args.size}) float32, 1 core, best of {args.repeats}")
    print(f"naive (full decode, RGB, resize): {naive:7.1f} samples/s/core")
    print(f"draft-mode path:                  {fast:7.1f} samples/s/core")
    print(f"ratio: {fast / naive:.1f}x (target >= 4x)")


if __name__ == "__main__":
    main()
