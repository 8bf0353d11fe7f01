"""The image path: JPEG bytes -> normalized (3, S, S) float32, with Pillow and numpy only (no torchvision).

The cost that matters is decoding a 3056x2544 MIMIC JPEG. `Image.draft` asks libjpeg for a reduced-DCT decode at
1/2, 1/4 or 1/8 scale: the smallest scale whose result is still at least the model's input size, so a 336 px model
decodes ~382x318 pixels instead of 7.8 M. Grayscale stays one channel until the end (3x less resize work).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
GRAY_RECIPE = 1
"""Version of what `load_gray` computes; part of the image cache's key. Bump it whenever `load_gray` changes."""


@dataclass(frozen=True)
class ImageSpec:
    """What the vision tower wants: a square side, and per-channel mean/std."""

    size: int
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD


def load_gray(data: bytes | BinaryIO, size: int) -> Image.Image:
    """Decode to an 8-bit grayscale image whose longer side is `size`, using reduced-DCT draft decoding. `data` is
    the file's bytes or an open binary file (Pillow then reads it in 64 KiB blocks: no 1 MB buffer to fault in)."""
    im = Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)
    # The final image has its LONGER side = size, so ask draft() for the box the image will be resized to: it picks
    # the largest DCT scale-down (1/2, 1/4, 1/8) that keeps both sides >= that box. Only JPEGs have a draft mode.
    w0, h0 = im.size
    im.draft("L", (math.ceil(size * w0 / max(w0, h0)), math.ceil(size * h0 / max(w0, h0))))
    im = im.convert("L")
    w, h = im.size
    scale = size / max(w, h)
    new = (max(1, round(w * scale)), max(1, round(h * scale)))
    if new != (w, h):
        im = im.resize(new, Image.BILINEAR, reducing_gap=2.0)
    return im


def to_pixel_values(gray: Image.Image, spec: ImageSpec) -> np.ndarray:
    """Pad a grayscale image to a centred square of 3 normalized channels. Returns (3, S, S) float32."""
    return normalize_gray(np.asarray(gray, dtype=np.uint8), spec)


def normalize_gray(gray: np.ndarray, spec: ImageSpec) -> np.ndarray:
    """(h, w) uint8 -> (3, S, S) float32: centred in the square, normalized per channel. The image cache stores the
    uint8 input of this function, so a cached image and a freshly decoded one give the same floats bit for bit."""
    s = spec.size
    h, w = gray.shape
    mean = np.asarray(spec.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(spec.std, dtype=np.float32)[:, None, None]
    # Pad with the mean colour, as LLaVA's expand2square does: padding normalizes to exactly 0 in every channel.
    out = np.zeros((3, s, s), dtype=np.float32)
    top, left = (s - h) // 2, (s - w) // 2
    pixels = gray.astype(np.float32)[None, :, :]  # (1, h, w), broadcast to 3 channels
    pixels /= 255.0
    view = out[:, top : top + h, left : left + w]  # written in place: no (3, h, w) temporaries
    np.subtract(pixels, mean, out=view)
    view /= std
    return out


def preprocess_image(data: bytes, spec: ImageSpec) -> np.ndarray:
    """JPEG (or PNG) bytes -> (3, S, S) float32, model-ready."""
    return to_pixel_values(load_gray(data, spec.size), spec)


def preprocess_image_naive(data: bytes, spec: ImageSpec) -> np.ndarray:
    """The baseline the benchmark compares against: full-resolution decode, RGB, resize, normalize."""
    im = Image.open(io.BytesIO(data)).convert("RGB").resize((spec.size, spec.size), Image.BICUBIC)
    arr = np.asarray(im, dtype=np.float32) / 255.0
    return ((arr - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)).transpose(2, 0, 1)
