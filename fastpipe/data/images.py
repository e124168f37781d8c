"""Decode one image file the way the converter does: format sniffed from its bytes, EXIF orientation
applied, any mode (16-bit, palette, CMYK, grayscale) turned into uint8 RGB. The converter and the torch
baseline loader both read images through here, so they see the same pixels.
"""
from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps


class BadImage(ValueError):
    """A file that cannot become a clean RGB sample; the message is the reason shown to the user."""


# EXIF orientations 5-8 include a 90-degree turn, which swaps width and height.
EXIF_ORIENTATION = 0x0112
SWAPS_AXES = {5, 6, 7, 8}
SNIFF_BYTES = 16


IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm"})


def sniff_format(head: bytes) -> str | None:
    """PIL format name from the first bytes of a file; the extension is not trusted (ImageNet has
    PNG data in .JPEG files)."""
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if head.startswith(b"BM"):
        return "BMP"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "TIFF"
    if len(head) > 2 and head[0:1] == b"P" and head[1:2] in b"123456" and head[2:3].isspace():
        return "PPM"
    return None


def open_image(path) -> Image.Image:
    """A path, or a sample inside an archive (anything with `read_bytes()`, such as convert.members.Member)."""
    opened = path
    try:
        if isinstance(path, (str, os.PathLike)):
            with open(path, "rb") as handle:
                head = handle.read(SNIFF_BYTES)
        else:
            data = path.read_bytes()
            head, opened = data[:SNIFF_BYTES], io.BytesIO(data)
    except OSError as err:
        raise BadImage(f"cannot read file ({err.strerror or err})") from err
    if not head:
        raise BadImage("empty file (0 bytes)")
    fmt = sniff_format(head)
    if fmt is None:
        raise BadImage(f"not an image: unknown content starting with {head[:8]!r}")
    try:
        return Image.open(opened, formats=[fmt])
    except Image.DecompressionBombError as err:
        raise BadImage(f"image too large to decode safely ({err})") from err
    except (OSError, SyntaxError, ValueError) as err:
        raise BadImage(f"truncated or unreadable {fmt} header ({err})") from err


def _orientation(image: Image.Image) -> int:
    return image.getexif().get(EXIF_ORIENTATION, 1)


def oriented_size(image: Image.Image) -> tuple[int, int]:
    width, height = image.size
    return (height, width) if _orientation(image) in SWAPS_AXES else (width, height)


def to_rgb_array(image: Image.Image) -> np.ndarray:
    mode = image.mode
    if mode.startswith("I;16") or mode == "I":
        # 16-bit grayscale: PIL's convert('RGB') clips instead of scaling, so keep the high byte here.
        array = np.asarray(image).astype(np.int64)
        if mode != "I" or array.max() > 255:
            array = array >> 8
        return np.repeat(np.clip(array, 0, 255).astype(np.uint8)[..., None], 3, axis=2)
    if mode == "F":
        array = np.clip(np.asarray(image), 0, 255).astype(np.uint8)
        return np.repeat(array[..., None], 3, axis=2)
    if mode in ("P", "PA") and ("transparency" in image.info or mode == "PA"):
        image = image.convert("RGBA")
    try:
        array = np.asarray(image if mode == "RGB" else image.convert("RGB"))
    except (ValueError, OSError) as err:
        raise BadImage(f"cannot convert mode {mode} to RGB ({err})") from err
    return np.ascontiguousarray(array, dtype=np.uint8)


def decode_rgb(path: str | Path, draft: tuple[int, int] | None = None) -> np.ndarray:
    """The image as a uint8 HxWx3 RGB array, EXIF orientation applied. `draft` (width, height, as
    displayed) lets JPEGs decode at a DCT scale that is still at least that size. Raises BadImage."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with open_image(Path(path)) as image:
            return decode_opened(image, draft)


def decode_opened(image: Image.Image, draft: tuple[int, int] | None = None) -> np.ndarray:
    """`decode_rgb` for an image `open_image` already opened (so its header is read once)."""
    if draft is not None and image.format == "JPEG":
        swapped = _orientation(image) in SWAPS_AXES
        image.draft("RGB", draft[::-1] if swapped else draft)
    fmt = image.format
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            image.load()
            if _orientation(image) != 1:
                image = ImageOps.exif_transpose(image)
            return np.require(to_rgb_array(image), requirements="W")   # PIL gives read-only arrays
        except BadImage:
            raise
        except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, struct.error...
            raise BadImage(f"corrupt or truncated {fmt} data ({err})") from err
