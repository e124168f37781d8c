"""Every awkward input file either becomes a clean uint8 HxWx3 array or is rejected with a reason."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import gradient, write_bad_images
from PIL import Image

from convert.validate import BadImage, capped_size, check_image, load_image, sniff_format

MAX_RESOLUTION, MIN_SIDE = 96, 8


@pytest.fixture(scope="module")
def bad_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad")
    return folder, write_bad_images(folder)


def test_every_case_is_either_loaded_clean_or_rejected_with_its_reason(bad_folder):
    folder, expected = bad_folder
    for name, reason in expected.items():
        path = folder / name
        if reason is None:
            check = check_image(path, MAX_RESOLUTION, MIN_SIDE)
            image = load_image(path, MAX_RESOLUTION, MIN_SIDE)
            assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3, name
            assert image.flags["C_CONTIGUOUS"], name
            assert (image.shape[1], image.shape[0]) == (check.width, check.height), name
            assert max(image.shape[:2]) <= MAX_RESOLUTION, name
        else:
            for function in (check_image, load_image):
                with pytest.raises(BadImage, match=reason):
                    function(path, MAX_RESOLUTION, MIN_SIDE)


def test_format_is_sniffed_from_bytes_not_extension(bad_folder):
    folder, _ = bad_folder
    assert sniff_format((folder / "png_data.JPEG").read_bytes()[:16]) == "PNG"
    assert sniff_format((folder / "cmyk.jpg").read_bytes()[:16]) == "JPEG"
    assert sniff_format(b"hello world, not an image") is None
    original = np.asarray(Image.open(folder / "png_data.JPEG").convert("RGB"))
    assert np.array_equal(load_image(folder / "png_data.JPEG", None), original)


def test_exif_rotation_is_applied(bad_folder):
    folder, _ = bad_folder
    image = load_image(folder / "exif_rotated.jpg", None)
    source = gradient(60, 40)
    assert image.shape == (60, 40, 3)                  # 60x40 stored, displayed rotated 90 degrees
    expected = np.rot90(source, k=-1)                  # orientation 6: rotate clockwise
    assert np.abs(image.astype(int) - expected.astype(int)).mean() < 4


def test_sixteen_bit_png_is_scaled_not_clipped(bad_folder):
    folder, _ = bad_folder
    image = load_image(folder / "deep16.png", None)
    expected = gradient(60, 40)[..., 0]
    assert np.array_equal(image[..., 0], expected)
    assert np.array_equal(image[..., 0], image[..., 2])


def test_grayscale_and_cmyk_become_three_channel_rgb(bad_folder):
    folder, _ = bad_folder
    gray = load_image(folder / "gray.jpg", None)
    assert np.array_equal(gray[..., 0], gray[..., 1]) and np.array_equal(gray[..., 1], gray[..., 2])
    cmyk = load_image(folder / "cmyk.jpg", None)
    assert np.abs(cmyk.astype(int) - gradient(60, 40).astype(int)).mean() < 8


def test_resolution_is_capped_on_the_longest_side_keeping_the_aspect_ratio(tmp_path):
    path = tmp_path / "big.jpg"
    Image.fromarray(gradient(400, 300)).save(path, quality=95)
    image = load_image(path, 100)
    assert image.shape == (75, 100, 3)
    assert capped_size(400, 300, 100) == (100, 75)
    assert capped_size(50, 30, 100) == (50, 30)        # never upscales
    assert capped_size(5000, 1, 100) == (100, 1)       # never rounds a side to zero
    small = load_image(path, None)
    resized = np.asarray(Image.fromarray(small).resize((100, 75), Image.BILINEAR))
    assert np.abs(image.astype(int) - resized.astype(int)).mean() < 4


def test_missing_file_is_a_bad_image_not_a_crash(tmp_path):
    with pytest.raises(BadImage, match="cannot read"):
        check_image(tmp_path / "nope.jpg", 96)
