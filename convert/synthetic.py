"""A stand-in ImageNet made from scratch: deterministic JPEGs with ImageNet-like sizes and file sizes.

Each class has its own hue palette and an oriented stripe pattern (angle and period), so a small CNN
learns it within a few epochs; low-frequency blobs and pixel noise give photo-like texture and decode cost.
"""
from __future__ import annotations

import math
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

GOLDEN_ANGLE = math.pi * (3 - math.sqrt(5))
ASPECT_RATIOS = (1.0, 4 / 3, 3 / 4, 3 / 2, 2 / 3, 16 / 9, 5 / 4)


def class_name(label: int) -> str:
    return f"class{label:03d}"


def class_style(label: int, classes: int) -> dict:
    """Fixed per-class parameters: a hue, a stripe angle and a stripe count across the image."""
    return {"hue": 360.0 * label / classes,
            "angle": (label * GOLDEN_ANGLE) % math.pi,
            "stripes": 3 + (label * 7) % 9}


def image_size(rng: np.random.Generator, min_side: int, max_side: int) -> tuple[int, int]:
    longest = int(rng.integers(max(min_side, (min_side + max_side) // 2), max_side + 1))
    aspect = ASPECT_RATIOS[int(rng.integers(len(ASPECT_RATIOS)))] * rng.uniform(0.95, 1.05)
    shortest = int(np.clip(round(longest / max(aspect, 1 / aspect)), min_side, max_side))
    return (longest, shortest) if aspect >= 1 else (shortest, longest)


def smooth_noise(rng: np.random.Generator, width: int, height: int, cell: int) -> np.ndarray:
    """Low-frequency noise in [-1, 1]: a coarse random grid upsampled with cubic interpolation."""
    grid = rng.uniform(-1, 1, size=(height // cell + 2, width // cell + 2)).astype(np.float32)
    return np.clip(cv2.resize(grid, (width, height), interpolation=cv2.INTER_CUBIC), -1, 1)


def render(label: int, classes: int, rng: np.random.Generator, min_side: int = 200,
           max_side: int = 500) -> np.ndarray:
    """One uint8 HxWx3 image of class `label`."""
    width, height = image_size(rng, min_side, max_side)
    style = class_style(label, classes)
    angle = style["angle"] + rng.normal(0, 0.08)
    period = min(width, height) / (style["stripes"] * rng.uniform(0.85, 1.15))
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    stripes = np.sin(2 * np.pi * (x * np.cos(angle) + y * np.sin(angle)) / period + rng.uniform(0, 2 * np.pi))
    blobs = smooth_noise(rng, width, height, cell=max(8, min(width, height) // 6))
    hue = (style["hue"] + rng.normal(0, 6) + 25 * stripes + 15 * blobs) % 360
    saturation = np.clip(0.65 + 0.2 * blobs + rng.normal(0, 0.05), 0.2, 1.0)
    value = np.clip(0.6 + 0.25 * stripes + 0.12 * blobs * rng.uniform(0.5, 1.5), 0.05, 1.0)
    hsv = np.stack([hue, np.broadcast_to(saturation, hue.shape), value], axis=-1).astype(np.float32)
    rgb = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB) * 255
    rgb += rng.normal(0, 7, size=rgb.shape).astype(np.float32)   # sensor-like grain: JPEGs of tens of KB
    return np.clip(rgb, 0, 255).astype(np.uint8)


def _write_one(job: tuple) -> int:
    path, label, classes, seed, index, min_side, max_side, quality = job
    rng = np.random.default_rng([seed, label, index])
    Image.fromarray(render(label, classes, rng, min_side, max_side)).save(path, "JPEG", quality=quality)
    return os.path.getsize(path)


def make_synthetic(out: str | os.PathLike, classes: int = 10, per_class: int = 100, seed: int = 0,
                   val_per_class: int = 0, min_side: int = 200, max_side: int = 500, quality: int = 90,
                   workers: int | None = None) -> dict:
    """Write OUT/<class>/<n>.JPEG (or OUT/train/... and OUT/val/... when val_per_class > 0).

    Deterministic for a seed. Returns {"images": count, "bytes": total size, "root": OUT}.
    """
    if classes < 1 or per_class < 1 or val_per_class < 0:
        raise ValueError("need --classes >= 1, --per-class >= 1 and --val-per-class >= 0")
    if not 1 <= min_side <= max_side:
        raise ValueError(f"need 1 <= min_side <= max_side, got {min_side}, {max_side}")
    out = Path(out)
    parts = [("train", per_class, 0), ("val", val_per_class, per_class)] if val_per_class else [("", per_class, 0)]
    jobs = []
    for split, count, offset in parts:
        for label in range(classes):
            folder = out / split / class_name(label)
            folder.mkdir(parents=True, exist_ok=True)
            jobs += [(folder / f"{class_name(label)}_{index:05d}.JPEG", label, classes, seed, index,
                      min_side, max_side, quality) for index in range(offset, offset + count)]
    workers = workers or os.cpu_count() or 1
    if workers == 1 or len(jobs) < 64:
        sizes = list(map(_write_one, jobs))
    else:
        with ProcessPoolExecutor(workers) as pool:
            sizes = list(pool.map(_write_one, jobs, chunksize=16))
    return {"images": len(jobs), "bytes": sum(sizes), "root": str(out)}
