"""Per-image costs on the CPU side of the data path: JPEG decode and RandomResizedCrop.

Run with `pytest benchmarks --benchmark-json=runs/bench.json` (`make bench`); figures, not pass/fail.
"""
from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

RESOLUTION = 160


def test_decode_jpeg_pil(benchmark, jpeg_bytes):
    image = benchmark(lambda: np.asarray(Image.open(io.BytesIO(jpeg_bytes)).convert("RGB")))
    assert image.shape == (375, 500, 3)


def test_decode_jpeg_opencv(benchmark, jpeg_bytes):
    # FFCV decodes with libjpeg-turbo; OpenCV's decoder is the closest stand-alone equivalent.
    encoded = np.frombuffer(jpeg_bytes, dtype=np.uint8)
    image = benchmark(cv2.imdecode, encoded, cv2.IMREAD_COLOR)
    assert image.shape == (375, 500, 3)


@pytest.fixture(scope="module")
def decoded(jpeg_bytes) -> np.ndarray:
    return np.array(Image.open(io.BytesIO(jpeg_bytes)).convert("RGB"))


def test_random_resized_crop_torchvision_v2(benchmark, decoded):
    crop = v2.RandomResizedCrop(RESOLUTION, scale=(0.08, 1.0), antialias=True)
    tensor = torch.from_numpy(decoded).permute(2, 0, 1).contiguous()
    out = benchmark(crop, tensor)
    assert tuple(out.shape) == (3, RESOLUTION, RESOLUTION)


def test_random_resized_crop_opencv_area(benchmark, decoded):
    # What FFCV's RandomResizedCrop decoder does after a full decode: crop, then INTER_AREA resize.
    params = v2.RandomResizedCrop.get_params  # torchvision's sampling of the crop box

    def crop_resize():
        top, left, height, width = params(torch.empty(1, *decoded.shape[:2]), [0.08, 1.0], [3 / 4, 4 / 3])
        region = decoded[top:top + height, left:left + width]
        return cv2.resize(region, (RESOLUTION, RESOLUTION), interpolation=cv2.INTER_AREA)

    out = benchmark(crop_resize)
    assert out.shape == (RESOLUTION, RESOLUTION, 3)
