"""Restart intervals in stored JPEGs, so that the crop decoder entropy-decodes only the intervals a crop
covers (`_cropdecode.cpp`, decode_window_restarts).

The interval: a divisor of the MCU row between 2 and 8 MCUs, the one nearest 4 (64 px at 4:2:0), so that
intervals tile every row and a crop's columns map to whole intervals. Each interval costs its marker (2 bytes)
and the padding to a byte boundary (3.5 bits on average). Why 4 (`python -m benchmarks restart-intervals`,
README): 2-MCU intervals decode crops 1-5% faster but double the bytes, to 2.5% on real photographs at quality
90 and 4% at 75, over the 3% this storage may add; 8 and longer read more of each row for little saved. A
row without such a divisor (a prime number of MCUs, say) gets one interval per row: rows are still skipped,
columns are not.
"""
from __future__ import annotations

import cv2
import numpy as np

TARGET_MCUS = 4
LONGEST = 8


def restart_interval(mcus_per_row: int, target: int = TARGET_MCUS) -> int:
    """MCUs per restart interval for a JPEG whose rows hold `mcus_per_row` MCUs (module docstring); another
    `target` length for the benchmark that chose the default (1 allows one-MCU intervals)."""
    divisors = [size for size in range(min(2, target), LONGEST + 1) if mcus_per_row % size == 0]
    if not divisors:
        return max(1, mcus_per_row)
    return min(divisors, key=lambda size: (abs(size - target), size))


def mcu_columns(width: int) -> int:
    return -(-width // 16)   # OpenCV encodes colour at 4:2:0: 16 px MCUs


def encode_jpeg(rgb: np.ndarray, quality: int, interval: int | None = None) -> np.ndarray:
    """What FFCV's writer does (OpenCV, 4:2:0, this quality), with restart intervals: same coefficients, so
    the same pixels as without them. `interval`: MCUs per interval (0: none), restart_interval's by default."""
    if interval is None:
        interval = restart_interval(mcu_columns(rgb.shape[1]))
    ok, encoded = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR),
                               [int(cv2.IMWRITE_JPEG_QUALITY), quality, int(cv2.IMWRITE_JPEG_RST_INTERVAL), interval])
    if not ok:
        raise ValueError("OpenCV could not encode the image as JPEG")
    return encoded.reshape(-1)
