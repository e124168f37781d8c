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

from benchmarks.photos import photo_like
from fastpipe.data import crop_decode

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


# The three FFCV decode paths on the same bytes and the same random crops (160 px output), stored at
# 256 and 512 px: FFCV's stock decoder (full decode, crop, INTER_AREA), the crop decoder, and the
# ceiling of any full-decode design (full decode alone, no crop and no resize).
# Each also with restart intervals (as the converter writes them: the same pixels, fastpipe.data.restarts),
# which let the crop decoder entropy-decode only the crop's intervals.
@pytest.fixture(scope="module", params=[(256, False), (512, False), (256, True), (512, True)],
                ids=["stored256", "stored512", "stored256-restarts", "stored512-restarts"])
def stored_jpegs(request):
    from ffcv.fields.rgb_image import get_random_crop  # ffcv compiles numba on import: only these benchmarks

    from fastpipe.data.restarts import mcu_columns, restart_interval

    side, marked = request.param
    rng = np.random.default_rng(side)   # the same images and crops with and without restart intervals
    samples = []
    for _ in range(16):
        height = side if rng.random() < 0.5 else int(rng.integers(side * 0.6, side))
        width = side if height < side else int(rng.integers(side * 0.6, side))
        options = [cv2.IMWRITE_JPEG_QUALITY, 90]
        if marked:
            options += [cv2.IMWRITE_JPEG_RST_INTERVAL, restart_interval(mcu_columns(width))]
        encoded = cv2.imencode(".jpg", photo_like(rng, height, width), options)[1].reshape(-1)
        np.random.seed(len(samples))
        crop = get_random_crop(height, width, np.array([0.08, 1.0]), np.array([3 / 4, 4 / 3]))
        samples.append((encoded, height, width, crop))
    return samples


def test_ffcv_stock_decode_crop_resize(benchmark, stored_jpegs):
    from ffcv.libffcv import imdecode, resize_crop  # ffcv: as above

    scratch = np.zeros(512 * 512 * 3, np.uint8)
    out = np.zeros((RESOLUTION, RESOLUTION, 3), np.uint8)

    def run():
        for encoded, height, width, (top, left, crop_h, crop_w) in stored_jpegs:
            imdecode(encoded, scratch, height, width, height, width, 0, 0, 1, 1, False, False)
            pixels = scratch[:height * width * 3].reshape(height, width, 3)
            resize_crop(pixels, top, top + crop_h, left, left + crop_w, out)

    benchmark(run)


def test_ffcv_full_decode_alone_ceiling(benchmark, stored_jpegs):
    from ffcv.libffcv import imdecode  # ffcv: as above

    scratch = np.zeros(512 * 512 * 3, np.uint8)

    def run():
        for encoded, height, width, _ in stored_jpegs:
            imdecode(encoded, scratch, height, width, height, width, 0, 0, 1, 1, False, False)

    benchmark(run)


def test_crop_decoder(benchmark, stored_jpegs):
    if not crop_decode.available():
        pytest.skip(crop_decode.MISSING)
    out = np.zeros((RESOLUTION, RESOLUTION, 3), np.uint8)

    def run():
        for encoded, height, width, (top, left, crop_h, crop_w) in stored_jpegs:
            crop_decode.decode_crop(encoded, height, width, top, left, crop_h, crop_w, out, 0, crop_decode.MAX_DENOM)

    benchmark(run)


def test_crop_entropy_decoding_alone(benchmark, stored_jpegs):
    # The floor under the crop decoder: Huffman decoding of what it must read (the crop's restart intervals,
    # or the whole file without them), no inverse DCT, upsampling, colour conversion or resize.
    if not crop_decode.available():
        pytest.skip(crop_decode.MISSING)

    def run():
        for encoded, height, width, (top, left, crop_h, crop_w) in stored_jpegs:
            crop_decode.entropy_only(encoded, height, width, top, left, crop_h, crop_w, RESOLUTION, RESOLUTION)

    benchmark(run)


def test_restart_interval_scan(benchmark, stored_jpegs):
    # What finding the intervals costs (the frame header, then every marker): the decoder scans each sample
    # rather than storing an index of its intervals.
    if not crop_decode.available():
        pytest.skip(crop_decode.MISSING)

    def run():
        for encoded, *_ in stored_jpegs:
            crop_decode.scan_intervals(encoded)

    benchmark(run)


def test_whole_file_entropy_decoding(benchmark, stored_jpegs):
    # Huffman decoding of every interval: against the same files without intervals, what the markers cost
    # libjpeg-turbo, which decodes a stream with restart intervals on its slower per-symbol path throughout.
    if not crop_decode.available():
        pytest.skip(crop_decode.MISSING)

    def run():
        for encoded, height, width, _ in stored_jpegs:
            crop_decode.entropy_only(encoded, height, width, 0, 0, height, width, height, width, 1)

    benchmark(run)
