"""torchvision baseline: the split's ORIGINAL image files (listed in the manifest, so exactly the
beton's samples and labels) decoded with torchvision.io (PIL for the formats it lacks) to the same pixels
the converter wrote, and augmented with v2 transforms in DataLoader worker processes.
"""
from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler
from torchvision.io import ImageReadMode, decode_image, read_file
from torchvision.transforms import v2

from fastpipe.data.base import VAL_CROP_RATIO, LoaderBase
from fastpipe.data.beton import BetonError
from fastpipe.data.images import SNIFF_BYTES, decode_rgb, sniff_format
from fastpipe.data.sample_table import SampleTable
from fastpipe.data.seeding import sample_seed

TORCHVISION_FORMATS = frozenset({"JPEG", "PNG", "GIF", "WEBP"})


ARCHIVE_LAYOUTS = ("imagenet_archives", "webdataset", "parquet")   # convert imagenet / webdataset / parquet



def read_bytes(path: Path) -> torch.Tensor:
    """The file as a uint8 tensor: torchvision's reader, or Python's for a file name that is not UTF-8
    (kept surrogate-escaped in the sample table), which torchvision cannot take."""
    name = str(path)
    try:
        name.encode()
    except UnicodeEncodeError:
        return torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)
    return read_file(name)

class ManifestImages(Dataset):
    """Item (index, resolution, epoch) -> (HxWx3 uint8 image, label); resolution and epoch travel with the
    index so persistent workers follow `set_resolution` without a restart, and each train sample's
    augmentation is seeded by (seed, epoch, index), whichever worker draws it."""

    def __init__(self, root: Path, samples: list, train: bool, scale, ratio, flip: bool, seed: int):
        self.root, self.samples, self.seed = root, samples, seed
        self.train, self.scale, self.ratio, self.flip = train, scale, ratio, flip
        self.transforms: dict[int, v2.Transform] = {}

    def transform(self, resolution: int) -> v2.Transform:
        if resolution not in self.transforms:
            if self.train:
                steps = [v2.RandomResizedCrop(resolution, scale=self.scale, ratio=self.ratio, antialias=True),
                         *([v2.RandomHorizontalFlip(0.5)] if self.flip else [])]
            else:
                steps = [v2.Resize(round(resolution / VAL_CROP_RATIO), antialias=True), v2.CenterCrop(resolution)]
            self.transforms[resolution] = v2.Compose(steps)
        return self.transforms[resolution]

    def __len__(self) -> int:
        return len(self.samples)

    def read(self, index: int) -> torch.Tensor:
        """Sample `index` as a 3xHxW uint8 tensor with the converter's pixels: torchvision's libjpeg-turbo/
        libpng/libwebp decoders (EXIF orientation applied) where they agree with it, the converter's own
        decoder (PIL) for the rest: BMP, TIFF, PPM and 16-bit PNG (tests/test_data_formats.py)."""
        path = self.root / self.samples[index][0]
        with warnings.catch_warnings():   # torchvision 0.29 points to torchcodec; these still work
            warnings.simplefilter("ignore", DeprecationWarning)
            data = read_bytes(path)
            if sniff_format(data[:SNIFF_BYTES].numpy().tobytes()) in TORCHVISION_FORMATS:
                image = decode_image(data, mode=ImageReadMode.RGB, apply_exif_orientation=True)
                if image.dtype == torch.uint8:
                    return image
        return torch.from_numpy(decode_rgb(path)).permute(2, 0, 1)

    def __getitem__(self, item: tuple[int, int, int]):
        index, resolution, epoch = item
        label = self.samples[index][1]
        if self.train:   # v2 transforms draw from this worker's global torch generator
            torch.default_generator.manual_seed(int(sample_seed(self.seed, epoch, index)))   # CPU only: 100x cheaper than torch.manual_seed
        image = self.read(index)
        # HWC here (in the worker) so the collated NHWC batch is a free channels_last NCHW view
        return self.transform(resolution)(image).permute(1, 2, 0).contiguous(), label


class EpochSampler(Sampler):
    """Yields (index, resolution, epoch) for the order the loader set; read in the main process."""

    def __init__(self):
        self.order, self.resolution, self.epoch = np.zeros(0, dtype=np.int64), 0, 0

    def __iter__(self):
        return ((int(i), self.resolution, self.epoch) for i in self.order)

    def __len__(self) -> int:
        return len(self.order)


class TorchLoader(LoaderBase):
    """Options: prefetch_factor (batches per worker)."""

    backend = "torch"

    def __init__(self, data, split: str = "train", *, prefetch_factor: int = 2, **common):
        super().__init__(data, split, **common)
        if self.manifest.get("layout") == "adopted":
            raise BetonError(f"{self.data_dir} holds adopted betons (`python -m convert adopt`): there are no "
                             f"source images for the torch baseline to read. Use backend 'ffcv' or 'dali'.")
        if self.manifest.get("layout") in ARCHIVE_LAYOUTS:
            raise BetonError(f"{self.data_dir} was converted from archives ({self.manifest['layout']}): the torch "
                             f"baseline reads image files, which were never extracted. Use backend 'ffcv' or 'dali'.")
        root = Path(self.manifest.get("source_root") or "")
        samples = SampleTable(self.data_dir, self.manifest, split).pairs()   # the baseline reads files by name
        if not samples or not root.is_dir():
            raise BetonError(f"The torch backend reads the original images, but {self.data_dir}/manifest.json "
                             f"lists {'no samples' if not samples else f'source_root {root}, which does not exist'}. "
                             f"Use backend 'ffcv' or 'dali', or re-convert from an existing folder.")
        first = root / samples[0][0]
        if not first.is_file():
            raise BetonError(f"Source image {first} (from {self.data_dir}/manifest.json) is missing; the torch "
                             f"backend needs the original folder. Use backend 'ffcv' or 'dali'.")
        self.dataset = ManifestImages(root, samples, self.train, self.scale, self.ratio, self.flip, self.seed)
        self.sampler = EpochSampler()
        # Order and batch size live in the main process, so changing them needs no worker restart.
        self.batch_sampler = BatchSampler(self.sampler, self.batch_size, drop_last=False)
        self.dataloader = DataLoader(self.dataset, batch_sampler=self.batch_sampler, num_workers=self.workers,
                                     pin_memory=self.device.type == "cuda", persistent_workers=True,
                                     prefetch_factor=prefetch_factor,
                                     generator=torch.Generator().manual_seed(self.seed))

    def run_epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.sampler.order = self.epoch_order(epoch)
        self.sampler.resolution, self.sampler.epoch = self.resolution, epoch
        self.batch_sampler.batch_size = self.batch_size
        for images, labels in self.dataloader:
            yield self.finish(images.permute(0, 3, 1, 2), labels)
