"""Timing loops shared by the benchmarks: one loader epoch, N loader batches across epochs, devices.

Batches are handed over asynchronously on CUDA, so every timed span ends with a synchronize.
"""
from __future__ import annotations

import time

import torch

from fastpipe.data.device import resolve_device


def device_type_or_exit(device: str) -> str:
    """--device as "cpu" or "cuda"; a clear exit when it cannot be had."""
    try:
        return resolve_device(device, "--device").type
    except (RuntimeError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else "cpu"


def time_epoch(loader, device: str, max_batches: int | None = None, on_batch=None,
               steady: bool = False) -> tuple[int, float, float]:
    """Iterate one epoch (or `max_batches`); returns (images, seconds, seconds to the first batch). `steady`:
    the clock starts when the first batch arrives and that batch is not counted, so the epoch's start (a
    pipeline build, workers starting, the first prefetch) stays out of the rate; it is the third figure."""
    images, first_batch = 0, 0.0
    start = time.perf_counter()
    iterator = iter(loader)
    for index, (_, labels) in enumerate(iterator):
        if index == 0:
            if device == "cuda":
                torch.cuda.synchronize()
            first_batch = time.perf_counter() - start
        if steady and index == 0:
            start = time.perf_counter()
        else:
            images += int(labels.shape[0])
        if on_batch is not None:
            on_batch()
        if max_batches is not None and index + 1 >= max_batches:
            break
    if device == "cuda":
        torch.cuda.synchronize()   # batches are handed over asynchronously; count only finished work
    seconds = time.perf_counter() - start
    del iterator
    return images, seconds, first_batch


def cycle_epochs(loader, first_epoch: int = 0):
    """Endless batches from a loader, one `set_epoch` per pass (for measurements longer than an epoch)."""
    epoch = first_epoch
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def measure_batches(loader, device: str, batches: int, warmup_batches: int = 2) -> float:
    """img/s over `batches` batches after `warmup_batches` untimed ones, crossing epochs if needed."""
    stream = cycle_epochs(loader)
    try:
        for _ in range(warmup_batches):
            next(stream)
        images = 0
        start = time.perf_counter()
        for _ in range(batches):
            images += int(next(stream)[1].shape[0])
        if device == "cuda":
            torch.cuda.synchronize()
        return images / (time.perf_counter() - start)
    finally:
        stream.close()
