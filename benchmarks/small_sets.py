"""The small-image data sets the LR sweep and the quality benchmark train on, written as ImageFolders and
converted with `python -m convert folder`:

- `synthetic`: `python -m convert synthetic` at 28-32 px (hue and stripes tell the 10 classes apart);
- `hard`: 20 classes that share hues, angles and stripe widths pairwise, so only their combination names
  the class, under heavy grain, random brightness and occluding blobs;
- `digits`: scikit-learn's bundled 8x8 scans of handwritten digits (1,797 real images), upscaled to 28 px.
"""
from __future__ import annotations

import json
import math
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

SETS = ("synthetic", "hard", "digits")
SIDE = 28          # px: the digits' size, and the hard set's
HARD_HUES, HARD_ANGLES, HARD_PERIODS = 5, 2, 2   # 5 x 2 x 2 = 20 classes


def hard_style(label: int) -> tuple[float, float, float]:
    """(hue, stripe angle, stripe period in px) of a hard-set class: classes share every single feature."""
    hue_index, rest = divmod(label, HARD_ANGLES * HARD_PERIODS)
    angle_index, period_index = divmod(rest, HARD_PERIODS)
    return 360.0 * hue_index / HARD_HUES, math.pi / 4 + angle_index * math.pi / 2.5, 4.5 + 2.5 * period_index


def render_hard(label: int, rng: np.random.Generator, side: int = SIDE) -> np.ndarray:
    from convert.synthetic import smooth_noise

    hue, angle, period = hard_style(label)
    angle += rng.normal(0, 0.12)
    period *= rng.uniform(0.9, 1.1)
    y, x = np.mgrid[0:side, 0:side].astype(np.float32)
    stripes = np.sin(2 * np.pi * (x * np.cos(angle) + y * np.sin(angle)) / period + rng.uniform(0, 2 * np.pi))
    blobs = smooth_noise(rng, side, side, cell=max(4, side // 4))
    hsv = np.stack([(hue + rng.normal(0, 14) + 10 * blobs) % 360,
                    np.clip(0.55 + 0.25 * blobs + rng.normal(0, 0.1), 0.1, 1.0),
                    np.clip(rng.uniform(0.35, 0.75) + 0.18 * stripes + 0.2 * blobs, 0.02, 1.0)], axis=-1)
    rgb = cv2.cvtColor(hsv.astype(np.float32), cv2.COLOR_HSV2RGB) * 255
    occluder = smooth_noise(rng, side, side, cell=max(4, side // 3)) > 0.55   # a random patch hides the pattern
    rgb[occluder] = rng.uniform(0, 255, size=3)
    rgb += rng.normal(0, 28, size=rgb.shape)
    return np.clip(rgb, 0, 255).astype(np.uint8)


def _write_hard(job: tuple) -> None:
    path, label, seed, index = job
    Image.fromarray(render_hard(label, np.random.default_rng([seed, label, index]))).save(path)


def make_hard(out: str | os.PathLike, per_class: int, val_per_class: int, seed: int = 0,
              workers: int | None = None) -> int:
    """OUT/train/<class>/*.png and OUT/val/<class>/*.png of the hard set; returns the image count."""
    from convert.synthetic import class_name

    out = Path(out)
    jobs = []
    for split, count, offset in (("train", per_class, 0), ("val", val_per_class, per_class)):
        for label in range(HARD_HUES * HARD_ANGLES * HARD_PERIODS):
            folder = out / split / class_name(label)
            folder.mkdir(parents=True, exist_ok=True)
            jobs += [(folder / f"{index:05d}.png", label, seed, index) for index in range(offset, offset + count)]
    with ProcessPoolExecutor(workers or os.cpu_count() or 1) as pool:
        list(pool.map(_write_hard, jobs, chunksize=64))
    return len(jobs)


def make_digits(out: str | os.PathLike, side: int = SIDE) -> int:
    """OUT/<digit>/*.png: scikit-learn's digits (0-16 ink levels, 8x8) as white-on-black RGB images."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    out = Path(out)
    for index, (pixels, label) in enumerate(zip(digits.images, digits.target)):
        folder = out / f"digit{label}"
        folder.mkdir(parents=True, exist_ok=True)
        gray = Image.fromarray((pixels * (255 / 16)).astype(np.uint8)).resize((side, side), Image.BICUBIC)
        gray.convert("RGB").save(folder / f"{index:04d}.png")
    return len(digits.images)


def prepare(name: str, root: str | os.PathLike, *, per_class: int = 150, val_per_class: int = 30,
            workers: int | None = None) -> Path:
    """Write set `name` under ROOT/<name>/images and convert it to ROOT/<name>/betons (skipped when the
    betons are already there). Returns the betons folder."""
    from convert.__main__ import main as convert

    base = Path(root) / name
    images, betons = base / "images", base / "betons"
    if (betons / "manifest.json").is_file():
        return betons
    if name == "synthetic":
        from convert.synthetic import make_synthetic

        make_synthetic(images, classes=10, per_class=per_class, val_per_class=val_per_class, min_side=28,
                       max_side=32, workers=workers)
    elif name == "hard":
        make_hard(images, per_class, val_per_class, workers=workers)
    elif name == "digits":
        make_digits(images)
    else:
        raise ValueError(f"unknown data set '{name}'; choose from {', '.join(SETS)}")
    # digits have no split of their own: a fifth of each class goes to val
    if convert(["folder", str(images), "--out", str(betons), "--val-fraction", "0.2",
                "--workers", str(workers or os.cpu_count() or 1)]) != 0:
        raise RuntimeError(f"`python -m convert folder {images}` failed")
    return betons


def train_once(config_name: str, betons: Path, run_dir: Path, overrides: list[str]) -> dict:
    """One training run with `python -m fastpipe.train`'s Trainer (skipped when run_dir already holds its
    summary, so a benchmark stopped part-way continues); returns its summary.json."""
    from fastpipe.config import load_config
    from fastpipe.train import Trainer

    summary = run_dir / "summary.json"
    if not summary.is_file():
        config = load_config(config_name, [f"--data.path={betons}", f"--run.dir={run_dir}", *overrides])
        if Trainer(config, run_dir).fit() != 0:
            raise RuntimeError(f"training in {run_dir} failed")
    return json.loads(summary.read_text())
