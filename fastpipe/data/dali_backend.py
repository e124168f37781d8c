"""DALI backend: the beton's stored bytes go through `fn.external_source` into DALI.

A batch is fed as views into the memory-mapped beton (no per-sample copy in Python), with one metadata row
per sample (shape, a "raw" flag, label, mirror flag) and its crop window: the val centre crop, or for train
FFCV's random-resized crop and flip drawn from (seed, epoch, sample) (`fastpipe.data.crops`), so one built
pipeline serves every epoch at a resolution and batch size, and a resumed run crops alike. A feeding thread
prepares the batches (slices, crop draws, DALI tensor wrappers); the main thread only hands each one over.

A DALI conditional splits the batch: JPEG samples go to the decoder with ROI decoding (only the crop window;
nvJPEG with device="mixed" on a GPU), raw-pixel samples (write modes raw/smart/proportion) are reshaped to
HxWx3 and sliced without any decoder. Without a GPU the whole pipeline runs on the CPU (device_id=None).
"""
from __future__ import annotations

import itertools
import os
import queue
import threading
import time
import weakref
from collections import deque
from collections.abc import Iterator

import numpy as np
import torch

from fastpipe.data.base import LoaderBase, center_crop_windows
from fastpipe.data.beton import MODE_RAW, BetonSamples, check_beton
from fastpipe.data.crops import random_crop_windows

# A process forked while DALI pipelines exist (a torch DataLoader's workers, say) inherits them without
# their threads; if it then frees one, DALI's __del__ waits for those threads forever. Children keep
# every inherited pipeline alive instead, so it is never torn down there.
_PIPELINES: weakref.WeakSet = weakref.WeakSet()
_INHERITED: list = []
os.register_at_fork(after_in_child=lambda: _INHERITED.extend(_PIPELINES))
_END = object()


class FeedColumns:
    """What the feed needs of every sample, as whole-split columns of the beton's own tables (no per-sample
    rows built ahead: at 1.28M samples each 8 bytes a sample is 10 MB in every process): byte ranges in
    the memory-mapped beton, height, width, the raw flag and the label. A batch's metadata rows (height,
    width, 3, raw, label, mirror) and crop windows are made when it is fed."""
    def __init__(self, samples: BetonSamples):
        self.data = np.asarray(samples.data)   # a plain ndarray over the map: slicing it is cheaper
        self.raw = samples.mode == MODE_RAW
        self.starts, self.width, self.height, self.labels = samples.offset, samples.width, samples.height, samples.labels
        # raw regions may be padded past the pixels
        self.ends = samples.offset + np.where(self.raw, samples.width.astype(np.int64) * samples.height * 3, samples.size)

    def meta(self, indices: np.ndarray) -> np.ndarray:
        meta = np.zeros((len(indices), 6), dtype=np.int64)   # the last column, mirror, is set by the caller
        meta[:, 0], meta[:, 1], meta[:, 2] = self.height[indices], self.width[indices], 3
        meta[:, 3], meta[:, 4] = self.raw[indices], self.labels[indices]
        return meta


class BetonSource:
    """DALI's external source: each epoch's batches of (image bytes, metadata, crop windows), in the
    epoch's order, prepared by a feeding thread a few batches ahead.

    With `upcoming` (a weak reference to a function of the epoch giving its order, the loader's: whole
    batches only; when the loader is gone, so is the stream) the stream does not end:
    after an epoch's last batch it goes on with the next epoch's, so DALI decodes them while the trainer
    finishes the epoch, and the next one starts on batches already made. Without it, DALI calls iter()
    again at each epoch's end (cycle="raise"); the generator body (and so the order it reads) only runs when
    the next epoch's first batch is scheduled, after `order` and `epoch` are set.
    """
    def __init__(self, columns: FeedColumns, batch_size: int, *, train: bool, seed: int = 0,
                 scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), flip: bool = True, ahead: int = 2,
                 feed: FeedCost | None = None, upcoming=None):
        self.columns, self.batch_size, self.feed, self.upcoming = columns, batch_size, feed, upcoming
        self.train, self.seed, self.scale, self.ratio, self.flip = train, seed, scale, ratio, flip
        self.ahead = ahead
        self.order, self.epoch = np.zeros(0, dtype=np.int64), 0
        # DALI reads the no_copy inputs after the hand-over returns: the last batches stay referenced here
        self.alive: deque = deque(maxlen=2 * (ahead + 2))
        self.stopping: threading.Event | None = None
        self.thread: threading.Thread | None = None

    def batch(self, indices: np.ndarray, epoch: int) -> tuple:
        """One batch as DALI takes it without per-sample work in the main thread (runs in the feeding thread)."""
        from nvidia.dali.tensors import TensorCPU, TensorListCPU  # DALI: optional, loaded with the backend

        columns = self.columns
        data = columns.data
        meta = columns.meta(indices)
        if self.train:
            windows, meta[:, 5] = random_crop_windows(self.seed, epoch, indices, columns.height, columns.width,
                                                      self.scale, self.ratio, self.flip)
        else:
            windows = center_crop_windows(columns.width[indices], columns.height[indices])
        # one DALI list over the samples where they lie in the map (contiguous=False: no copy), so the hand-over
        # in the main thread is one call per batch instead of a check and a wrapper per sample
        encoded = TensorListCPU([TensorCPU(data[begin:end]) for begin, end in
                                 zip(columns.starts[indices].tolist(), columns.ends[indices].tolist())], None, False)
        return encoded, TensorListCPU(meta), TensorListCPU(windows)

    def fill(self, order: np.ndarray, epoch: int, ready: queue.Queue, stopping: threading.Event) -> None:
        """The feeding thread: batches, then the end (or an error), each handed over unless the epoch is
        abandoned meanwhile, so `stop()` never waits on a full queue nobody reads."""
        def hand_over(item) -> bool:
            while not stopping.is_set():
                try:
                    ready.put(item, timeout=0.05)
                    return True
                except queue.Full:
                    continue
            return False

        try:
            while True:
                for start in range(0, len(order), self.batch_size):
                    if not hand_over(self.batch(order[start:start + self.batch_size], epoch)):
                        return
                if self.upcoming is None:
                    hand_over(_END)
                    return
                epoch += 1
                upcoming = self.upcoming()
                if upcoming is None:   # the loader was freed: a strong reference here would have kept it
                    return
                order = upcoming(epoch)
        except Exception as err:  # noqa: BLE001 - handed to the main thread, which raises it
            hand_over(err)

    def __iter__(self):
        self.stop()
        ready: queue.Queue = queue.Queue(maxsize=self.ahead)
        self.stopping = stopping = threading.Event()
        self.thread = threading.Thread(target=self.fill, args=(self.order, self.epoch, ready, stopping), daemon=True,
                                       name="dali-feed")
        self.thread.start()
        try:
            while (item := ready.get()) is not _END:
                if isinstance(item, Exception):
                    raise item
                self.alive.append(item)
                if self.feed is not None:
                    self.feed.samples += len(item[0])
                yield item
        finally:
            stopping.set()

    def stop(self) -> None:
        """End the feeding thread of an epoch left unfinished."""
        if self.thread is not None:
            self.stopping.set()
            self.thread.join()
            self.thread = None


class FeedCost:
    """Main-thread CPU time spent handing batches to DALI (CPU, not wall: on a busy machine the wall
    clock would also count the time DALI's own threads held the core), and the samples handed over."""
    def __init__(self):
        self.seconds, self.samples = 0.0, 0

    def reset(self) -> None:
        self.seconds, self.samples = 0.0, 0

    @property
    def us_per_sample(self) -> float | None:
        return 1e6 * self.seconds / self.samples if self.samples else None


class EpochRunner:
    """One built pipeline (fixed resolution and batch size) with its source and iterator."""
    def __init__(self, pipeline, source: BetonSource, feed: FeedCost):
        self.pipeline, self.source, self.iterator = pipeline, source, None
        self.finished = True   # False while an epoch is in flight
        self.next_epoch = -1     # with an endless source: the epoch its stream is on
        # DALI runs the external source in the calling thread, in Pipeline._run_input_callbacks (it
        # reads the source, then copies the batch in); timing it there is the main thread's feed cost.
        # A weak reference: a closure over the bound method would keep the pipeline (threads, decoder
        # state, GPU buffers) in a reference cycle until the cycle collector happens to run.
        owner, callbacks = weakref.ref(pipeline), type(pipeline)._run_input_callbacks

        def timed():
            started = time.thread_time()
            try:
                return callbacks(owner())
            finally:
                feed.seconds += time.thread_time() - started
        pipeline._run_input_callbacks = timed

    def reusable(self, epoch: int) -> bool:
        """Whether `epoch` can run on this pipeline: its last epoch ran to the end and, with an endless
        stream, the stream is on `epoch` (it fed `upcoming(epoch)`, the order the loader would use: an
        epoch's order is a function of seed, epoch, rank and batch size alone)."""
        return self.finished and (self.iterator is None or self.source.upcoming is None or self.continues(epoch))

    def continues(self, epoch: int) -> bool:
        """True when this runner's stream is already on `epoch`'s first batch (see BetonSource.upcoming)."""
        return self.source.upcoming is not None and self.finished and self.next_epoch == epoch

    def epoch(self, order: np.ndarray, epoch: int):
        from nvidia.dali.plugin.pytorch import (  # DALI: optional, ~1 s import
            DALIGenericIterator,
            LastBatchPolicy,
        )
        continuing = self.iterator is not None and self.continues(epoch)
        if not continuing:
            self.source.order, self.source.epoch = order, epoch   # read when DALI resets the source, below
        if self.iterator is None:
            # prepare_first_batch=False: nothing is read before the order above is in place
            self.iterator = DALIGenericIterator(self.pipeline, ["images", "labels"], auto_reset=False,
                                                last_batch_policy=LastBatchPolicy.PARTIAL,
                                                prepare_first_batch=False)
        elif not continuing:
            self.iterator.reset()
        self.finished = False
        if self.source.upcoming is None:
            for outputs in self.iterator:
                yield outputs[0]["images"], outputs[0]["labels"]
            self.finished = True
            return
        # an endless stream: this epoch is its next len(order) / batch size batches. The runner counts as
        # finished when the last one is handed out (the trainer takes it and closes this generator).
        batches = len(order) // self.source.batch_size
        for index, outputs in enumerate(itertools.islice(self.iterator, batches)):
            if index == batches - 1:
                self.finished, self.next_epoch = True, epoch + 1
            yield outputs[0]["images"], outputs[0]["labels"]

    def close(self) -> None:
        self.source.stop()


class DALILoader(LoaderBase):
    """Options: hw_decoder_load (share of JPEGs for the hardware decoder, GPU only), prefetch (batches)."""
    backend = "dali"

    def __init__(self, data, split: str = "train", *, hw_decoder_load: float = 0.65, prefetch: int = 2,
                 **common):
        super().__init__(data, split, **common)
        self.columns = FeedColumns(BetonSamples(check_beton(self.data_dir, split, self.manifest)))
        if not 0 <= hw_decoder_load <= 1:
            raise ValueError(f"hw_decoder_load must be in [0, 1], got {hw_decoder_load}")
        self.hw_decoder_load, self.prefetch = hw_decoder_load, int(prefetch)
        self.runners: dict[tuple[int, int], EpochRunner] = {}   # DALI fixes sizes when it builds
        self.feed = FeedCost()

    def build_pipeline(self, resolution: int, batch_size: int) -> EpochRunner:
        """The pipeline for one (resolution, batch size); every epoch at those sizes reuses it."""
        from nvidia.dali import fn, pipeline_def, types  # DALI: optional, ~1 s to import
        gpu = self.device.type == "cuda"
        decoder_args = {"device": "mixed", "hw_decoder_load": self.hw_decoder_load} if gpu else {"device": "cpu"}
        # whole batches only (drop_last): the stream runs on into the next epoch, see BetonSource
        upcoming = weakref.WeakMethod(self.epoch_order) if self.drop_last else None
        source = BetonSource(self.columns, batch_size, train=self.train, seed=self.seed, scale=self.scale,
                             ratio=self.ratio, flip=self.flip, ahead=self.prefetch + 1, feed=self.feed,
                             upcoming=upcoming)
        window = {"axis_names": "WH", "normalized_anchor": False, "normalized_shape": False}

        @pipeline_def(enable_conditionals=True)
        def pipeline():
            # no_copy: DALI reads the beton's pages where they are mapped, in its own threads
            data, meta, windows = fn.external_source(source=source, num_outputs=3, batch=True, cycle="raise",
                                                     dtype=[types.UINT8, types.INT64, types.FLOAT], no_copy=True)
            anchor, shape = windows[0:2], windows[2:4]   # (x, y), (width, height) of the crop, in pixels
            if meta[3] > 0:   # raw pixels. A DALI conditional: the batch splits per sample, then merges
                pixels = fn.reshape(data, shape=fn.cast(meta[0:3], dtype=types.INT32), layout="HWC")
                images = fn.slice(pixels.gpu() if gpu else pixels, anchor, shape, **window)
            else:   # JPEG bytes: decode only the crop window (ROI decoding)
                images = fn.decoders.image_slice(data, anchor, shape, output_type=types.RGB, **window, **decoder_args)
            images = fn.resize(images, resize_x=resolution, resize_y=resolution)
            # HWC out: the NCHW view of an NHWC batch is already channels_last
            images = fn.crop_mirror_normalize(images, dtype=types.UINT8, output_layout="HWC",
                                              mirror=fn.cast(meta[5], dtype=types.INT32))
            labels = meta[4]   # labels reach the GPU inside the pipeline, on its stream, like the images
            return images, labels.gpu() if gpu else labels

        built = pipeline(batch_size=batch_size, num_threads=self.workers,
                         device_id=self.device.index if gpu else None, prefetch_queue_depth=self.prefetch,
                         seed=self.seed)
        built.build()
        _PIPELINES.add(built)
        return EpochRunner(built, source, self.feed)

    def run_epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self.epoch_order(epoch)
        if len(order) == 0:
            return
        key = (self.resolution, self.batch_size)
        runner = self.runners.get(key)
        if runner is None or not runner.reusable(epoch):
            # a new setting, an epoch stopped early or another epoch than the stream went on to: DALI cannot
            # reset mid-epoch, so a fresh pipeline
            for old in self.runners.values():
                old.close()
            self.runners.clear()
            runner = self.runners[key] = self.build_pipeline(*key)
        for images, labels in runner.epoch(order, epoch):
            yield self.finish(images.permute(0, 3, 1, 2), labels)

    def close(self) -> None:
        """Stop the feeding threads and let the pipelines go (also when the loader is freed)."""
        for runner in self.runners.values():
            runner.close()
        self.runners.clear()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - at interpreter exit the modules it needs may be gone
            return
