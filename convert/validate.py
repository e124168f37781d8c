"""Decode and clean one source image before FFCV sees it.

FFCV's writer workers hang the whole write on a single exception, so every file is sniffed, decoded
with PIL, turned into a uint8 HxWx3 array and capped in resolution here; bad files raise `BadImage`.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageOps

# EXIF orientations 5-8 include a 90-degree turn, which swaps width and height.
EXIF_ORIENTATION = 0x0112
SWAPS_AXES = {5, 6, 7, 8}
SNIFF_BYTES = 16


class BadImage(ValueError):
    """A file that cannot become a clean RGB sample; the message is the reason shown to the user."""


@dataclass(frozen=True)
class ImageCheck:
    """What the cheap check learned about a good file: its size as stored in the beton."""
    width: int
    height: int
    source_width: int
    source_height: int


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


def capped_size(width: int, height: int, max_resolution: int | None) -> tuple[int, int]:
    """Size after scaling so that the longest side is at most `max_resolution` (never upscales)."""
    longest = max(width, height)
    if not max_resolution or longest <= max_resolution:
        return width, height
    scale = max_resolution / longest
    return max(1, round(width * scale)), max(1, round(height * scale))


def _open(path: Path) -> Image.Image:
    try:
        with open(path, "rb") as handle:
            head = handle.read(SNIFF_BYTES)
    except OSError as err:
        raise BadImage(f"cannot read file ({err.strerror or err})") from err
    if not head:
        raise BadImage("empty file (0 bytes)")
    fmt = sniff_format(head)
    if fmt is None:
        raise BadImage(f"not an image: unknown content starting with {head[:8]!r}")
    try:
        return Image.open(path, formats=[fmt])
    except Image.DecompressionBombError as err:
        raise BadImage(f"image too large to decode safely ({err})") from err
    except (OSError, SyntaxError, ValueError) as err:
        raise BadImage(f"truncated or unreadable {fmt} header ({err})") from err


def _orientation(image: Image.Image) -> int:
    return image.getexif().get(EXIF_ORIENTATION, 1)


def _oriented_size(image: Image.Image) -> tuple[int, int]:
    width, height = image.size
    return (height, width) if _orientation(image) in SWAPS_AXES else (width, height)


def _check_size(width: int, height: int, max_resolution: int | None, min_side: int) -> tuple[int, int]:
    stored = capped_size(width, height, max_resolution)
    if min(stored) < min_side:
        raise BadImage(f"too small: {width}x{height} px is {stored[0]}x{stored[1]} after capping at "
                       f"{max_resolution} px; the shorter side must be >= {min_side} px (--min-side) "
                       f"so that loader crops are never empty")
    return stored


def _to_rgb_array(image: Image.Image) -> np.ndarray:
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


def check_image(path: str | Path, max_resolution: int | None, min_side: int = 1) -> ImageCheck:
    """Cheap full check: decode every byte (JPEGs at 1/8 scale, which still reads all entropy-coded
    data, so truncation shows) and return the stored size. Raises BadImage with the reason."""
    path = Path(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        image = _open(path)
        with image:
            width, height = _oriented_size(image)
            stored = _check_size(width, height, max_resolution, min_side)
            if image.format == "JPEG":
                image.draft("RGB", (1, 1))
            try:
                image.load()
                _to_rgb_array(image)
            except BadImage:
                raise
            except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, struct.error...
                raise BadImage(f"corrupt or truncated {image.format} data ({err})") from err
    return ImageCheck(stored[0], stored[1], width, height)


def load_image(path: str | Path, max_resolution: int | None, min_side: int = 1) -> np.ndarray:
    """Decode to a clean uint8 HxWx3 array: EXIF rotation applied, any mode converted to RGB, longest
    side capped at `max_resolution` (area interpolation). Raises BadImage with the reason."""
    path = Path(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        image = _open(path)
        with image:
            width, height = _oriented_size(image)
            target = _check_size(width, height, max_resolution, min_side)
            if image.format == "JPEG" and target != (width, height):
                # DCT-domain downscaling: much faster, and the result is still >= the target size.
                swapped = image.size != (width, height)
                image.draft("RGB", target[::-1] if swapped else target)
            fmt = image.format
            try:
                image.load()
                if _orientation(image) != 1:
                    image = ImageOps.exif_transpose(image)
                array = _to_rgb_array(image)
            except BadImage:
                raise
            except Exception as err:
                raise BadImage(f"corrupt or truncated {fmt} data ({err})") from err
    if (array.shape[1], array.shape[0]) != target:
        array = cv2.resize(array, target, interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(array)
