"""Decode and clean one source image before FFCV sees it.

FFCV's writer workers hang the whole write on a single exception, so every file is sniffed, decoded
with PIL, turned into a uint8 HxWx3 array and capped in resolution here; bad files raise `BadImage`.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import cv2
import numpy as np

from fastpipe.data.images import (  # noqa: F401  (BadImage and sniff_format are part of this module's API)
    BadImage,
    decode_opened,
    open_image,
    oriented_size,
    sniff_format,
    to_rgb_array,
)


@dataclass(frozen=True)
class ImageCheck:
    """What the cheap check learned about a good file: its size as stored in the beton."""
    width: int
    height: int
    source_width: int
    source_height: int


def capped_size(width: int, height: int, max_resolution: int | None) -> tuple[int, int]:
    """Size after scaling so that the longest side is at most `max_resolution` (never upscales)."""
    longest = max(width, height)
    if not max_resolution or longest <= max_resolution:
        return width, height
    scale = max_resolution / longest
    return max(1, round(width * scale)), max(1, round(height * scale))


def _check_size(width: int, height: int, max_resolution: int | None, min_side: int) -> tuple[int, int]:
    stored = capped_size(width, height, max_resolution)
    if min(stored) < min_side:
        raise BadImage(f"too small: {width}x{height} px is {stored[0]}x{stored[1]} after capping at "
                       f"{max_resolution} px; the shorter side must be >= {min_side} px (--min-side) "
                       f"so that loader crops are never empty")
    return stored


def check_image(path, max_resolution: int | None, min_side: int = 1) -> ImageCheck:
    """Cheap full check: decode every byte (JPEGs at 1/8 scale, which still reads all entropy-coded
    data, so truncation shows) and return the stored size. `path`: a file, or an archive member
    (convert.members.Member). Raises BadImage with the reason."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        image = open_image(path)
        with image:
            width, height = oriented_size(image)
            stored = _check_size(width, height, max_resolution, min_side)
            if image.format == "JPEG":
                image.draft("RGB", (1, 1))
            try:
                image.load()
                to_rgb_array(image)
            except BadImage:
                raise
            except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, struct.error...
                raise BadImage(f"corrupt or truncated {image.format} data ({err})") from err
    return ImageCheck(stored[0], stored[1], width, height)


def load_image(path, max_resolution: int | None, min_side: int = 1) -> np.ndarray:
    """Decode to a clean uint8 HxWx3 array: EXIF rotation applied, any mode converted to RGB, longest
    side capped at `max_resolution` (area interpolation). `path`: a file or an archive member. Raises
    BadImage with the reason."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with open_image(path) as image:
            width, height = oriented_size(image)
            target = _check_size(width, height, max_resolution, min_side)
            # a JPEG larger than the target decodes at a DCT scale: much faster, still >= the target size
            array = decode_opened(image, draft=target if target != (width, height) else None)
    if (array.shape[1], array.shape[0]) != target:
        array = cv2.resize(array, target, interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(array)
