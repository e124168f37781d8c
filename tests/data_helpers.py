"""Tiny converted data sets for the loader tests, written with FFCV's DatasetWriter directly.

Each image's colour encodes its index (red = 6 * index, green = label * 100, a blue gradient across),
so a decoded, cropped batch still tells which sample it came from.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from fastpipe.data.beton import write_json_atomic

CLASSES = ["class000", "class001", "class002"]


def sample_image(index: int, label: int, width: int, height: int) -> np.ndarray:
    image = np.empty((height, width, 3), dtype=np.uint8)
    image[..., 0] = (6 * index) % 256
    image[..., 1] = label * 100
    image[..., 2] = np.linspace(0, 255, width, dtype=np.uint8)[None, :]
    return image


def write_split(root: Path, out: Path, split: str, count: int, write_mode: str, offset: int) -> dict:
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    samples, arrays = [], []
    rng = np.random.default_rng(offset)
    for i in range(count):
        label = i % len(CLASSES)
        width, height = (int(v) for v in rng.integers(40, 80, size=2))
        pixels = sample_image(offset + i, label, width, height)
        relative = f"{split}/{CLASSES[label]}/img{i:03d}.png"   # PNG: lossless originals
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(root / relative)
        samples.append([relative, label])
        arrays.append((pixels, label))

    beton = out / f"{split}.beton"
    fields = {"image": RGBImageField(write_mode=write_mode, jpeg_quality=95, compress_probability=0.5),
              "label": IntField()}
    np.random.seed(0)   # 'proportion' mode draws from numpy's global RNG
    DatasetWriter(str(beton), fields, num_workers=1).from_indexed_dataset(arrays)
    return {"beton": beton.name, "written": count, "skipped": [], "size_bytes": beton.stat().st_size,
            "sha256": "", "samples": samples,
            "settings": {"write_mode": write_mode, "max_resolution": None, "jpeg_quality": 95,
                         "compress_probability": 0.5, "seed": 0}}


def write_dataset(base: Path, train: int = 24, val: int = 18, write_mode: str = "jpg") -> Path:
    """An ImageFolder under base/images and its betons + manifest under base/betons."""
    root, out = base / "images", base / "betons"
    out.mkdir(parents=True, exist_ok=True)
    splits = {"train": write_split(root, out, "train", train, write_mode, offset=0),
              "val": write_split(root, out, "val", val, write_mode, offset=train)}
    write_json_atomic(out / "manifest.json", {
        "format": 1, "created": "", "source_root": str(root.resolve()), "layout": "train_val",
        "classes": CLASSES, "splits": splits, "versions": {}})
    return out
