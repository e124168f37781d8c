"""DALI backend: the beton's stored bytes go through `fn.external_source` into DALI.

A batch is fed as views into the memory-mapped beton (no per-sample copy or header in Python), with a
per-sample "raw" flag and shape. A DALI conditional splits the batch: JPEG samples go to the decoders with
ROI decoding (only the crop region; nvJPEG with device="mixed" on a GPU), raw-pixel samples (write modes
raw/smart/proportion) are reshaped to HxWx3 and cropped without any decoder. Without a GPU the whole
pipeline runs on the CPU (device_id=None).
"""
from __future__ import annotations

import os
import time
import weakref
from collections.abc import Iterator

import numpy as np
import torch

from fastpipe.data.base import VAL_CROP_RATIO, LoaderBase
from fastpipe.data.beton import MODE_RAW, BetonSamples, check_beton
from fastpipe.data.seeding import sample_seed

# A process forked while DALI pipelines exist (a torch DataLoader's workers, say) inherits them without
# their threads; if it then frees one, DALI's __del__ waits for those threads forever. Children keep
# every inherited pipeline alive instead, so it is never torn down there.
_PIPELINES: weakref.WeakSet = weakref.WeakSet()
_INHERITED: list = []
os.register_at_fork(after_in_child=lambda: _INHERITED.extend(_PIPELINES))


def center_crop_windows(width: np.ndarray, height: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """FFCV's val crop in pixels, (x, y) anchors and (w, h) shapes: a centred square of 0.875 x the
    shorter side, with FFCV's integer rounding (a half-pixel shift shows on fine textures)."""
    side = (VAL_CROP_RATIO * np.minimum(width, height)).astype(np.int64)
    anchor = np.stack([(width - side) // 2, (height - side) // 2], axis=1)
    return anchor.astype(np.float32), np.stack([side, side], axis=1).astype(np.float32)


class FeedColumns:
    """What the feed needs of every sample, worked out once per loader (train builds a source per epoch):
    byte ranges in the memory-mapped beton, and one int64 metadata row (height, width, 3, raw, label)."""
    def __init__(self, samples: BetonSamples):
        self.data = np.asarray(samples.data)   # a plain ndarray over the map: slicing it is cheaper
        raw = samples.mode == MODE_RAW
        pixels = samples.width * samples.height * 3   # raw regions may be padded past the pixels
        self.starts = samples.offset
        self.ends = samples.offset + np.where(raw, pixels, samples.size)
        self.meta = np.stack([samples.height, samples.width, np.full_like(samples.width, 3), raw,
                              samples.labels], axis=1).astype(np.int64)
        self.width, self.height = samples.width, samples.height


class BetonSource:
    """Batches of (image bytes, metadata[, val crop windows]) in the epoch's order.

    Image bytes are views into the beton's memory map, which DALI reads in place (no_copy); metadata is
    one `FeedColumns.meta` row per sample and windows one float row, (x, y, width, height): few outputs,
    because each costs the main thread a fixed amount per batch.

    With cycle="raise" DALI calls iter() again at each epoch's end; the generator body (and so the
    order it reads) only runs when the next epoch's first batch is scheduled, after `order` is set.
    """
    def __init__(self, columns: FeedColumns, batch_size: int, crop_windows: bool, feed: FeedCost | None = None):
        self.columns, self.batch_size, self.feed = columns, batch_size, feed
        self.crop_windows = crop_windows   # val only: train crops are drawn by DALI
        self.order = np.zeros(0, dtype=np.int64)
        self.alive: list = []

    def __iter__(self):
        per_sample, order = self.columns, self.order
        data = per_sample.data
        # Everything DALI reads is a view of arrays this object keeps (the external source runs with
        # no_copy): the epoch's columns in epoch order, kept until the epoch after next starts.
        columns = [per_sample.meta[order]]
        if self.crop_windows:
            windows = center_crop_windows(per_sample.width[order], per_sample.height[order])
            columns.append(np.concatenate(windows, axis=1))
        self.alive = [*self.alive[-1:], columns]
        starts, ends = per_sample.starts[order].tolist(), per_sample.ends[order].tolist()
        for start in range(0, len(order), self.batch_size):
            stop = min(start + self.batch_size, len(order))
            encoded = [data[begin:end] for begin, end in zip(starts[start:stop], ends[start:stop])]
            if self.feed is not None:
                self.feed.samples += stop - start
            yield encoded, *(column[start:stop] for column in columns)


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

    def epoch(self, order: np.ndarray):
        from nvidia.dali.plugin.pytorch import (  # DALI: optional, ~1 s import
            DALIGenericIterator,
            LastBatchPolicy,
        )
        self.source.order = order   # read by the source when DALI resets it, below
        if self.iterator is None:
            # prepare_first_batch=False: nothing is read before the order above is in place
            self.iterator = DALIGenericIterator(self.pipeline, ["images", "labels"], auto_reset=False,
                                                last_batch_policy=LastBatchPolicy.PARTIAL,
                                                prepare_first_batch=False)
        else:
            self.iterator.reset()
        self.finished = False
        for outputs in self.iterator:
            yield outputs[0]["images"], outputs[0]["labels"]
        self.finished = True


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

    def build_pipeline(self, resolution: int, batch_size: int, epoch: int = 0) -> EpochRunner:
        from nvidia.dali import fn, pipeline_def, types  # DALI: optional, ~1 s to import
        gpu = self.device.type == "cuda"
        decoder_args = {"device": "mixed", "hw_decoder_load": self.hw_decoder_load} if gpu else {"device": "cpu"}
        source = BetonSource(self.columns, batch_size, crop_windows=not self.train, feed=self.feed)

        def crop_raw(pixels, window):
            """Raw HxWx3 pixels (no decoder): the random-resized crop, or the val window, then the size."""
            if self.train:
                return fn.random_resized_crop(pixels, size=(resolution, resolution), random_area=self.scale,
                                              random_aspect_ratio=self.ratio, num_attempts=10)
            cropped = fn.slice(pixels, *window, axis_names="WH", normalized_anchor=False, normalized_shape=False)
            return fn.resize(cropped, resize_x=resolution, resize_y=resolution)

        def crop_encoded(encoded, window):
            """JPEG bytes: decode only the crop region (ROI decoding), then the size."""
            if self.train:
                images = fn.decoders.image_random_crop(encoded, output_type=types.RGB, random_area=self.scale,
                                                       random_aspect_ratio=self.ratio, num_attempts=10,
                                                       **decoder_args)
            else:
                # crop, then resize: FFCV's geometry (the same region as resize to res / 0.875 and
                # centre-crop res), and the ROI decoder skips the borders
                images = fn.decoders.image_slice(encoded, *window, axis_names="WH", output_type=types.RGB,
                                                 normalized_anchor=False, normalized_shape=False,
                                                 **decoder_args)
            return fn.resize(images, resize_x=resolution, resize_y=resolution)

        @pipeline_def(enable_conditionals=True)
        def pipeline():
            dtypes = [types.UINT8, types.INT64] + ([] if self.train else [types.FLOAT])
            # no_copy: DALI reads the beton's pages where they are mapped, in its own threads
            outputs = fn.external_source(source=source, num_outputs=len(dtypes), batch=True, cycle="raise",
                                         dtype=dtypes, no_copy=True)
            data, meta = outputs[:2]
            window = () if self.train else (outputs[2][0:2], outputs[2][2:4])   # (x, y), (width, height)
            labels = meta[4]
            if meta[3] > 0:   # raw pixels. A DALI conditional: the batch splits per sample, then merges
                pixels = fn.reshape(data, shape=fn.cast(meta[0:3], dtype=types.INT32), layout="HWC")
                images = crop_raw(pixels.gpu() if gpu else pixels, window)
            else:
                images = crop_encoded(data, window)
            mirror = fn.random.coin_flip(probability=0.5) if self.train and self.flip else 0
            # HWC out: the NCHW view of an NHWC batch is already channels_last
            images = fn.crop_mirror_normalize(images, dtype=types.UINT8, output_layout="HWC", mirror=mirror)
            # labels reach the GPU inside the pipeline, on its stream, like the images
            return images, labels.gpu() if gpu else labels

        built = pipeline(batch_size=batch_size, num_threads=self.workers,
                         device_id=self.device.index if gpu else None, prefetch_queue_depth=self.prefetch,
                         seed=int(sample_seed(self.seed, epoch, self.rank)))
        built.build()
        _PIPELINES.add(built)
        return EpochRunner(built, source, self.feed)

    def run_epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self.epoch_order(epoch)
        if len(order) == 0:
            return
        key = (self.resolution, self.batch_size)
        runner = self.runners.get(key)
        if self.train or runner is None or not runner.finished:
            # train: a pipeline per epoch, seeded by (seed, epoch, rank), so an epoch's crops do not depend
            # on what ran before it (a resumed run draws the same). Otherwise a new setting, or the last
            # epoch stopped early: DALI cannot reset mid-epoch, so start a fresh pipeline.
            self.runners.clear()
            runner = self.runners[key] = self.build_pipeline(*key, epoch=epoch)
        for images, labels in runner.epoch(order):
            yield self.finish(images.permute(0, 3, 1, 2), labels)
