"""DALI backend: the beton's stored bytes go through `fn.external_source` into DALI's decoders.

JPEG samples are decoded with ROI decoding (only the crop region); raw-pixel samples (beton write
modes raw/smart/proportion) are wrapped as binary PPM so one decoder handles both. Without a GPU the
whole pipeline runs on the CPU (device_id=None); with one, decoding is "mixed" (nvJPEG).
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from fastpipe.data.base import VAL_CROP_RATIO, LoaderBase
from fastpipe.data.beton import BetonSamples, check_beton
from fastpipe.data.seeding import sample_seed


def ppm_bytes(pixels: np.ndarray, width: int, height: int) -> np.ndarray:
    # No DALI operator takes a mix of encoded and raw images; a 15-byte PPM header makes raw
    # pixels decodable by the same image decoder at the cost of one copy.
    header = np.frombuffer(f"P6\n{width} {height}\n255\n".encode(), dtype=np.uint8)
    return np.concatenate([header, pixels])


def center_crop_windows(width: np.ndarray, height: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """FFCV's val crop in pixels, (x, y) anchors and (w, h) shapes: a centred square of 0.875 x the
    shorter side, with FFCV's integer rounding (a half-pixel shift shows on fine textures)."""
    side = (VAL_CROP_RATIO * np.minimum(width, height)).astype(np.int64)
    anchor = np.stack([(width - side) // 2, (height - side) // 2], axis=1)
    return anchor.astype(np.float32), np.stack([side, side], axis=1).astype(np.float32)


class BetonSource:
    """Batches of (encoded images, labels[, val crop anchors, val crop shapes]) in the epoch's order.

    With cycle="raise" DALI calls iter() again at each epoch's end; the generator body (and so the
    order it reads) only runs when the next epoch's first batch is scheduled, after `order` is set.
    """

    def __init__(self, samples: BetonSamples, batch_size: int, crop_windows: bool):
        self.samples = samples
        self.batch_size = batch_size
        self.crop_windows = crop_windows   # val only: train crops are drawn by DALI
        self.order = np.zeros(0, dtype=np.int64)

    def __iter__(self):
        samples, order = self.samples, self.order
        for start in range(0, len(order), self.batch_size):
            indices = order[start:start + self.batch_size]
            encoded = [ppm_bytes(samples.encoded(i), samples.width[i], samples.height[i])
                       if samples.is_raw(i) else samples.encoded(i) for i in indices]
            if self.crop_windows:
                yield encoded, samples.labels[indices], *center_crop_windows(samples.width[indices],
                                                                             samples.height[indices])
            else:
                yield encoded, samples.labels[indices]


class EpochRunner:
    """One built pipeline (fixed resolution and batch size) with its source and iterator."""

    def __init__(self, pipeline, source: BetonSource):
        self.pipeline, self.source, self.iterator = pipeline, source, None
        self.finished = True   # False while an epoch is in flight

    def epoch(self, order: np.ndarray):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy
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
        self.samples = BetonSamples(check_beton(self.data_dir, split, self.manifest))
        if not 0 <= hw_decoder_load <= 1:
            raise ValueError(f"hw_decoder_load must be in [0, 1], got {hw_decoder_load}")
        self.hw_decoder_load, self.prefetch = hw_decoder_load, int(prefetch)
        self.runners: dict[tuple[int, int], EpochRunner] = {}   # DALI fixes sizes when it builds

    def build_pipeline(self, resolution: int, batch_size: int, epoch: int = 0) -> EpochRunner:
        from nvidia.dali import fn, pipeline_def, types
        gpu = self.device.type == "cuda"
        decoder_args = {"device": "mixed", "hw_decoder_load": self.hw_decoder_load} if gpu else {"device": "cpu"}
        source = BetonSource(self.samples, batch_size, crop_windows=not self.train)

        @pipeline_def
        def pipeline():
            dtypes = [types.UINT8, types.INT64] + ([] if self.train else [types.FLOAT, types.FLOAT])
            outputs = fn.external_source(source=source, num_outputs=len(dtypes), batch=True, cycle="raise",
                                         dtype=dtypes)
            encoded, labels = outputs[:2]
            if self.train:
                images = fn.decoders.image_random_crop(encoded, output_type=types.RGB, random_area=self.scale,
                                                       random_aspect_ratio=self.ratio, num_attempts=10,
                                                       **decoder_args)
                images = fn.resize(images, resize_x=resolution, resize_y=resolution)
                mirror = fn.random.coin_flip(probability=0.5) if self.flip else 0
            else:
                # crop, then resize: FFCV's geometry (the same region as resize to res / 0.875 and
                # centre-crop res), and the ROI decoder skips the borders
                anchor, shape = outputs[2:]
                images = fn.decoders.image_slice(encoded, anchor, shape, axis_names="WH", output_type=types.RGB,
                                                 normalized_anchor=False, normalized_shape=False,
                                                 **decoder_args)
                images = fn.resize(images, resize_x=resolution, resize_y=resolution)
                mirror = 0
            # HWC out: the NCHW view of an NHWC batch is already channels_last
            images = fn.crop_mirror_normalize(images, dtype=types.UINT8, output_layout="HWC", mirror=mirror)
            # labels reach the GPU inside the pipeline, on its stream, like the images
            return images, labels.gpu() if gpu else labels

        built = pipeline(batch_size=batch_size, num_threads=self.workers,
                         device_id=self.device.index if gpu else None, prefetch_queue_depth=self.prefetch,
                         seed=int(sample_seed(self.seed, epoch, self.rank)))
        built.build()
        return EpochRunner(built, source)

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
