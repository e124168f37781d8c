"""The native crop decoder (`_cropdecode.cpp`) seen from Python and numba: decode only a JPEG's crop
window, at the largest DCT scale that keeps it at least the output size, then a cheap resize; raw pixels
get the same crop + resize. `available()` says whether the library loaded; without it FFCV's stock
decoder runs and MISSING says why.
"""
from __future__ import annotations

import ctypes
import importlib.util
from ctypes import c_int, c_uint, c_uint64, c_void_p
from importlib import metadata

import numpy as np

COUNTERS = ("samples", "decoded_pixels", "stored_pixels", "output_pixels", "full_decodes",
            "scaled_decodes", "failures", "restart_decodes", "entropy_bytes", "entropy_bytes_read")
MAX_DENOM = 8   # DCT scales 1/1, 1/2, 1/4, 1/8
FUNCTIONS = ("fp_decode_crop", "fp_crop_resize", "fp_scale_denom", "fp_read_counters", "fp_reset_counters",
             "fp_mcus_per_row", "fp_add_restarts", "fp_entropy_only", "fp_scan_intervals")
# The wheel is built to the manylinux_2_35 policy (make wheelhouse): glibc >= 2.35, libstdc++ of GCC >= 12.
REQUIREMENT = "glibc >= 2.35 and libstdc++ with GLIBCXX_3.4.30 (GCC 12 or newer), as on Debian 12 or Ubuntu 22.04+"
NOT_BUILT = ("the native crop decoder (fastpipe/data/_cropdecode) was not built: install the headers with "
             "`make sysdeps` (libjpeg-dev, libopencv-dev), then `pip install --no-build-isolation -e .`, or install "
             "fastpipe from the wheelhouse (README, 'GPU box, offline')")


def _candidates() -> list[str]:
    """This source tree's library (an editable install), then the installed wheel's: running from a copy of
    the repository with fastpipe installed from the wheelhouse imports this tree's Python code, whose folder
    holds no compiled library."""
    found = []
    spec = importlib.util.find_spec("fastpipe.data._cropdecode")
    if spec is not None and spec.origin:
        found.append(spec.origin)
    try:
        files = metadata.distribution("fastpipe").files or []
    except metadata.PackageNotFoundError:
        files = []
    found += [str(file.locate()) for file in files if file.name.startswith("_cropdecode") and file.suffix == ".so"]
    return list(dict.fromkeys(found))


def _load() -> tuple[ctypes.CDLL | None, str]:
    """(library, "") or (None, why it is missing: not built, or which system requirement the load failed on)."""
    errors = []
    for path in _candidates():
        try:
            library = ctypes.CDLL(path)
            for name in FUNCTIONS:   # another release's library lacks a function: try the next one
                getattr(library, name)
            return library, ""
        except (OSError, AttributeError) as exc:
            errors.append(f"{path}: {exc}")
    if not errors:
        return None, NOT_BUILT
    needs = f"; it needs {REQUIREMENT}" if any("GLIBC" in error for error in errors) else ""
    return None, "the native crop decoder could not be loaded (" + "; ".join(errors) + ")" + needs


_lib, MISSING = _load()


def available() -> bool:
    return _lib is not None


def _bind(name, argtypes, restype):
    if _lib is None:
        return None
    function = getattr(_lib, name)
    function.argtypes, function.restype = argtypes, restype
    return function


_decode_crop = _bind("fp_decode_crop", [c_void_p, c_uint64] + [c_uint] * 6 + [c_void_p, c_uint, c_uint, c_int, c_uint],
                     c_int)
_crop_resize = _bind("fp_crop_resize", [c_void_p] + [c_uint] * 6 + [c_void_p, c_uint, c_uint, c_int], c_int)
_scale_denom = _bind("fp_scale_denom", [c_uint] * 5, c_uint)
_read_counters = _bind("fp_read_counters", [c_void_p], None)
_reset_counters = _bind("fp_reset_counters", [], None)
_entropy_only = _bind("fp_entropy_only", [c_void_p, c_uint64] + [c_uint] * 9, c_int)
_scan_intervals = _bind("fp_scan_intervals", [c_void_p, c_uint64], c_uint)
_mcus_per_row = _bind("fp_mcus_per_row", [c_void_p, c_uint64], c_uint)
_add_restarts = _bind("fp_add_restarts", [c_void_p, c_uint64, c_uint, c_void_p, c_uint64], ctypes.c_int64)


# numba compiles these (FFCV's Compiler.compile) into calls of the C functions, without the GIL.
def decode_crop(source, height, width, top, left, crop_h, crop_w, destination, flip, max_denom):
    """JPEG bytes -> the crop resized into destination (H, W, 3); returns the DCT scale denominator used,
    negative when libjpeg rejects the file (destination zeroed)."""
    return _decode_crop(source.ctypes.data, source.size, height, width, top, left, crop_h, crop_w,
                        destination.ctypes.data, destination.shape[0], destination.shape[1], flip, max_denom)


def entropy_only(source, height, width, top, left, crop_h, crop_w, out_h, out_w, max_denom=MAX_DENOM) -> int:
    """Benchmarks: only the Huffman decoding decode_crop does for this crop (restart intervals or the whole
    file); 1 after intervals, 2 after the whole file."""
    return int(_entropy_only(source.ctypes.data, source.size, height, width, top, left, crop_h, crop_w,
                             out_h, out_w, max_denom))


def scan_intervals(source) -> int:
    """Benchmarks: how many restart intervals the decoder finds in a JPEG (0: none it can use)."""
    return int(_scan_intervals(source.ctypes.data, source.size))


def crop_resize(pixels, top, left, crop_h, crop_w, destination, flip):
    """Raw (H, W, 3) pixels -> the crop resized into destination."""
    return _crop_resize(pixels.ctypes.data, pixels.shape[0], pixels.shape[1], top, left, crop_h, crop_w,
                        destination.ctypes.data, destination.shape[0], destination.shape[1], flip)


def scale_denom(crop_h: int, crop_w: int, out_h: int, out_w: int, max_denom: int = MAX_DENOM) -> int:
    return int(_scale_denom(crop_h, crop_w, out_h, out_w, max_denom))


def read_counters() -> dict[str, int]:
    """Work done since the last reset, summed over threads (stays zero without the library)."""
    values = np.zeros(len(COUNTERS), dtype=np.uint64)
    if _lib is not None:
        _read_counters(values.ctypes.data)
    return dict(zip(COUNTERS, (int(value) for value in values)))


def reset_counters() -> None:
    if _lib is not None:
        _reset_counters()


def mcus_per_row(jpeg: bytes) -> int:
    """MCUs in a row of a single-scan sequential JPEG; 0 for any other file (progressive, cut, not a JPEG)."""
    buffer = np.frombuffer(jpeg, dtype=np.uint8)
    return int(_mcus_per_row(buffer.ctypes.data, buffer.size))


def add_restarts(jpeg: bytes, interval: int) -> bytes | None:
    """The same JPEG with a restart marker every `interval` MCUs, rewritten losslessly (coefficients copied,
    Huffman tables fitted to the file); None when libjpeg rejects the file."""
    source = np.frombuffer(jpeg, dtype=np.uint8)
    capacity = 2 * len(jpeg) + 65536
    while True:
        out = np.empty(capacity, dtype=np.uint8)
        written = int(_add_restarts(source.ctypes.data, source.size, interval, out.ctypes.data, capacity))
        if written < 0:
            return None
        if written > 0:
            return out[:written].tobytes()
        capacity *= 2
