"""The small-image data sets the LR sweep and the quality benchmark train on, written as ImageFolders and
converted with `python -m convert folder`:

- `synthetic`: `python -m convert synthetic` at 28-32 px (hue and stripes tell the 10 classes apart);
- `hard`: 20 classes that share hues, angles and stripe widths pairwise, so only their combination names
  the class, under heavy grain, random brightness and occluding blobs;
- `digits`: scikit-learn's bundled 8x8 scans of handwritten digits (1,797 real images), upscaled to 28 px;
- `fashion`: Fashion-MNIST, 70,000 real 28 px photographs of clothing in 10 classes (60,000 train, the
  10,000 test images as val), read from Debian's `dataset-fashion-mnist` package (`apt-get install
  dataset-fashion-mnist`); `fashion-small` is its first 400 train and 100 test images per class.
"""
from __future__ import annotations

import gzip
import json
import math
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import tomllib
from PIL import Image

from convert.__main__ import main as convert
from convert.synthetic import class_name, make_synthetic, smooth_noise
from fastpipe.config import load_config, to_toml
from fastpipe.data.beton import read_manifest
from fastpipe.train import Trainer

SETS = ("synthetic", "hard", "digits")            # made here, from a package's data or from nothing
REAL_SETS = ("fashion-small", "fashion")          # need the Debian package; `fashion` trains for ~17 minutes
BENCH_SETS = (*SETS, "fashion-small")             # the default of `benchmarks lr-sweep` and `benchmarks quality`
FASHION_DIR = Path(os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
FASHION_CLASSES = ("tshirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                   "ankle_boot")
SIDE = 28          # px: the digits' size, and the hard set's
HARD_HUES, HARD_ANGLES, HARD_PERIODS = 5, 2, 2   # 5 x 2 x 2 = 20 classes
GENERATED_CLASSES = {"synthetic": 10, "hard": HARD_HUES * HARD_ANGLES * HARD_PERIODS}   # classes of the sets made here


def hard_style(label: int) -> tuple[float, float, float]:
    """(hue, stripe angle, stripe period in px) of a hard-set class: classes share every single feature."""
    hue_index, rest = divmod(label, HARD_ANGLES * HARD_PERIODS)
    angle_index, period_index = divmod(rest, HARD_PERIODS)
    return 360.0 * hue_index / HARD_HUES, math.pi / 4 + angle_index * math.pi / 2.5, 4.5 + 2.5 * period_index


def render_hard(label: int, rng: np.random.Generator, side: int = SIDE) -> np.ndarray:
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
    out = Path(out)
    jobs = []
    for split, count, offset in (("train", per_class, 0), ("val", val_per_class, per_class)):
        for label in range(GENERATED_CLASSES["hard"]):
            folder = out / split / class_name(label)
            folder.mkdir(parents=True, exist_ok=True)
            jobs += [(folder / f"{index:05d}.png", label, seed, index) for index in range(offset, offset + count)]
    with ProcessPoolExecutor(workers or os.cpu_count() or 1) as pool:
        list(pool.map(_write_hard, jobs, chunksize=64))
    return len(jobs)


def make_digits(out: str | os.PathLike, side: int = SIDE) -> int:
    """OUT/<digit>/*.png: scikit-learn's digits (0-16 ink levels, 8x8) as white-on-black RGB images."""
    from sklearn.datasets import load_digits  # scikit-learn: a dev extra, only the digits set needs it

    digits = load_digits()
    out = Path(out)
    for index, (pixels, label) in enumerate(zip(digits.images, digits.target)):
        folder = out / f"digit{label}"
        folder.mkdir(parents=True, exist_ok=True)
        gray = Image.fromarray((pixels * (255 / 16)).astype(np.uint8)).resize((side, side), Image.BICUBIC)
        gray.convert("RGB").save(folder / f"{index:04d}.png")
    return len(digits.images)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """An IDX file (the MNIST family's format, gzipped or not) as a uint8 array: images N x H x W, labels N.
    Written by hand: the format is a 4-byte magic (0, 0, type 0x08 = uint8, rank) and one big-endian uint32
    per dimension, then the data; no kept library reads it without downloading."""
    path = Path(path)
    with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as file:
        data = file.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path}: not an IDX file of unsigned bytes (magic {data[:4].hex()}); expected "
                         "an MNIST-format file such as train-images-idx3-ubyte.gz")
    rank = data[3]
    if len(data) < 4 + 4 * rank:
        raise ValueError(f"{path}: {len(data):,} bytes end inside its header ({rank} dimensions need "
                         f"{4 + 4 * rank} bytes); the file is truncated or damaged (reinstall the package it came from)")
    shape = tuple(int(n) for n in np.frombuffer(data, ">u4", count=rank, offset=4))
    expected = 4 + 4 * rank + int(np.prod(shape))
    if len(data) != expected:
        raise ValueError(f"{path}: {len(data):,} bytes, but its header {shape} needs {expected:,}; the file is "
                         "truncated or damaged (reinstall the package it came from)")
    return np.frombuffer(data, np.uint8, offset=4 + 4 * rank).reshape(shape)


def make_fashion(out: str | os.PathLike, per_class: int | None = None, val_per_class: int | None = None,
                 source: str | os.PathLike = FASHION_DIR) -> int:
    """OUT/train/<class>/*.png and OUT/val/<class>/*.png of Fashion-MNIST (val: its test split), the first
    `per_class` / `val_per_class` images of each class (all when None); returns the image count."""
    source = Path(source)
    files = {split: (source / f"{stem}-images-idx3-ubyte.gz", source / f"{stem}-labels-idx1-ubyte.gz")
             for split, stem in (("train", "train"), ("val", "t10k"))}
    missing = [str(path) for pair in files.values() for path in pair if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"Fashion-MNIST is not installed: {', '.join(missing)} missing. Install it with "
                                "`apt-get install dataset-fashion-mnist` (Debian), or point FASHION_MNIST_DIR "
                                "at a folder holding the four *-ubyte.gz files.")
    out, written = Path(out), 0
    for split, (image_file, label_file) in files.items():
        images, labels = read_idx(image_file), read_idx(label_file)
        if images.ndim != 3 or labels.shape != images.shape[:1]:
            raise ValueError(f"{image_file} ({images.shape}) and {label_file} ({labels.shape}) do not match")
        limit = per_class if split == "train" else val_per_class
        for label, name in enumerate(FASHION_CLASSES):
            folder = out / split / f"{label}_{name}"
            folder.mkdir(parents=True, exist_ok=True)
            for index in np.flatnonzero(labels == label)[:limit]:
                Image.fromarray(images[index]).convert("RGB").save(folder / f"{index:05d}.png")
                written += 1
    return written


def prepare(name: str, root: str | os.PathLike, *, per_class: int = 150, val_per_class: int = 30,
            workers: int | None = None) -> Path:
    """Write set `name` under ROOT/<name>/images and convert it to ROOT/<name>/betons (skipped when the
    betons are already there). Returns the betons folder. `per_class` / `val_per_class` size the generated
    sets; the real ones have sizes of their own."""
    base = Path(root) / name
    images, betons = base / "images", base / "betons"
    if (betons / "manifest.json").is_file():
        classes = GENERATED_CLASSES.get(name)
        if classes is not None:   # a generated set: made at the sizes asked for?
            asked = {"train": classes * per_class, "val": classes * val_per_class}
            found = {split: split_size(betons, split) for split in asked}
            if found != asked:
                raise RuntimeError(f"{betons} holds {found['train']:,} train / {found['val']:,} val images, but "
                                   f"{per_class} / {val_per_class} per class make {asked['train']:,} / "
                                   f"{asked['val']:,}: remove {base} to make it again, or use another --data-root")
        return betons
    if name == "synthetic":
        make_synthetic(images, classes=GENERATED_CLASSES["synthetic"], per_class=per_class, val_per_class=val_per_class, min_side=28,
                       max_side=32, workers=workers)
    elif name == "hard":
        make_hard(images, per_class, val_per_class, workers=workers)
    elif name == "digits":
        make_digits(images)
    elif name == "fashion":
        make_fashion(images)
    elif name == "fashion-small":
        make_fashion(images, per_class=400, val_per_class=100)
    else:
        raise ValueError(f"unknown data set '{name}'; choose from {', '.join(SETS + REAL_SETS)}")
    # digits have no split of their own: a fifth of each class goes to val
    if convert(["folder", str(images), "--out", str(betons), "--val-fraction", "0.2",
                "--workers", str(workers or os.cpu_count() or 1)]) != 0:
        raise RuntimeError(f"`python -m convert folder {images}` failed")
    return betons


def split_size(betons: Path, split: str) -> int:
    """Images written to a converted set's split ("train" or "val")."""
    return int(read_manifest(betons)["splits"][split]["written"])


def train_once(config_name: str, betons: Path, run_dir: Path, overrides: list[str]) -> dict:
    """One training run with `python -m fastpipe.train`'s Trainer; returns its summary.json. Skipped when
    run_dir already holds a finished run of the same resolved config, so a benchmark stopped part-way
    continues; a finished run of other settings (a --quick check, other epochs or data) stops with what
    differs rather than passing for this one."""


    config = load_config(config_name, [f"--data.path={betons}", f"--run.dir={run_dir}", *overrides])
    summary, stored = run_dir / "summary.json", run_dir / "config.toml"
    if summary.is_file():
        wanted = tomllib.loads(to_toml(config))   # run.dir is run_dir already, as in the trainer's copy
        found = tomllib.loads(stored.read_text()) if stored.is_file() else {}
        differ = _differences(found, wanted)
        if not differ:
            return json.loads(summary.read_text())
        raise RuntimeError(f"{run_dir} holds a finished run with other settings ({'; '.join(differ[:4])}"
                           f"{'; ...' if len(differ) > 4 else ''}): remove that folder to train it again, or give "
                           "the benchmark another --out")
    if Trainer(config, run_dir).fit() != 0:
        raise RuntimeError(f"training in {run_dir} failed")
    return json.loads(summary.read_text())


def _differences(found: dict, wanted: dict, prefix: str = "") -> list[str]:
    """'key: X there, Y now' for each dotted key whose value differs between two parsed config trees."""
    lines = []
    for key in sorted(set(found) | set(wanted)):
        a, b = found.get(key, "(none)"), wanted.get(key, "(none)")
        if isinstance(a, dict) and isinstance(b, dict):
            lines += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            lines.append(f"{prefix}{key}: {a!r} there, {b!r} now")
    return lines
