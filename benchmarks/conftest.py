"""Data for the pytest-benchmark suite, generated once per session in a temporary folder.

`make bench` needs no prepared data: JPEGs are drawn here, and the small beton set is written with
`python -m convert` (the benchmarks that need it skip with the converter's message if that fails).
"""
from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmarks.photos import photo_like


def pytest_configure(config):
    # `make bench` writes runs/bench.json; pytest-benchmark does not create the folder itself.
    target = getattr(config.option, "benchmark_json", None)
    if target:
        Path(target).parent.mkdir(parents=True, exist_ok=True)


@pytest.fixture(scope="session")
def jpeg_bytes() -> bytes:
    """One 375x500 JPEG (ImageNet's most common size) at quality 90."""
    buffer = io.BytesIO()
    Image.fromarray(photo_like(np.random.default_rng(0), 375, 500)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


@pytest.fixture(scope="session")
def small_betons(tmp_path_factory):
    """A converted synthetic set (10 classes x 20 images) for one-epoch loader benchmarks."""
    root = tmp_path_factory.mktemp("bench-data")
    images, betons = root / "images", root / "betons"
    commands = [
        [sys.executable, "-m", "convert", "synthetic", "--out", str(images), "--classes", "10",
         "--per-class", "20", "--seed", "0"],
        [sys.executable, "-m", "convert", "folder", str(images), "--out", str(betons)],
    ]
    for command in commands:
        done = subprocess.run(command, check=False, capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"could not build benchmark data with `{' '.join(command[1:])}`: "
                        f"{(done.stderr or done.stdout).strip()[-300:]}")
    return betons
