"""One training epoch of each loader backend on a small converted set, at 160 px, 2 workers.

Run with `pytest benchmarks --benchmark-json=runs/bench.json` (`make bench`). img/s per backend is
stored in each benchmark's `extra_info`; the round time is one full epoch after a warm-up epoch.
"""
from __future__ import annotations

import pytest

from fastpipe.data import available_backends, build_loader

BATCH_SIZE = 32
RESOLUTION = 160


@pytest.mark.parametrize("backend", ["ffcv", "dali", "torch"])
def test_one_loader_epoch(benchmark, small_betons, backend):
    if backend not in available_backends():
        pytest.skip(f"{backend} is not installed here")
    loader = build_loader(backend=backend, data=small_betons, split="train", batch_size=BATCH_SIZE,
                          resolution=RESOLUTION, workers=2, device="cpu")
    epochs = iter(range(1000))

    def one_epoch() -> int:
        loader.set_epoch(next(epochs))
        return sum(int(labels.shape[0]) for _, labels in loader)

    images = benchmark.pedantic(one_epoch, rounds=3, warmup_rounds=1)
    assert images == len(loader) * BATCH_SIZE
    benchmark.extra_info["images_per_epoch"] = images
    benchmark.extra_info["img_per_s"] = round(images / benchmark.stats.stats.median, 1)
