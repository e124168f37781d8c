"""Augmentation as a function of (seed, epoch, sample index): one hash every backend seeds its random
crop and flip with, so a resumed or repeated run draws the same augmentation whatever the worker count,
thread schedule or point of interruption.
"""
from __future__ import annotations

import numba
import numpy as np

GOLDEN = np.uint64(0x9E3779B97F4A7C15)


@numba.njit(cache=True)
def _mix(value):
    # splitmix64's finaliser: every input bit reaches every output bit
    value = (value ^ (value >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    value = (value ^ (value >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return value ^ (value >> np.uint64(31))


@numba.njit(cache=True)
def sample_seed(seed, epoch, index):
    """A 32-bit seed for one sample's augmentation in one epoch (callable from numba and from Python)."""
    value = _mix(np.uint64(seed) + GOLDEN)
    value = _mix(value ^ np.uint64(epoch))
    value = _mix(value ^ np.uint64(index))
    return np.uint32(value >> np.uint64(32))
