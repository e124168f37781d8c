"""State and rules every loader backend shares: arguments, epoch order, sharding, and the
"settings change at the next epoch" contract. A backend only says how to run one epoch.
"""
from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler

from fastpipe.data.beton import read_manifest, split_info
from fastpipe.data.device import Normalizer, check_batch_size, check_dtype, check_resolution, resolve_device

VAL_CROP_RATIO = 224 / 256   # val: resize to res / 0.875, then centre-crop res


def center_crop_windows(width: np.ndarray, height: np.ndarray) -> np.ndarray:
    """FFCV's val crop in pixels, one (x, y, width, height) row per sample: a centred square of 0.875 x the
    shorter side, with FFCV's integer rounding (a half-pixel shift shows on fine textures)."""
    side = (VAL_CROP_RATIO * np.minimum(width, height)).astype(np.int64)
    return np.stack([(width - side) // 2, (height - side) // 2, side, side], axis=1).astype(np.float32)


def rank_and_world(distributed: bool) -> tuple[int, int]:
    if not distributed:
        return 0, 1
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("distributed=True needs torch.distributed initialised first: run under torchrun "
                           "and call torch.distributed.init_process_group() before build_loader.")
    return dist.get_rank(), dist.get_world_size()


def sample_order(num_samples: int, shuffle: bool, seed: int, epoch: int, rank: int = 0,
                 world_size: int = 1, distributed: bool = False) -> np.ndarray:
    """Sample indices one rank reads in one epoch; the same rule as FFCV's RANDOM/SEQUENTIAL orders.

    Not distributed: a permutation from default_rng(seed + epoch). Distributed (even with one
    process): torch's DistributedSampler, which pads with repeats when the count does not divide,
    as FFCV does.
    """
    if distributed or world_size > 1:
        sampler = DistributedSampler(range(num_samples), num_replicas=world_size, rank=rank,
                                     shuffle=shuffle, seed=seed, drop_last=False)
        sampler.set_epoch(epoch)
        return np.fromiter(sampler, dtype=np.int64, count=len(sampler))
    if shuffle:
        return np.random.default_rng(seed + epoch).permutation(num_samples)
    return np.arange(num_samples)


class LoaderBase:
    """Iterate to get (images, labels) on `device`; images NCHW channels_last, labels int64."""

    backend = "base"

    def __init__(self, data: str | os.PathLike, split: str = "train", batch_size: int = 256,
                 resolution: int = 160, workers: int = 8, device: str = "cpu", shuffle: bool = True,
                 drop_last: bool = True, normalize: bool = True, dtype: torch.dtype = torch.float32,
                 seed: int = 0, distributed: bool = False, min_scale: float = 0.08, max_scale: float = 1.0,
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), flip: bool = True):
        self.data_dir = Path(data)
        self.manifest = read_manifest(self.data_dir)
        self.split = split
        self.split_info = split_info(self.manifest, split, self.data_dir)
        self.classes = list(self.manifest["classes"])
        self.num_samples = int(self.split_info["written"])
        self.train = split == "train"
        self.batch_size = check_batch_size(batch_size)
        self.resolution = check_resolution(resolution)
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        if not 0 < min_scale <= max_scale <= 1:
            raise ValueError(f"crop scales need 0 < min_scale <= max_scale <= 1, got {min_scale}, {max_scale}")
        if not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"ratio must be (low, high) with 0 < low <= high, got {ratio}")
        self.workers = int(workers)
        self.device = resolve_device(device)
        self.shuffle, self.drop_last, self.seed = shuffle, drop_last, int(seed)
        self.dtype = check_dtype(dtype, normalize)
        self.normalizer = Normalizer(self.device, self.dtype) if normalize else None
        self.scale = (float(min_scale), float(max_scale))   # area share of the random crops
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.flip = flip
        self.rank, self.world_size = rank_and_world(distributed)
        self.distributed = distributed
        self.epoch = 0

    # Settings below take effect when the next epoch starts (the next `iter(loader)`).
    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def set_resolution(self, resolution: int) -> None:
        self.resolution = check_resolution(resolution)

    def set_batch_size(self, batch_size: int) -> None:
        self.batch_size = check_batch_size(batch_size)

    def samples_per_rank(self) -> int:
        return math.ceil(self.num_samples / self.world_size)

    def __len__(self) -> int:
        rounding = math.floor if self.drop_last else math.ceil
        return int(rounding(self.samples_per_rank() / self.batch_size))

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Indices of this rank's epoch, trimmed to whole batches when drop_last."""
        order = sample_order(self.num_samples, self.shuffle, self.seed, epoch, self.rank, self.world_size,
                             self.distributed)
        return order[:len(self) * self.batch_size]

    def finish(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Backend output (uint8 NCHW, any device) -> the interface's batch."""
        images = images.to(self.device, non_blocking=True)
        labels = labels.to(self.device, dtype=torch.int64, non_blocking=True).reshape(-1)
        if self.normalizer is not None:
            return self.normalizer(images), labels
        return images.contiguous(memory_format=torch.channels_last), labels

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch = self.epoch
        self.epoch += 1   # like DataLoader+sampler: without set_epoch, each pass gets a fresh order
        return self.run_epoch(epoch)

    def run_epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.data_dir}, split={self.split}, batch_size={self.batch_size}, "
                f"resolution={self.resolution}, device={self.device}, samples={self.num_samples})")
