"""Write validated samples into .beton files with FFCV's DatasetWriter, under a watchdog.

FFCV runs in a separate writer process (started from a clean forkserver, see `process_context`), so a
writer that crashes or hangs is killed with all its workers instead of hanging the converter.
"""
from __future__ import annotations

import ctypes
import functools
import math
import multiprocessing as mp
import os
import queue
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil

from convert.sources import ConvertError
from convert.validate import load_image
from fastpipe.data.beton import ALLOC_ENTRY, BETON_HEADER, read_header

WRITE_MODES = ("jpg", "raw", "smart", "proportion")
SMALL_PAGE_SIZE = 1 << 21          # FFCV's minimum page; each writer worker pads its last page,
LARGE_PAGE_SIZE = 1 << 23          # so small data sets get small pages, large ones FFCV's default
SMALL_DATA_BYTES = 1 << 28
FAILURE_MESSAGE_BYTES = 2048


@dataclass(frozen=True)
class WriteSettings:
    """How one split is stored; recorded in the manifest."""
    write_mode: str = "raw"
    max_resolution: int | None = 256
    jpeg_quality: int = 90
    compress_probability: float = 0.5
    smart_threshold: int = 224 * 224 * 3     # 'smart': JPEG-compress images larger than this many raw bytes
    min_side: int = 8
    seed: int = 0
    restart_intervals: bool = True   # JPEGs get restart intervals for crop-only decoding (fastpipe.data.restarts)

    def __post_init__(self):
        if self.write_mode not in WRITE_MODES:
            raise ConvertError(f"Unknown write mode '{self.write_mode}': choose one of {', '.join(WRITE_MODES)}.")
        if self.max_resolution is not None and self.max_resolution < self.min_side:
            raise ConvertError(f"--max-resolution {self.max_resolution} is below --min-side {self.min_side}.")
        if not 1 <= self.jpeg_quality <= 100:
            raise ConvertError(f"--jpeg-quality must be in 1..100, got {self.jpeg_quality}.")
        if not 0.0 <= self.compress_probability <= 1.0:
            raise ConvertError(f"--compress-probability must be in [0, 1], got {self.compress_probability}.")


@dataclass(frozen=True)
class BetonJob:
    """One beton to write: samples as (absolute path, label, stored width, stored height)."""
    split: str
    path: Path                      # temporary file; the caller moves it into place
    items: list[tuple[str, int, int, int]]
    settings: WriteSettings

    @property
    def page_size(self) -> int:
        # A sample larger than a page makes FFCV's worker raise, which hangs the write: size pages to fit.
        raw_sizes = [width * height * 3 for _, _, width, height in self.items]
        base = SMALL_PAGE_SIZE if sum(raw_sizes) < SMALL_DATA_BYTES else LARGE_PAGE_SIZE
        return max(base, 1 << math.ceil(math.log2(2 * max(raw_sizes) + (1 << 16))))


def chunk_size(samples: int, workers: int) -> int:
    """Samples per task of FFCV's writer workers: about four tasks per worker, at most 100 samples each."""
    return max(1, min(100, samples // (4 * workers)))


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies, so no orphan keeps writing."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG
        except OSError:
            pass


class CleanImages:
    """The indexable dataset FFCV's workers read: decodes again with the checked code path and never
    raises (a raise would hang FFCV); a file that changed since validation is counted as a failure."""
    def __init__(self, job: BetonJob, progress, failures, failure_message):
        self.job, self.progress, self.failures, self.failure_message = job, progress, failures, failure_message

    def __len__(self) -> int:
        return len(self.job.items)

    def __getitem__(self, index: int):
        path, label, width, height = self.job.items[index]
        try:
            image = load_image(path, self.job.settings.max_resolution)
            if image.shape[:2] != (height, width):
                raise ValueError(f"size changed to {image.shape[1]}x{image.shape[0]} since validation")
        except Exception as err:  # noqa: BLE001 - a raise here would hang FFCV
            image = np.zeros((height, width, 3), np.uint8)
            with self.failures.get_lock():
                if self.failures.value == 0:
                    self.failure_message.value = f"{path}: {err}".encode()[:FAILURE_MESSAGE_BYTES - 1]
                self.failures.value += 1
        # FFCV's 'proportion' mode draws np.random.rand() right after this call in this process.
        np.random.seed((self.job.settings.seed * 1_000_003 + index) % 2**32)
        with self.progress.get_lock():
            self.progress.value += 1
        return image, label


def process_context():
    """Processes start from a forkserver with FFCV preloaded. Plain fork would copy the caller's thread
    state: after the caller has used OpenCV's thread pool, cv2 calls in a forked child can hang forever
    (the converter is also called from test and benchmark processes). The forkserver is clean, starts
    once per process, and pays FFCV's import (~6 s) once."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["convert.forkserver_guard", "convert.pipeline", "ffcv.writer", "ffcv.fields"])
    return ctx


def warm_ffcv() -> None:
    """Compile FFCV's numba-typed mode table in the writer: each of FFCV's (forked) workers would
    otherwise compile it again, about 1 s per worker per beton."""
    from ffcv.fields.rgb_image import IMAGE_MODES  # ffcv compiles numba on import: only writers pay it

    for mode in ("jpg", "raw"):
        IMAGE_MODES[mode]


def exit_when_closed(lifeline) -> None:
    """Block until the converter's end of `lifeline` closes (it exited or was killed), then exit at once;
    FFCV's workers follow through die_with_parent. The forkserver parent may take seconds to go."""
    try:
        lifeline.recv()
    except (EOFError, OSError):
        pass
    os._exit(1)


def _writer_main(todo, events, progress, failures, failure_message, workers: int, lifeline) -> None:
    die_with_parent()
    threading.Thread(target=exit_when_closed, args=(lifeline,), daemon=True).start()
    try:
        import cv2  # the writer process's own settings, before FFCV forks its workers

        cv2.setNumThreads(1)
        # FFCV hands the dataset to its workers by forking (this process is clean, so that is safe);
        # a forkserver-started process would otherwise default to forkserver and fail to pickle it.
        mp.set_start_method("fork", force=True)
        import ffcv.fields.rgb_image
        import ffcv.writer  # after the start method is set
        from ffcv.fields import IntField, RGBImageField  # likewise

        from fastpipe.data import restarts
        stock_encode = ffcv.fields.rgb_image.encode_jpeg

        # The converter draws its own progress bar; FFCV's tqdm bar would interleave with it.
        ffcv.writer.tqdm = functools.partial(ffcv.writer.tqdm, disable=True)
        # FFCV's workers outlive a killed writer (blocked on their queue): make them die with it.
        worker_job = ffcv.writer.worker_job_indexed_dataset

        def mortal_worker_job(*args):
            die_with_parent()
            worker_job(*args)
        ffcv.writer.worker_job_indexed_dataset = mortal_worker_job
        warm_ffcv()
        events.put(("ready", None))
        while (job := todo.get()) is not None:
            settings = job.settings
            # FFCV's RGBImageField encodes through this module-level function (OpenCV, 4:2:0, the quality)
            ffcv.fields.rgb_image.encode_jpeg = restarts.encode_jpeg if settings.restart_intervals else stock_encode
            image_field = RGBImageField(write_mode=settings.write_mode, max_resolution=None,
                                        smart_threshold=settings.smart_threshold,
                                        jpeg_quality=settings.jpeg_quality,
                                        compress_probability=settings.compress_probability)
            writer = ffcv.writer.DatasetWriter(str(job.path), {"image": image_field, "label": IntField()},
                                               page_size=job.page_size, num_workers=workers)
            writer.from_indexed_dataset(CleanImages(job, progress, failures, failure_message),
                                        chunksize=chunk_size(len(job.items), workers))
            progress.value = 0
            events.put(("done", job.split))
    except BaseException:  # noqa: BLE001 - report anything, then exit
        events.put(("error", traceback.format_exc(limit=4)))
        sys.exit(1)


def kill_tree(process) -> None:
    """SIGKILL a process and every descendant (FFCV's writer workers)."""
    try:
        root = psutil.Process(process.pid)
        family = root.children(recursive=True) + [root]
    except psutil.NoSuchProcess:
        return
    for member in family:
        try:
            member.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(family, timeout=10)


def check_written(job: BetonJob) -> None:
    """The header FFCV fixes up last must say the write completed."""
    size = job.path.stat().st_size
    header = read_header(job.path)
    table = int(header["alloc_table_ptr"])
    if int(header["num_samples"]) != len(job.items) or not BETON_HEADER.itemsize <= table <= size \
            or (size - table) % ALLOC_ENTRY.itemsize:
        raise ConvertError(f"FFCV finished {job.path} but its header is incomplete; nothing was written.")


class WriterProcess:
    """One process running FFCV's DatasetWriter, fed jobs through a queue and watched from here. Use as a
    context manager: leaving it kills the process tree and removes unfinished files."""
    def __init__(self, workers: int):
        ctx = process_context()
        lifeline, self.lifeline = ctx.Pipe(duplex=False)     # only this process holds the sending end
        self.todo, self.events = ctx.Queue(), ctx.Queue()
        self.progress, self.failures = ctx.Value("Q", 0), ctx.Value("Q", 0)
        self.failure_message = ctx.Array("c", FAILURE_MESSAGE_BYTES)
        self.process = ctx.Process(target=_writer_main, name="beton-writer",
                                   args=(self.todo, self.events, self.progress, self.failures,
                                         self.failure_message, workers, lifeline))
        self.pending: list[BetonJob] = []

    def __enter__(self):
        self.process.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.process.is_alive():
            kill_tree(self.process)
        for job in self.pending:
            job.path.unlink(missing_ok=True)

    def write(self, jobs: list[BetonJob], stall_timeout: float = 300.0,
              on_progress: Callable[[int, int], None] | None = None) -> None:
        """Write every job's beton to job.path. Raises ConvertError when the writer fails, dies, or
        makes no progress for `stall_timeout` seconds; unfinished files are removed on exit."""
        self.pending = list(jobs)
        for job in jobs:
            self.todo.put(job)
        self.todo.put(None)
        current, last_count, last_change = 0, -1, time.monotonic()
        while current < len(jobs):
            try:
                kind, payload = self.events.get(timeout=0.2)
            except queue.Empty:
                kind, payload = None, None
            now = time.monotonic()
            split = jobs[current].split
            if kind == "error":
                raise ConvertError(f"The FFCV writer failed while writing the {split} beton; nothing was "
                                   f"written:\n{payload}")
            if kind == "done":
                if on_progress:
                    on_progress(current, len(jobs[current].items))
                check_written(jobs[current])
                current, last_count, last_change = current + 1, -1, now
                continue
            count = self.progress.value
            if count != last_count or kind == "ready":
                last_count, last_change = count, now
                if on_progress:
                    on_progress(current, min(count, len(jobs[current].items)))
            if not self.process.is_alive() and self.events.empty():
                raise ConvertError(f"The FFCV writer process died (exit code {self.process.exitcode}) while "
                                   f"writing the {split} beton; nothing was written. Re-run the conversion.")
            if now - last_change > stall_timeout:
                raise ConvertError(f"The FFCV writer made no progress for {stall_timeout:.0f} s while writing "
                                   f"the {split} beton (a writer worker crashed or hangs); it was stopped "
                                   f"and nothing was written. Re-run, or raise --stall-timeout.")
        self.process.join(timeout=60)
        if self.failures.value:
            raise ConvertError(f"{self.failures.value} file(s) could not be read again during the write, "
                               f"e.g. {self.failure_message.value.decode(errors='replace')}. They changed "
                               f"after validation; nothing was written. Re-run the conversion.")
        self.pending = []
