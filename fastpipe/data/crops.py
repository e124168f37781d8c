"""Crop windows as data, for loaders that take them as inputs (DALI; the val centre crop is
`base.center_crop_windows`): the train random-resized crop and flip drawn from (seed, epoch, sample index)
exactly as the FFCV decoders draw them,
so both backends crop a sample alike in a given epoch and a resumed run draws the same windows.
"""
from __future__ import annotations

import numba
import numpy as np
from ffcv.fields.rgb_image import get_random_crop
from ffcv.pipeline.compiler import Compiler

from fastpipe.data.seeding import sample_seed

_random_crop = Compiler.compile(get_random_crop)   # FFCV's rule, compiled with FFCV's options: the same draws


@numba.njit(cache=True, nogil=True)   # nogil: DALI's feeding thread draws while the trainer runs
def _draw(seed, epoch, indices, heights, widths, scale, ratio, flip, windows, mirror):
    for row in range(len(indices)):
        index = indices[row]
        np.random.seed(sample_seed(seed, epoch, index))   # as SeededRandomResizedCrop does per sample
        top, left, crop_h, crop_w = _random_crop(np.uint32(heights[index]), np.uint32(widths[index]), scale, ratio)
        windows[row, 0], windows[row, 1], windows[row, 2], windows[row, 3] = left, top, crop_w, crop_h
        mirror[row] = 1 if flip and np.random.random() < 0.5 else 0


def random_crop_windows(seed: int, epoch: int, indices: np.ndarray, heights: np.ndarray, widths: np.ndarray,
                        scale: tuple[float, float], ratio: tuple[float, float],
                        flip: bool) -> tuple[np.ndarray, np.ndarray]:
    """(windows, mirror) of samples `indices` in `epoch`: (x, y, width, height) float32 rows and 0/1 flags,
    FFCV's random-resized crop and flip (SeededRandomResizedCrop); heights/widths are per sample of the split."""
    windows = np.empty((len(indices), 4), dtype=np.float32)
    mirror = np.empty(len(indices), dtype=np.int64)
    _draw(np.uint64(seed), np.uint64(epoch), np.asarray(indices, dtype=np.int64), heights, widths,
          np.array(scale, dtype=np.float64), np.array(ratio, dtype=np.float64), bool(flip), windows, mirror)
    return windows, mirror
