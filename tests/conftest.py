"""Shared session fixtures: a small synthetic ImageFolder, its converted betons, and bad-file makers.

`synthetic_folder`: SRC/train and SRC/val, 4 classes x (24 train + 8 val) JPEGs of 64-128 px.
`betons`: the converter's output for it (longest side 96 px: fine for loaders at 32-64 px, val
centre crops included); train is stored 'proportion' (half JPEG, half raw) so loaders meet both
storage modes, val raw.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from rich.console import Console

SYNTHETIC_CLASSES = 4
SYNTHETIC_TRAIN_PER_CLASS = 24
SYNTHETIC_VAL_PER_CLASS = 8
BETON_MAX_RESOLUTION = 96


@pytest.fixture(scope="session")
def quiet_console() -> Console:
    return Console(quiet=True)


@pytest.fixture(scope="session")
def synthetic_folder(tmp_path_factory) -> Path:
    from convert.synthetic import make_synthetic

    root = tmp_path_factory.mktemp("synthetic")
    make_synthetic(root, classes=SYNTHETIC_CLASSES, per_class=SYNTHETIC_TRAIN_PER_CLASS,
                   val_per_class=SYNTHETIC_VAL_PER_CLASS, min_side=64, max_side=128, seed=0, workers=1)
    return root


@pytest.fixture(scope="session")
def betons(synthetic_folder, tmp_path_factory, quiet_console) -> Path:
    from convert.pipeline import convert_source
    from convert.sources import find_samples
    from convert.write import WriteSettings

    out = tmp_path_factory.mktemp("betons")
    train = WriteSettings(write_mode="proportion", max_resolution=BETON_MAX_RESOLUTION, compress_probability=0.5)
    val = WriteSettings(write_mode="raw", max_resolution=BETON_MAX_RESOLUTION)
    convert_source(find_samples(synthetic_folder), out, train, val, workers=2, console=quiet_console)
    return out


def jpeg_bytes(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=95, **options)
    return buffer.getvalue()


def gradient(width: int, height: int) -> np.ndarray:
    """An RGB image with distinct, smooth content in every region (so rotations are detectable)."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([255 * x // max(width - 1, 1), 255 * y // max(height - 1, 1),
                     np.full_like(x, 90)], axis=-1).astype(np.uint8)


def write_bad_images(folder: Path) -> dict[str, str | None]:
    """Write one file per awkward case into `folder`. Returns {file name: None if it must be written,
    else a phrase its skip reason must contain}, assuming --max-resolution 96 and --min-side 8.
    Hidden and non-image files are written too but are not in the result: they must be ignored."""
    folder.mkdir(parents=True, exist_ok=True)
    rgb = Image.fromarray(gradient(60, 40))
    expected: dict[str, str | None] = {}

    def put(name: str, data: bytes, expectation: str | None) -> None:
        (folder / name).write_bytes(data)
        expected[name] = expectation

    def save(name: str, image: Image.Image, fmt: str, expectation: str | None = None, **options) -> None:
        buffer = io.BytesIO()
        image.save(buffer, fmt, **options)
        put(name, buffer.getvalue(), expectation)

    whole = jpeg_bytes(rgb)
    noisy = jpeg_bytes(Image.fromarray(np.random.default_rng(0).integers(0, 256, (150, 200, 3), dtype=np.uint8)))
    put("truncated.jpg", noisy[: len(noisy) // 2], "truncated")        # cut inside the image data
    put("truncated_header.jpg", whole[:100], "truncated")
    put("empty.jpg", b"", "empty file")
    put("garbage.JPEG", b"this is not an image, just text\n" * 4, "not an image")
    save("png_data.JPEG", rgb, "PNG")
    save("cmyk.jpg", rgb.convert("CMYK"), "JPEG", quality=95)
    save("gray.jpg", rgb.convert("L"), "JPEG", quality=95)
    save("rgba.png", rgb.convert("RGBA"), "PNG")
    save("palette.png", rgb.convert("P", palette=Image.Palette.ADAPTIVE), "PNG")
    transparent = rgb.convert("P", palette=Image.Palette.ADAPTIVE)
    transparent.info["transparency"] = 0
    save("palette_transparent.gif", transparent, "GIF", transparency=0)
    deep = (gradient(60, 40)[..., 0].astype(np.uint16) * 257)
    save("deep16.png", Image.fromarray(deep), "PNG")
    exif = Image.Exif()
    exif[0x0112] = 6                                   # "rotate 90 degrees clockwise to display"
    put("exif_rotated.jpg", jpeg_bytes(rgb, exif=exif.tobytes()), None)
    save("wide.jpg", Image.fromarray(gradient(600, 60)), "JPEG", quality=95)
    save("sliver.jpg", Image.fromarray(gradient(2000, 10)), "JPEG", "too small", quality=95)
    save("one_pixel.png", Image.new("RGB", (1, 1), (200, 10, 10)), "PNG", "too small")
    for fmt, suffix in (("BMP", "bmp"), ("WEBP", "webp"), ("TIFF", "tif"), ("PPM", "ppm")):
        save(f"plain.{suffix}", rgb, fmt)
    # Ignored entirely: hidden files and folders, non-image extensions.
    (folder / ".hidden.jpg").write_bytes(whole)
    (folder / ".cache").mkdir(exist_ok=True)
    (folder / ".cache" / "thumb.jpg").write_bytes(whole)
    (folder / "notes.txt").write_text("not an image")
    (folder / "labels.csv").write_text("a,b\n")
    return expected


@pytest.fixture(scope="session")
def make_bad_images():
    return write_bad_images
