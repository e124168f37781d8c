"""The share of training time the device sat idle waiting for the next batch, measured without a
synchronize: CUDA events on a GPU, host time around `next()` on the CPU.
"""
from __future__ import annotations

import time

import torch


class DataWait:
    """Call `waiting()` before `next(batches)`, `ready()` after it and `step_done()` once the step is queued.

    CUDA: an event is recorded when a batch is handed over and another after its step's work; the
    device idled for data between the end of one step and the start of the next, which is the time
    between those events on the stream (zero when the host keeps ahead). Events are read in `collect()`,
    which the trainer calls after its counter read, so the stream is already past them.
    CPU: the device is the host, so the time spent inside `next()` is the wait.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.seconds = 0.0
        self._pending: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._last_end = None
        self._started = 0.0

    def waiting(self) -> None:
        if not self.cuda:
            self._started = time.perf_counter()

    def ready(self) -> None:
        if not self.cuda:
            self.seconds += time.perf_counter() - self._started
            return
        start = torch.cuda.Event(enable_timing=True)
        start.record()
        if self._last_end is not None:
            self._pending.append((self._last_end, start))

    def step_done(self) -> None:
        if self.cuda:
            self._last_end = torch.cuda.Event(enable_timing=True)
            self._last_end.record()

    def collect(self) -> float:
        """Idle seconds so far this epoch."""
        for end, start in self._pending:
            start.synchronize()   # already complete after the trainer's counter read: returns at once
            self.seconds += end.elapsed_time(start) / 1000
        self._pending.clear()
        return self.seconds
