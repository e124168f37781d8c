"""FFCV backend: an `ffcv.loader.Loader` on the beton, with FFCV's JIT-compiled decode + crop.

Resolution and batch size change between epochs by mutating the decoder's output size and the
loader's batch size: FFCV sizes its buffers when each epoch's iterator starts (ffcv-imagenet does the same).
"""
from __future__ import annotations

import ctypes
import os
import queue
import sys
import time
import warnings
from collections.abc import Iterator

import ffcv.loader.loader
import torch
from ffcv.memory_managers.base import MemoryManager
from ffcv.memory_managers.os_cache import OSCacheContext, OSCacheManager

from fastpipe.data import crop_decode
from fastpipe.data.base import VAL_CROP_RATIO, LoaderBase
from fastpipe.data.beton import IMAGE_FIELD, INT_FIELD, by_pointer, check_beton, read_fields
from fastpipe.data.ffcv_decoders import NativeCenterCrop, SeededRandomResizedCrop, add_epoch_column

ORDERS = ("random", "quasi_random")
DECODERS = ("auto", "crop", "stock")


def _quiet_numba_finalizer(previous_hook):
    """numba 0.68 raises KeyError in a dispatcher finalizer when FFCV's compiled pipeline is freed.
    It is harmless but prints a traceback per loader; drop exactly that one, pass on the rest."""
    def hook(unraisable):
        trace = unraisable.exc_traceback
        while trace is not None and trace.tb_next is not None:
            trace = trace.tb_next
        where = trace.tb_frame.f_code.co_filename if trace is not None else ""
        if unraisable.exc_type is KeyError and where.endswith("numba/core/dispatcher.py"):
            return
        previous_hook(unraisable)
    return hook


sys.unraisablehook = _quiet_numba_finalizer(sys.unraisablehook)


class LeanOSCacheManager(OSCacheManager):
    """FFCV's OSCacheManager (samples read from the page cache through one memory map) without the per-sample
    Python dicts its base class builds on creation: sample -> pages, page -> samples, pointer -> size. They
    cost ~450 MB at 1.28M samples in every loader process (`python -m benchmarks scale`), and only FFCV's
    process cache and quasi-random order read them (os_cache = false); built on first use if anything does."""

    def __init__(self, reader):   # the base class's sorted pointer and size columns only
        self.reader = reader
        self.ptrs, self.sizes = by_pointer(reader.alloc_table["ptr"], reader.alloc_table["size"])
        # Nothing else reads the allocation table (24 bytes a sample): dropped, read again if the dicts are asked for.
        reader.alloc_table = None
        self.context = OSCacheContext(self)

    def __getattr__(self, name: str):   # called only for attributes not set above
        if name in ("ptr_to_size", "sample_to_pages", "page_to_samples"):
            if self.reader.alloc_table is None:
                self.reader.read_allocation_table()
            MemoryManager.__init__(self, self.reader)
            return getattr(self, name)
        raise AttributeError(name)


ffcv.loader.loader.OSCacheManager = LeanOSCacheManager   # what Loader builds for os_cache = true


MAX_EPOCH = 2**16 - 1   # the epoch column is uint16 (ffcv_decoders.add_epoch_column)
TRIM_ABOVE = 1.03   # trim when RSS is 3% above its level after the first epoch


def finish_thread(epoch_iterator, timeout: float = 60.0) -> None:
    """Wait for a closed FFCV epoch thread to end: a process that exits while it is still in compiled code
    aborts ("terminate called without an active exception"). The thread notices the close when a put into
    its full queue times out, but once it runs out of batches it puts the end marker without a timeout and
    would wait forever for a reader. So: no batches are left for it, and what it has queued is drained (at
    most the batch it is making, then the end marker)."""
    epoch_iterator.iter_ixes = iter(())   # before close(): no batch may start behind its stop markers
    epoch_iterator.close()
    deadline = time.monotonic() + timeout
    while epoch_iterator.is_alive() and time.monotonic() < deadline:
        epoch_iterator.join(timeout=0.05)
        try:
            epoch_iterator.output_queue.get_nowait()
        except queue.Empty:
            pass
    if epoch_iterator.is_alive():
        warnings.warn(f"an abandoned FFCV epoch thread is still running after {timeout:g} s; the process may abort "
                      f"at exit", RuntimeWarning, stacklevel=2)


def resident_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def release_freed_memory() -> None:
    """FFCV allocates fresh batch buffers for every epoch; glibc keeps the freed ones in its arenas, so RSS
    creeps up epoch after epoch. malloc_trim hands them back to the OS (a no-op off glibc)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def choose_decoder(decoder: str) -> str:
    if decoder not in DECODERS:
        raise ValueError(f"ffcv decoder must be one of {DECODERS}, got {decoder!r}")
    if decoder == "stock" or crop_decode.available():
        return "crop" if decoder == "auto" else decoder
    if decoder == "crop":
        raise RuntimeError(f"ffcv decoder='crop' asked for, but {crop_decode.MISSING}.")
    warnings.warn(f"FFCV uses its stock decoder: {crop_decode.MISSING}.", stacklevel=3)
    return "stock"


class FFCVLoader(LoaderBase):
    """Options: order ("random" | "quasi_random"), os_cache (bool), batches_ahead (int), bound_rss (bool:
    give freed epoch buffers back to the OS when RSS grows; keeps memory flat over long runs at a cost of
    roughly 10% img/s on a 2-core machine, measured with benchmarks/loaders; False trades memory for speed),
    decoder ("crop": decode only each crop's window at a DCT scale that fits the output, bilinear resize
    under 2x shrink; "stock": FFCV's decoder, full decode + INTER_AREA; "auto": crop when the native
    library is built, else stock with a warning)."""
    backend = "ffcv"

    def __init__(self, data, split: str = "train", *, order: str = "random", os_cache: bool = True,
                 batches_ahead: int = 3, bound_rss: bool = True, decoder: str = "auto", **common):
        super().__init__(data, split, **common)
        self.bound_rss = bound_rss
        self.baseline_rss: int | None = None   # RSS after the first epoch; see bound_memory
        if order not in ORDERS:
            raise ValueError(f"ffcv order must be one of {ORDERS}, got {order!r}")
        if order == "quasi_random" and (self.distributed or os_cache or not self.shuffle):
            raise ValueError("ffcv order='quasi_random' needs os_cache=False, shuffle=True and no "
                             "distributed mode (FFCV does not implement it there); use order='random'.")
        if batches_ahead < 1:
            raise ValueError(f"batches_ahead must be at least 1, got {batches_ahead}")
        path = check_beton(self.data_dir, split, self.manifest)   # FFCV itself would crash on a bad file
        self.decoder_kind = choose_decoder(decoder)

        # FFCV compiles numba code when imported (seconds): only a process that builds an FFCV loader pays it
        from ffcv.fields.basics import IntDecoder
        from ffcv.fields.rgb_image import CenterCropRGBImageDecoder
        from ffcv.loader import Loader, OrderOption
        from ffcv.transforms import ToDevice, ToTensor, ToTorchImage


        size = (self.resolution, self.resolution)
        native = self.decoder_kind == "crop"
        if self.train:   # crop and flip drawn from (seed, epoch, sample index): see ffcv_decoders
            self.decoder = SeededRandomResizedCrop(size, self.scale, self.ratio, seed=self.seed, flip=self.flip,
                                                   native=native)
        else:
            self.decoder = (NativeCenterCrop if native else CenterCropRGBImageDecoder)(size, ratio=VAL_CROP_RATIO)
        to_device = [ToDevice(self.device, non_blocking=True)] if self.device.type == "cuda" else []
        image_pipeline = [self.decoder, ToTensor(), *to_device, ToTorchImage(channels_last=True)]
        label_pipeline = [IntDecoder(), ToTensor(), *to_device]
        fields = read_fields(path)
        names = {kind: name for name, kind in fields}   # adopted betons may name them otherwise ...
        self.image_first = fields[0][1] == IMAGE_FIELD   # ... or store the label first: FFCV yields file order
        if not self.shuffle:
            ffcv_order = OrderOption.SEQUENTIAL
        else:
            ffcv_order = OrderOption.QUASI_RANDOM if order == "quasi_random" else OrderOption.RANDOM
        self.loader = Loader(str(path), batch_size=self.batch_size, num_workers=self.workers,
                             os_cache=os_cache, order=ffcv_order, distributed=self.distributed,
                             seed=self.seed, drop_last=self.drop_last, batches_ahead=batches_ahead,
                             pipelines={names[IMAGE_FIELD]: image_pipeline, names[INT_FIELD]: label_pipeline})
        self.epoch_column = add_epoch_column(self.loader, names[IMAGE_FIELD]) if self.train else None
        self.running = None   # the FFCV epoch iterator of the epoch being read (run_epoch)

    def run_epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # One epoch at a time: the crops of every FFCV epoch thread come from the one epoch column, so an
        # earlier epoch still open would go on with this epoch's crops. It is finished here, and fails if
        # read again (the trainer closes each epoch; this catches a caller that keeps an old iterator).
        if self.running is not None:
            finish_thread(self.running)
        self.decoder.output_size = (self.resolution, self.resolution)
        self.loader.batch_size = self.batch_size
        self.loader.next_epoch = epoch   # FFCV seeds its order from seed + epoch
        if self.epoch_column is not None:
            if not 0 <= epoch <= MAX_EPOCH:
                raise ValueError(f"ffcv loader: epoch {epoch} is outside 0..{MAX_EPOCH} (the crop draws' epoch column)")
            self.epoch_column[:] = epoch   # ... and SeededRandomResizedCrop its crops from it
        # One FFCV epoch iterator (a thread) per epoch, closed even when the caller stops early.
        epoch_iterator = self.running = iter(self.loader)
        try:
            for first, second in epoch_iterator:
                images, labels = (first, second) if self.image_first else (second, first)
                # Batches live in FFCV's reused slots: `finish` makes a new tensor when normalising;
                # a caller keeping uint8 batches across steps must clone them.
                yield self.finish(images, labels)
                if self.running is not epoch_iterator:
                    raise RuntimeError(f"ffcv loader: epoch {epoch} was left open while a later one started, which "
                                       f"finished it (its crops would have changed); read epochs one at a time.")
        finally:
            if self.running is epoch_iterator:
                self.running = None
                finish_thread(epoch_iterator)
            del epoch_iterator
            self.bound_memory()

    def bound_memory(self) -> None:
        # Trimming every epoch costs ~10% img/s (buffers fault in again), so only trim on real growth.
        if not self.bound_rss or not sys.platform.startswith("linux"):
            return
        resident = resident_bytes()
        if self.baseline_rss is None:
            self.baseline_rss = resident
        elif resident > TRIM_ABOVE * self.baseline_rss:
            release_freed_memory()
