"""FFCV backend: an `ffcv.loader.Loader` on the beton, with FFCV's JIT-compiled decode + crop.

Resolution and batch size change between epochs by mutating the decoder's output size and the
loader's batch size: FFCV sizes its buffers when each epoch's iterator starts (ffcv-imagenet does the same).
"""
from __future__ import annotations

import sys
from collections.abc import Iterator

import torch

from fastpipe.data.base import VAL_CROP_RATIO, LoaderBase
from fastpipe.data.beton import check_beton

ORDERS = ("random", "quasi_random")


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


class FFCVLoader(LoaderBase):
    """Options: order ("random" | "quasi_random"), os_cache (bool), batches_ahead (int)."""

    backend = "ffcv"

    def __init__(self, data, split: str = "train", *, order: str = "random", os_cache: bool = True,
                 batches_ahead: int = 3, **common):
        super().__init__(data, split, **common)
        if order not in ORDERS:
            raise ValueError(f"ffcv order must be one of {ORDERS}, got {order!r}")
        if order == "quasi_random" and (self.distributed or os_cache or not self.shuffle):
            raise ValueError("ffcv order='quasi_random' needs os_cache=False, shuffle=True and no "
                             "distributed mode (FFCV does not implement it there); use order='random'.")
        if batches_ahead < 1:
            raise ValueError(f"batches_ahead must be at least 1, got {batches_ahead}")
        path = check_beton(self.data_dir, split, self.manifest)   # FFCV itself would crash on a bad file

        from ffcv.fields.basics import IntDecoder
        from ffcv.fields.rgb_image import CenterCropRGBImageDecoder, RandomResizedCropRGBImageDecoder
        from ffcv.loader import Loader, OrderOption
        from ffcv.transforms import RandomHorizontalFlip, ToDevice, ToTensor, ToTorchImage

        size = (self.resolution, self.resolution)
        if self.train:
            self.decoder = RandomResizedCropRGBImageDecoder(size, scale=self.scale, ratio=self.ratio)
        else:
            self.decoder = CenterCropRGBImageDecoder(size, ratio=VAL_CROP_RATIO)
        to_device = [ToDevice(self.device, non_blocking=True)] if self.device.type == "cuda" else []
        image_pipeline = [self.decoder, *([RandomHorizontalFlip()] if self.train and self.flip else []),
                          ToTensor(), *to_device, ToTorchImage(channels_last=True)]
        label_pipeline = [IntDecoder(), ToTensor(), *to_device]
        if not self.shuffle:
            ffcv_order = OrderOption.SEQUENTIAL
        else:
            ffcv_order = OrderOption.QUASI_RANDOM if order == "quasi_random" else OrderOption.RANDOM
        self.loader = Loader(str(path), batch_size=self.batch_size, num_workers=self.workers,
                             os_cache=os_cache, order=ffcv_order, distributed=self.distributed,
                             seed=self.seed, drop_last=self.drop_last, batches_ahead=batches_ahead,
                             pipelines={"image": image_pipeline, "label": label_pipeline})

    def run_epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.decoder.output_size = (self.resolution, self.resolution)
        self.loader.batch_size = self.batch_size
        self.loader.next_epoch = epoch   # FFCV seeds its order from seed + epoch
        # One FFCV epoch iterator (a thread) per epoch, closed even when the caller stops early.
        epoch_iterator = iter(self.loader)
        try:
            for images, labels in epoch_iterator:
                # Batches live in FFCV's reused slots: `finish` makes a new tensor when normalising;
                # a caller keeping uint8 batches across steps must clone them.
                yield self.finish(images, labels)
        finally:
            epoch_iterator.close()
