"""Progressive resolution as pure functions of the epoch, shared by the trainer and the benchmarks.

Two forms: a linear ramp (FFCV ImageNet recipe style: `start` px until `ramp_start`, `end` px from
`ramp_end`, rounded to multiples of 32 in between) and explicit stages with their own batch sizes.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

MIN_RESOLUTION = 16


def round_to(value: float, multiple: int) -> int:
    # floor(x + 0.5) rather than round(): banker's rounding makes uneven steps on a ramp
    return int(max(multiple, np.floor(value / multiple + 0.5) * multiple))


@dataclass(frozen=True)
class Stage:
    epochs: int
    resolution: int
    batch_size: int | None = None   # None: the config's data.batch_size


@dataclass(frozen=True)
class ResolutionSchedule:
    """Which resolution and batch size each epoch trains at. Epochs count from 0.

    Ramp: `start` up to epoch `ramp_start`, `end` from epoch `ramp_end`, linear in between rounded to
    `multiple`. `ramp_start == ramp_end > 0` is a step; both 0 means no ramp (`start` throughout).
    """
    start: int = 160
    end: int = 192
    ramp_start: int = 0
    ramp_end: int = 0
    multiple: int = 32
    stages: tuple[Stage, ...] = field(default_factory=tuple)
    batch_size: int = 256

    def __post_init__(self):
        for res in [self.start, self.end, *(s.resolution for s in self.stages)]:
            if res < MIN_RESOLUTION:
                raise ValueError(f"resolution {res} px is below the minimum of {MIN_RESOLUTION} px")
        if self.batch_size < 1 or any(s.batch_size is not None and s.batch_size < 1 for s in self.stages):
            raise ValueError("batch size must be at least 1")
        if any(s.epochs < 1 for s in self.stages):
            raise ValueError("every resolution stage needs at least 1 epoch")
        if self.multiple < 1:
            raise ValueError(f"resolution.multiple must be at least 1 (got {self.multiple})")
        if self.ramp_start < 0:
            raise ValueError(f"resolution.ramp_start must be >= 0 (got {self.ramp_start})")
        if self.ramp_end < self.ramp_start:
            raise ValueError(f"resolution.ramp_end ({self.ramp_end}) is before ramp_start ({self.ramp_start})")

    def _stage(self, epoch: int) -> Stage | None:
        if not self.stages:
            return None
        done = 0
        for stage in self.stages:
            done += stage.epochs
            if epoch < done:
                return stage
        return self.stages[-1]   # past the listed epochs: stay at the last stage

    def resolution_at(self, epoch: int) -> int:
        stage = self._stage(epoch)
        if stage is not None:
            return stage.resolution
        if self.ramp_start == self.ramp_end == 0:   # no ramp configured: `start` throughout
            return self.start
        # `start` and `end` are used exactly; only the epochs strictly inside the ramp are rounded
        if epoch < self.ramp_start or (epoch == self.ramp_start < self.ramp_end):
            return self.start
        if epoch >= self.ramp_end:
            return self.end
        value = np.interp(epoch, [self.ramp_start, self.ramp_end], [self.start, self.end])
        return round_to(float(value), self.multiple)

    def batch_size_at(self, epoch: int) -> int:
        stage = self._stage(epoch)
        if stage is not None and stage.batch_size is not None:
            return stage.batch_size
        return self.batch_size

    def resolutions(self, epochs: int) -> list[int]:
        """Distinct resolutions used in `epochs` epochs, in order of first use."""
        return list(dict.fromkeys(self.resolution_at(e) for e in range(epochs)))


def resolution_at(epoch: int, schedule: ResolutionSchedule) -> int:
    return schedule.resolution_at(epoch)


def batch_size_at(epoch: int, schedule: ResolutionSchedule) -> int:
    return schedule.batch_size_at(epoch)
