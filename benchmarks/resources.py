"""Peak memory and CPU use of this process and all its children, sampled in a background thread.

Loader workers are child processes (torch DataLoader) or threads (FFCV, DALI), so both the
resident set and the CPU time are summed over the whole process tree.
"""
from __future__ import annotations

import os
import threading
import time

import psutil


class ResourceSampler:
    """Context manager: `with ResourceSampler() as usage: ...` then `usage.peak_rss_mb`, `usage.cpu_util_pct`.

    `cpu_util_pct` is CPU time over wall time as a share of all usable cores (100 = every core busy).
    """

    def __init__(self, interval_s: float = 0.05):
        self.interval_s = interval_s
        self.peak_rss_bytes = 0
        self.current_rss_bytes = 0
        self.cpu_util_pct = 0.0
        self.wall_s = 0.0
        # CPU seconds last seen per pid: children that exit keep counting up to their last sample.
        self._cpu_seen: dict[int, float] = {}
        self._baseline_cpu = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._root = psutil.Process(os.getpid())

    @property
    def peak_rss_mb(self) -> float:
        return self.peak_rss_bytes / 2**20

    def _tree(self) -> list[psutil.Process]:
        try:
            return [self._root, *self._root.children(recursive=True)]
        except psutil.Error:
            return [self._root]

    def sample(self) -> None:
        """Read RSS and CPU time of the whole tree now (also called by the thread)."""
        rss = 0
        for proc in self._tree():
            try:
                with proc.oneshot():
                    rss += proc.memory_info().rss
                    times = proc.cpu_times()
                    self._cpu_seen[proc.pid] = times.user + times.system
            except psutil.Error:   # exited between listing and reading
                continue
        self.current_rss_bytes = rss
        self.peak_rss_bytes = max(self.peak_rss_bytes, rss)

    def tree_pss_bytes(self) -> int | None:
        """Proportional set size of the tree: shared pages (forked workers) counted once, not per process.

        Too slow to sample continuously (~10-25 ms per process), so callers take it at epoch ends.
        """
        total = 0
        for proc in self._tree():
            try:
                total += proc.memory_full_info().pss
            except (psutil.Error, AttributeError):   # no PSS outside Linux
                return None
        return total

    def _cpu_total(self) -> float:
        return sum(self._cpu_seen.values())

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def __enter__(self):
        self.sample()
        # Children alive now (e.g. persistent workers from an earlier run) count only from here on.
        self._baseline_cpu = self._cpu_total()
        self._start = time.perf_counter()
        self._thread = threading.Thread(target=self._run, name="resource-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()
        self.wall_s = time.perf_counter() - self._start
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        if self.wall_s > 0:
            self.cpu_util_pct = 100.0 * (self._cpu_total() - self._baseline_cpu) / (self.wall_s * cores)
