"""Read betons back without FFCV's loader: `verify` (decode every sample, check against the manifest)
and `info` (a summary).

FFCV's reader trusts the file and aborts inside OpenCV on a bad one, so this module reads the layout
with `fastpipe.data.beton.BetonSamples` (numpy only, checked) and decodes with cv2.imdecode, which reports
errors instead.
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
from rich.console import Console
from rich.table import Table

from fastpipe.data.beton import (
    MODE_JPEG,
    MODE_RAW,
    BetonError,
    BetonSamples,
    check_beton,
    read_manifest,
    sha256_file,
)
from fastpipe.data.sample_table import SampleTable


def decode_sample(samples: BetonSamples, index: int) -> np.ndarray:
    """Sample `index` as a uint8 HxWx3 RGB array; raises BetonError when it cannot be decoded."""
    width, height, blob = int(samples.width[index]), int(samples.height[index]), samples.encoded(index)
    where = f"{samples.path} sample {index}"
    if samples.mode[index] == MODE_RAW:
        if blob.size < width * height * 3:
            raise BetonError(f"{where}: raw image needs {width * height * 3} bytes, has {blob.size}.")
        return np.array(blob[:width * height * 3]).reshape(height, width, 3)
    if samples.mode[index] != MODE_JPEG:
        raise BetonError(f"{where}: unknown image mode {int(samples.mode[index])}.")
    image = cv2.imdecode(np.asarray(blob), cv2.IMREAD_COLOR)
    if image is None or image.shape != (height, width, 3):
        got = "undecodable JPEG" if image is None else f"{image.shape[1]}x{image.shape[0]}"
        raise BetonError(f"{where}: expected a {width}x{height} JPEG, got {got}.")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def iter_samples(path: str | Path) -> Iterator[tuple[np.ndarray, int]]:
    """(image, label) for every sample of a beton, in order."""
    samples = BetonSamples(path)
    for index in range(len(samples)):
        yield decode_sample(samples, index), int(samples.labels[index])


def verify(data_dir: str | Path, console: Console | None = None) -> dict:
    """Check every beton in DIR against its manifest: integrity, sha256, counts, labels and that every
    sample decodes. Raises BetonError on the first mismatch; returns {split: samples checked}."""
    console = console or Console(soft_wrap=True)
    manifest = read_manifest(data_dir)
    checked = {}
    for split, info in manifest["splits"].items():
        path = check_beton(data_dir, split, manifest)
        fix = f"Re-create it with `python -m convert ... --out {data_dir} --force`."
        if info.get("sha256") and sha256_file(path) != info["sha256"]:
            raise BetonError(f"{path}: sha256 differs from the manifest; the file changed after conversion. {fix}")
        samples = BetonSamples(path)
        listed = SampleTable(data_dir, manifest, split)
        if not len(samples) == info["written"] == len(listed):
            raise BetonError(f"{path}: {len(samples)} samples, manifest says {info['written']} "
                             f"written and lists {len(listed)}. {fix}")
        labels = samples.labels
        expected = np.asarray(listed.labels, dtype=np.int64)
        if labels.size and (labels.min() < 0 or labels.max() >= len(manifest["classes"])):
            raise BetonError(f"{path}: labels outside 0..{len(manifest['classes']) - 1}. {fix}")
        if not np.array_equal(labels, expected):
            first = int(np.flatnonzero(labels != expected)[0])
            raise BetonError(f"{path}: sample {first} has label {labels[first]}, its table says {expected[first]} "
                             f"({listed.name(first)}). {fix}")
        listed.check()
        for index in range(len(samples)):
            decode_sample(samples, index)
        checked[split] = len(samples)
        console.print(f"{split}: {checked[split]} samples OK (size, sha256, labels, names, every image decodes)")
    return checked


def info(data_dir: str | Path, console: Console | None = None) -> None:
    """Print classes, counts, storage settings, size on disk and resolution stats of DIR."""
    console = console or Console(soft_wrap=True, width=max(Console().width, 110))
    manifest = read_manifest(data_dir)
    classes = manifest["classes"]
    shown = ", ".join(classes[:8]) + (f", ... ({len(classes) - 8} more)" if len(classes) > 8 else "")
    console.print(f"{data_dir}: {len(classes)} classes ({shown})")
    console.print(f"source: {manifest.get('source_root')} (layout: {manifest.get('layout')}), "
                  f"created {manifest.get('created')}")
    table = Table()
    for column in ("split", "written", "skipped", "MB on disk", "mode", "max res", "quality",
                   "min side", "max side", "mean WxH"):
        table.add_column(column, justify="left" if column in ("split", "mode") else "right")
    for split, split_info in manifest["splits"].items():
        path = Path(data_dir) / split_info.get("beton", f"{split}.beton")
        size = f"{path.stat().st_size / 2**20:.1f}" if path.is_file() else "missing"
        settings, stats = split_info.get("settings", {}), split_info.get("image_stats", {})
        mode = settings.get("write_mode", "?")
        if mode == "proportion":
            mode += f" {settings.get('compress_probability')}"
        table.add_row(split, str(split_info["written"]), str(len(split_info["skipped"])), size, mode,
                      str(settings.get("max_resolution")), str(settings.get("jpeg_quality")),
                      str(stats.get("min_side")), str(stats.get("max_side")),
                      f"{stats.get('mean_width')}x{stats.get('mean_height')}")
    console.print(table)
