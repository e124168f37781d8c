"""The native crop decoder: a crop window decoded alone equals the same window of a full decode (exactly at
DCT scale 1, within a stated mean absolute difference when DCT-scaled), for every kind of JPEG; raw crops
land on the right pixels; the FFCV loader takes the same crops and flips with either decoder."""
from __future__ import annotations

import io
import shutil
import subprocess

import cv2
import numpy as np
import pytest
import torch
from ffcv.libffcv import imdecode
from PIL import Image

from fastpipe.data import build_loader, crop_decode
from tests.data_helpers import write_dataset

pytestmark = pytest.mark.skipif(not crop_decode.available(), reason=crop_decode.MISSING)

# Mean absolute difference (0-255) between a DCT-scaled decode + resize and a full decode + crop + area
# resize of the same window, on noisy photo-like images at quality 90 (measured: 1.7, 1.6, 3.7 mean).
SCALED_BOUND = {2: 2.5, 4: 2.5, 8: 6.0}


def photo(rng, height: int, width: int) -> np.ndarray:
    """Smooth colour regions plus sensor-like noise: enough detail for DCT scaling to matter."""
    base = rng.integers(0, 255, (height // 16 + 1, width // 16 + 1, 3)).astype(np.uint8)
    base = cv2.resize(base, (width, height), interpolation=cv2.INTER_CUBIC)
    return (base + rng.normal(0, 12, (height, width, 3))).clip(0, 255).astype(np.uint8)


def coordinates(height: int, width: int) -> np.ndarray:
    """Pixels that encode where they are: red = x, green = y, blue = the 256-px tile."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x % 256, y % 256, (x // 256) * 16 + y // 256], axis=-1).astype(np.uint8)


def encode(pixels: np.ndarray, *, mode: str = "RGB", **options) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buffer, "JPEG", quality=options.pop("quality", 92), **options)
    return np.frombuffer(buffer.getvalue(), dtype=np.uint8)


def full_decode(jpeg: np.ndarray, height: int, width: int) -> np.ndarray:
    """FFCV's stock decode of the whole image (TurboJPEG)."""
    pixels = np.zeros(height * width * 3, dtype=np.uint8)
    imdecode(jpeg, pixels, height, width, height, width, 0, 0, 1, 1, False, False)
    return pixels.reshape(height, width, 3)


def random_window(rng, height: int, width: int, smallest: int = 1) -> tuple[int, int, int, int]:
    crop_h, crop_w = int(rng.integers(smallest, height + 1)), int(rng.integers(smallest, width + 1))
    return int(rng.integers(0, height - crop_h + 1)), int(rng.integers(0, width - crop_w + 1)), crop_h, crop_w


def decode_window(jpeg, height, width, top, left, crop_h, crop_w, out_shape=None, flip=0, max_denom=1):
    out = np.zeros((*(out_shape or (crop_h, crop_w)), 3), dtype=np.uint8)
    used = crop_decode.decode_crop(jpeg, height, width, top, left, crop_h, crop_w, out, flip, max_denom)
    return out, used


CORPUS = {   # name: (height, width, PIL save options) -- odd sizes, every sampling FFCV-written files use and more
    "baseline_420": (257, 333, {"subsampling": 2}),
    "baseline_444": (123, 97, {"subsampling": 0}),
    "baseline_422": (200, 301, {"subsampling": 1}),
    "progressive_420": (245, 171, {"subsampling": 2, "progressive": True}),
    "tiny": (7, 13, {}),
    "restart_markers": (150, 211, {"subsampling": 2, "restart_marker_blocks": 3}),   # rows not tiled: usual path
    # restart intervals that tile the MCU rows: only the intervals covering a window are entropy-decoded
    "restart_columns_420": (375, 500, {"subsampling": 2, "restart_marker_blocks": 4}),   # 32 MCUs a row
    "restart_columns_444": (201, 333, {"subsampling": 0, "restart_marker_blocks": 6}),   # 42 MCUs, odd width
    "restart_columns_422": (190, 250, {"subsampling": 1, "restart_marker_blocks": 2}),   # 16 MCUs
    "restart_rows_420": (333, 211, {"subsampling": 2, "restart_marker_rows": 1}),        # one interval a row
    "restart_two_rows_420": (100, 160, {"subsampling": 2, "restart_marker_rows": 2}),
    "restart_one_mcu_gray": (99, 141, {"restart_marker_blocks": 1, "mode": "L"}),
}
RESTART_TILED = {name for name in CORPUS if name.startswith("restart_") and name != "restart_markers"}


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_window_equals_the_same_window_of_a_full_decode(name):
    height, width, options = CORPUS[name]
    rng = np.random.default_rng(len(name))
    options = dict(options)
    jpeg = encode(photo(rng, height, width), mode=options.pop("mode", "RGB"), **options)
    reference = full_decode(jpeg, height, width)
    before = crop_decode.read_counters()
    for _ in range(40):
        top, left, crop_h, crop_w = random_window(rng, height, width)
        out, used = decode_window(jpeg, height, width, top, left, crop_h, crop_w)
        assert used == 1
        np.testing.assert_array_equal(out, reference[top:top + crop_h, left:left + crop_w],
                                      err_msg=f"{name} window {(top, left, crop_h, crop_w)}")
    after = crop_decode.read_counters()
    restarted = after["restart_decodes"] - before["restart_decodes"]
    assert (restarted > 0) if name in RESTART_TILED else restarted == 0
    if name in RESTART_TILED:   # the intervals read are a part of the entropy-coded data
        assert after["entropy_bytes_read"] - before["entropy_bytes_read"] < \
            after["entropy_bytes"] - before["entropy_bytes"]


def test_grayscale_jpeg_decodes_to_equal_rgb_channels():
    rng = np.random.default_rng(3)
    gray = photo(rng, 99, 141)[..., 0]
    jpeg = encode(gray, mode="L")
    out, _ = decode_window(jpeg, 99, 141, 10, 20, 60, 90)
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    np.testing.assert_array_equal(out, full_decode(jpeg, 99, 141)[10:70, 20:110])


def test_cmyk_jpeg_falls_back_to_a_full_decode_with_the_same_colours():
    rng = np.random.default_rng(4)
    pixels = photo(rng, 90, 120)
    jpeg = encode(pixels, mode="CMYK", quality=95)
    before = crop_decode.read_counters()["full_decodes"]
    out, used = decode_window(jpeg, 90, 120, 5, 7, 50, 70)
    assert used == 1 and crop_decode.read_counters()["full_decodes"] == before + 1
    reference = np.asarray(Image.open(io.BytesIO(jpeg.tobytes())).convert("RGB"))[5:55, 7:77]
    assert np.abs(out.astype(int) - reference).mean() < 2.0   # PIL: accurate DCT; here the fast one, as stock
    assert np.abs(out.astype(int) - pixels[5:55, 7:77]).mean() < 6   # and close to what was encoded


def test_windows_land_on_their_coordinates():
    """Pixels encode their coordinates, so a window shifted by even one pixel is caught."""
    height, width = 300, 520
    pixels = coordinates(height, width)
    jpeg = encode(pixels, quality=100, subsampling=0)
    rng = np.random.default_rng(5)
    for _ in range(20):
        top, left, crop_h, crop_w = random_window(rng, height, width, smallest=16)
        out, _ = decode_window(jpeg, height, width, top, left, crop_h, crop_w)
        expected = pixels[top:top + crop_h, left:left + crop_w].astype(int)
        error = np.abs(out.astype(int) - expected)
        assert np.median(error) <= 2, (top, left, crop_h, crop_w)   # one column off would be ~1 everywhere in red


def test_raw_crop_resize_takes_the_exact_window_and_mirrors():
    height, width = 280, 300
    pixels = coordinates(height, width)
    rng = np.random.default_rng(6)
    for _ in range(20):
        top, left, crop_h, crop_w = random_window(rng, height, width)
        out = np.zeros((crop_h, crop_w, 3), dtype=np.uint8)
        crop_decode.crop_resize(pixels, top, left, crop_h, crop_w, out, 0)
        np.testing.assert_array_equal(out, pixels[top:top + crop_h, left:left + crop_w])
        crop_decode.crop_resize(pixels, top, left, crop_h, crop_w, out, 1)
        np.testing.assert_array_equal(out, pixels[top:top + crop_h, left:left + crop_w][:, ::-1])


def halve_then_bilinear(pixels: np.ndarray, side: int) -> tuple[np.ndarray, tuple[int, int]]:
    """The decoder's resize, written with cv2: 2x box averaging per axis while that axis shrinks 2x or more
    (an odd last row or column dropped first), then bilinear. Returns the image and the window of
    `pixels` it covers (the top-left rows x columns)."""
    factor = [1, 1]
    while pixels.shape[0] >= 2 * side or pixels.shape[1] >= 2 * side:
        fy, fx = (2 if pixels.shape[0] >= 2 * side else 1), (2 if pixels.shape[1] >= 2 * side else 1)
        even = pixels[:pixels.shape[0] // fy * fy, :pixels.shape[1] // fx * fx]
        pixels = cv2.resize(even, (even.shape[1] // fx, even.shape[0] // fy), interpolation=cv2.INTER_AREA)
        factor = [factor[0] * fy, factor[1] * fx]
    window = (pixels.shape[0] * factor[0], pixels.shape[1] * factor[1])
    return cv2.resize(pixels, (side, side), interpolation=cv2.INTER_LINEAR), window


@pytest.mark.parametrize("side", [160, 100, 50])   # shrink 1.5x, 2.4x (one halving), 4.8x (two)
def test_resize_halves_while_shrinking_two_x_then_goes_bilinear(side):
    rng = np.random.default_rng(7)
    pixels = photo(rng, 240, 231)
    out = np.zeros((side, side, 3), dtype=np.uint8)
    crop_decode.crop_resize(pixels, 0, 0, 240, 231, out, 0)
    expected, (rows, columns) = halve_then_bilinear(pixels, side)
    assert np.abs(out.astype(int) - expected).max() <= 1, side   # OpenCV builds may round a last bit differently
    assert 240 - rows < 4 and 231 - columns < 4   # the window shrinks by under one output pixel
    # antialiased: close to an area resize of the same window, unlike plain bilinear past 2x
    window = pixels[:rows, :columns]
    area = cv2.resize(window, (side, side), interpolation=cv2.INTER_AREA).astype(int)
    assert np.abs(out.astype(int) - area).mean() < 2.5, side
    if side < 120:
        bilinear = cv2.resize(window, (side, side), interpolation=cv2.INTER_LINEAR).astype(int)
        assert np.abs(bilinear - area).mean() > 2 * np.abs(out.astype(int) - area).mean(), side


@pytest.mark.parametrize("denom", [2, 4, 8])
def test_dct_scaling_stays_within_its_stated_bound(denom):
    rng = np.random.default_rng(denom)
    side = 32
    differences = []
    for _ in range(8):
        height, width = int(rng.integers(300, 600)), int(rng.integers(300, 600))
        jpeg = encode(photo(rng, height, width), quality=90, subsampling=2)
        reference = full_decode(jpeg, height, width)
        # windows on the scale's grid, between 1x and 2x the smallest size that allows this scale
        crop_h = int(rng.integers(denom * side, min(height, 2 * denom * side))) // denom * denom
        crop_w = int(rng.integers(denom * side, min(width, 2 * denom * side))) // denom * denom
        top = int(rng.integers(0, (height - crop_h) // denom + 1)) * denom
        left = int(rng.integers(0, (width - crop_w) // denom + 1)) * denom
        out, used = decode_window(jpeg, height, width, top, left, crop_h, crop_w, (side, side), max_denom=8)
        assert used == denom == crop_decode.scale_denom(crop_h, crop_w, side, side)
        expected = cv2.resize(reference[top:top + crop_h, left:left + crop_w], (side, side),
                              interpolation=cv2.INTER_AREA)
        differences.append(np.abs(out.astype(int) - expected).mean())
    assert max(differences) < SCALED_BOUND[denom], differences


def test_scale_is_the_largest_that_keeps_the_crop_at_least_the_output():
    assert crop_decode.scale_denom(320, 320, 160, 160) == 2
    assert crop_decode.scale_denom(319, 400, 160, 160) == 1
    assert crop_decode.scale_denom(1280, 700, 160, 160) == 4
    assert crop_decode.scale_denom(5000, 5000, 160, 160) == 8
    assert crop_decode.scale_denom(5000, 5000, 160, 160, max_denom=2) == 2


def test_broken_jpeg_gives_zeros_and_a_negative_result_never_a_crash():
    rng = np.random.default_rng(8)
    jpeg = encode(photo(rng, 64, 64))
    out = np.full((32, 32, 3), 7, dtype=np.uint8)
    failures = crop_decode.read_counters()["failures"]
    assert crop_decode.decode_crop(jpeg[:40].copy(), 64, 64, 0, 0, 64, 64, out, 0, 8) < 0
    assert not out.any() and crop_decode.read_counters()["failures"] == failures + 1
    assert crop_decode.decode_crop(jpeg, 64, 64, 60, 0, 10, 10, out, 0, 8) < 0   # window outside the image


@pytest.mark.skipif(shutil.which("pkg-config") is None, reason="pkg-config not installed")
def test_library_is_built_wherever_its_headers_are():
    """Guards against a silent fall back to the stock decoder on machines that could build it."""
    headers = subprocess.run(["pkg-config", "--exists", "libjpeg", "opencv4"], check=False).returncode == 0
    assert crop_decode.available() or not headers


@pytest.mark.parametrize("write_mode", ["jpg", "raw"])
def test_loader_takes_the_same_crops_and_flips_with_either_decoder(tmp_path, write_mode):
    data = write_dataset(tmp_path, train=24, val=12, write_mode=write_mode)
    common = {"data": data, "batch_size": 8, "resolution": 32, "workers": 2, "shuffle": False,
              "normalize": False, "dtype": torch.uint8, "seed": 3, "min_scale": 0.3}
    for split in ("train", "val"):
        stock = build_loader("ffcv", split=split, decoder="stock", **common)
        crop = build_loader("ffcv", split=split, decoder="crop", **common)
        assert crop.decoder_kind == "crop" and stock.decoder_kind == "stock"
        for epoch in (0, 1):
            stock.set_epoch(epoch)
            crop.set_epoch(epoch)
            for (a, labels_a), (b, labels_b) in zip(stock, crop):
                assert torch.equal(labels_a, labels_b)
                # bilinear vs area resize of the same window: close, and far from a mirrored image
                difference = (a.float() - b.float()).abs().mean().item()
                mirrored = (a.float() - b.flip(-1).float()).abs().mean().item()
                assert difference < 3.0 and difference < mirrored / 3, (split, epoch, difference, mirrored)


def test_loader_follows_resolution_changes_with_the_crop_decoder(tmp_path):
    data = write_dataset(tmp_path, train=16, val=8)
    loader = build_loader("ffcv", data=data, batch_size=8, resolution=32, workers=1, decoder="crop")
    assert next(iter(loader))[0].shape[-2:] == (32, 32)
    loader.set_resolution(48)
    assert next(iter(loader))[0].shape[-2:] == (48, 48)


def test_asking_for_the_crop_decoder_without_the_library_says_how_to_build_it(tmp_path, monkeypatch):
    data = write_dataset(tmp_path, train=8, val=8)
    monkeypatch.setattr(crop_decode, "_lib", None)
    monkeypatch.setattr(crop_decode, "MISSING", crop_decode.NOT_BUILT)
    with pytest.raises(RuntimeError, match="make sysdeps"):
        build_loader("ffcv", data=data, batch_size=4, resolution=32, workers=1, decoder="crop")
    with pytest.warns(UserWarning, match="stock decoder"):
        loader = build_loader("ffcv", data=data, batch_size=4, resolution=32, workers=1)
    assert loader.decoder_kind == "stock"
    with pytest.raises(ValueError, match="decoder must be one of"):
        build_loader("ffcv", data=data, batch_size=4, resolution=32, workers=1, decoder="fast")


@pytest.mark.parametrize("options", [{"subsampling": 2, "restart_marker_blocks": 4},
                                     {"subsampling": 0, "restart_marker_rows": 1}])
def test_dct_scaled_windows_from_restart_intervals_equal_those_of_the_whole_stream(options):
    """Same coefficients with or without markers: at every DCT scale the intervals-only decode gives the
    pixels the usual path gives on the marker-free file."""
    rng = np.random.default_rng(11)
    height, width = 512, 640   # 40 MCUs a row at 4:2:0: intervals of 4 tile it
    pixels = photo(rng, height, width)
    plain, marked = encode(pixels, subsampling=options["subsampling"]), encode(pixels, **options)
    before = crop_decode.read_counters()["restart_decodes"]
    scales = set()
    for _ in range(60):
        top, left, crop_h, crop_w = random_window(rng, height, width, smallest=40)
        side = int(rng.choice([16, 32, 64]))
        expected, used = decode_window(plain, height, width, top, left, crop_h, crop_w, (side, side), max_denom=8)
        out, used_marked = decode_window(marked, height, width, top, left, crop_h, crop_w, (side, side), max_denom=8)
        assert used == used_marked
        scales.add(used)
        np.testing.assert_array_equal(out, expected, err_msg=f"window {(top, left, crop_h, crop_w)} at 1/{used}")
    assert scales >= {1, 2, 4} and crop_decode.read_counters()["restart_decodes"] > before


def guarded(data: np.ndarray) -> np.ndarray:
    """`data` copied to the end of readable memory that an unreadable page follows."""
    import ctypes
    import mmap

    page = mmap.PAGESIZE
    size = -(-len(data) // page) * page
    region = np.frombuffer(mmap.mmap(-1, size + page, prot=mmap.PROT_READ | mmap.PROT_WRITE), dtype=np.uint8)
    region[size - len(data):size] = data
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.mprotect(ctypes.c_void_p(region.ctypes.data + size), ctypes.c_size_t(page), 0) == 0
    return region[size - len(data):size]


def test_damaged_restart_intervals_never_crash_or_read_past_the_sample():
    """A cut file, a marker out of sequence, garbage in an interval: the decoder falls back to the usual
    path (libjpeg's own error handling) or counts a zero image; it never reads past the bytes it is given."""
    rng = np.random.default_rng(12)
    jpeg = encode(photo(rng, 240, 320), subsampling=2, restart_marker_blocks=4)
    markers = [i for i in range(len(jpeg) - 1) if jpeg[i] == 0xFF and 0xD0 <= jpeg[i + 1] <= 0xD7]
    assert len(markers) > 10
    out_of_order = jpeg.copy()
    out_of_order[markers[5] + 1] = 0xD0 + (out_of_order[markers[5] + 1] - 0xD0 + 3) % 8
    garbage = jpeg.copy()
    garbage[markers[7] + 2:markers[8]] = rng.integers(0, 255, markers[8] - markers[7] - 2, dtype=np.uint8)
    for damaged in (jpeg[:len(jpeg) // 2], jpeg[:markers[3] + 1], out_of_order, garbage):
        damaged = guarded(damaged)   # a read past the sample's last byte would fault
        for _ in range(20):
            top, left, crop_h, crop_w = random_window(rng, 240, 320, smallest=8)
            out, used = decode_window(damaged, 240, 320, top, left, crop_h, crop_w, (32, 32), max_denom=8)
            assert used in (1, 2, 4, 8) or (used < 0 and not out.any())


def test_headers_cut_at_the_scan_header_are_refused_without_reading_past_them():
    """A scan header whose length field claims fewer bytes than its component list needs, as the sample's
    last bytes: the header parser stops at the length, never reading the byte after the sample."""
    jpeg = bytes(encode(photo(np.random.default_rng(14), 32, 32), restart_marker_blocks=1))
    sos = jpeg.index(b"\xff\xda")
    for tail in (b"\xff\xda\x00\x02", b"\xff\xda\x00\x03\x03", b"\xff\xda\x00\x08\x03\x01\x00\x02"):
        cut = guarded(np.frombuffer(jpeg[:sos] + tail, dtype=np.uint8))
        assert crop_decode.scan_intervals(cut) == 0 and crop_decode.mcus_per_row(bytes(cut)) == 0
        out, used = decode_window(cut, 32, 32, 0, 0, 16, 16)
        assert used < 0 and not out.any()


def test_a_stored_size_larger_than_the_file_is_a_counted_failure_with_or_without_intervals():
    """The beton's size for a sample disagrees with the JPEG's own frame (a crop past the real image): both
    paths refuse it and count it, rather than decoding an empty window into made-up pixels."""
    pixels = photo(np.random.default_rng(15), 64, 64)
    for jpeg in (encode(pixels), encode(pixels, restart_marker_blocks=2)):
        for height, width, top, left in ((256, 256, 200, 200), (256, 64, 200, 0), (64, 4096, 0, 3000)):
            before = crop_decode.read_counters()["failures"]
            out, used = decode_window(jpeg, height, width, top, left, 40, 40)
            assert used < 0 and not out.any()
            assert crop_decode.read_counters()["failures"] == before + 1


def test_a_lossless_rewrite_that_does_not_fit_asks_for_more_room():
    """The rewrite writes straight into the caller's buffer; one too small returns 0 (and the Python side
    retries with more), never a partial file."""
    jpeg = bytes(encode(photo(np.random.default_rng(16), 96, 128)))
    whole = crop_decode.add_restarts(jpeg, 2)
    source = np.frombuffer(jpeg, dtype=np.uint8)
    for capacity in (0, 100, len(whole) - 1):
        room = np.zeros(max(capacity, 1), dtype=np.uint8)
        assert crop_decode._add_restarts(source.ctypes.data, source.size, 2, room.ctypes.data, capacity) == 0
    room = np.zeros(len(whole), dtype=np.uint8)
    assert crop_decode._add_restarts(source.ctypes.data, source.size, 2, room.ctypes.data, len(whole)) == len(whole)
    assert room.tobytes() == whole


@pytest.mark.parametrize("subsampling", [2, 1])
def test_restart_windows_with_edges_on_and_beside_mcu_boundaries_are_exact(subsampling):
    """Where a window's edge meets an interval's edge, chroma upsampling needs its neighbour from the file:
    every window edge from 2 px before to 2 px after an MCU boundary, and the image's own edges."""
    import itertools

    rng = np.random.default_rng(13)
    height, width = 161, 243
    pixels = photo(rng, height, width)
    plain, marked = encode(pixels, subsampling=subsampling), encode(pixels, subsampling=subsampling,
                                                                    restart_marker_blocks=1)
    reference = full_decode(marked, height, width)
    offsets = [0, 1, 2, 14, 15, 16, 17, 18, 30, 31, 32, 33, 34]
    for left, top in itertools.product(offsets, repeat=2):
        for crop_w, crop_h in ((1, 1), (2, 3), (13, 17), (width - left, height - top)):
            out, _ = decode_window(marked, height, width, top, left, crop_h, crop_w)
            np.testing.assert_array_equal(out, reference[top:top + crop_h, left:left + crop_w],
                                          err_msg=f"window {(top, left, crop_h, crop_w)}")
            expected, _ = decode_window(plain, height, width, top, left, crop_h, crop_w, (4, 4), max_denom=8)
            scaled, _ = decode_window(marked, height, width, top, left, crop_h, crop_w, (4, 4), max_denom=8)
            np.testing.assert_array_equal(scaled, expected, err_msg=f"window {(top, left, crop_h, crop_w)} scaled")
