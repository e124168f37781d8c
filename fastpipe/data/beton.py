"""The contract between the converter and the loaders: manifest format and beton integrity checks.

FFCV's .beton has no magic number or checksum and its reader accepts a half-written file (then aborts
inside OpenCV), so every loader calls `check_beton` first. The checks here are cheap (header + size);
the full sha256 is only recomputed by `python -m convert verify`.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1
SPLITS = ("train", "val")

# Mirrors ffcv.types.HeaderType / ALLOC_TABLE_TYPE (ffcv 1.0.x, format version 2). Kept here so the
# integrity check needs only numpy and never imports ffcv (which compiles numba code on import).
BETON_HEADER = np.dtype(
    [("version", "<u2"), ("num_fields", "<u2"), ("page_size", "<u4"),
     ("num_samples", "<u8"), ("alloc_table_ptr", "<u8")], align=True)
ALLOC_ENTRY = np.dtype([("sample_id", "<u8"), ("ptr", "<u8"), ("size", "<u8")])
SUPPORTED_VERSIONS = (2,)


class BetonError(RuntimeError):
    """A beton or manifest is missing, truncated or inconsistent. The message says what to do."""


def convert_hint(data_dir: str | os.PathLike) -> str:
    return (f"Create it with `python -m convert folder IMAGE_FOLDER --out {data_dir}` "
            f"(or `python -m convert synthetic --out data/synthetic` for a stand-in data set).")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# What open() gives a new file under this process's umask; mkstemp's temporaries are 0600, and an output
# renamed from one would stay unreadable to other users (a serving process, a colleague). Read once at import:
# os.umask can only be read by setting it.
_UMASK = os.umask(0o022)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK


def fsync_file(path: str | os.PathLike) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def fsync_dir(directory: str | os.PathLike) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w"):
    """Open a temporary file beside `path`; on success fsync it and rename it over `path`.

    An interrupted write never leaves a file under the final name (betons, manifests, checkpoints).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | os.PathLike, payload: dict) -> None:
    with atomic_write(path) as handle:
        json.dump(payload, handle, indent=2, sort_keys=False)
        handle.write("\n")


def read_manifest(data_dir: str | os.PathLike) -> dict:
    """Load DIR/manifest.json, with an error that names the file and the convert command."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise BetonError(f"Data folder {data_dir} does not exist. {convert_hint(data_dir)}")
    path = data_dir / MANIFEST_NAME
    if not path.is_file():
        betons = sorted(p.name for p in data_dir.glob("*.beton"))
        if betons:
            raise BetonError(f"No manifest at {path}, but the folder holds {', '.join(betons)}: for betons FFCV "
                             f"wrote itself, create it with `python -m convert adopt {data_dir}` (add "
                             f"--classes FILE for class names, --train/--val for other file names).")
        raise BetonError(f"No manifest at {path}: this folder was not written by `python -m convert`. "
                         f"{convert_hint(data_dir)}")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BetonError(f"Manifest {path} is not valid JSON ({err}). Re-run the conversion with --force.") from err
    for key in ("classes", "splits"):
        if key not in manifest:
            raise BetonError(f"Manifest {path} has no '{key}' entry. Re-run the conversion with --force.")
    return manifest


def split_info(manifest: dict, split: str, data_dir: str | os.PathLike = "") -> dict:
    if split not in manifest["splits"]:
        known = ", ".join(sorted(manifest["splits"])) or "none"
        raise BetonError(f"Split '{split}' is not in the manifest of {data_dir} (it has: {known}).")
    return manifest["splits"][split]


def read_header(path: str | os.PathLike) -> np.void:
    with open(path, "rb") as handle:
        raw = handle.read(BETON_HEADER.itemsize)
    if len(raw) < BETON_HEADER.itemsize:
        raise BetonError(f"{path} is too short to be a beton ({len(raw)} bytes).")
    return np.frombuffer(raw, dtype=BETON_HEADER)[0]


def check_beton(data_dir: str | os.PathLike, split: str, manifest: dict | None = None) -> Path:
    """Cheap integrity check of DIR/<split>.beton against the manifest; returns the beton path.

    Checks existence, size on disk, the header's version and sample count, and that the allocation
    table (written last by FFCV) lies inside the file and ends exactly at its end.
    """
    data_dir = Path(data_dir)
    manifest = manifest or read_manifest(data_dir)
    info = split_info(manifest, split, data_dir)
    path = data_dir / info.get("beton", f"{split}.beton")
    if not path.is_file():
        raise BetonError(f"Missing beton {path} (listed in {data_dir / MANIFEST_NAME}). {convert_hint(data_dir)}")
    size = path.stat().st_size
    fix = f"Re-create it with `python -m convert ... --out {data_dir} --force`."
    if "size_bytes" in info and size != info["size_bytes"]:
        raise BetonError(f"{path} is {size} bytes but the manifest says {info['size_bytes']}: the file is "
                         f"truncated or was changed after conversion. {fix}")
    header = read_header(path)
    if int(header["version"]) not in SUPPORTED_VERSIONS:
        raise BetonError(f"{path} has beton format version {int(header['version'])}, expected "
                         f"{SUPPORTED_VERSIONS}; it is corrupt or from another FFCV release. {fix}")
    samples = int(header["num_samples"])
    if samples != info["written"]:
        raise BetonError(f"{path} holds {samples} samples but the manifest says {info['written']}. {fix}")
    check_allocation_table(path, header, size, fix)
    return path


def check_allocation_table(path: Path, header: np.void, size: int, fix: str) -> None:
    """FFCV writes the allocation table last, so it must lie inside the file and end exactly at its end."""
    table = int(header["alloc_table_ptr"])
    if not BETON_HEADER.itemsize <= table <= size or (size - table) % ALLOC_ENTRY.itemsize:
        raise BetonError(f"{path} has a corrupt header (allocation table at byte {table} of {size}): "
                         f"the write did not finish. {fix}")


# --- Raw sample access, for code that reads samples outside FFCV (DALI, verify, adopt) ---------------
# Mirrors ffcv.types.FieldDescType and RGBImageField/IntField metadata (ffcv 1.0.x), read with numpy
# alone for the same reason as BETON_HEADER above.
FIELD_DESC = np.dtype([("type_id", "<u1"), ("name", ("<u1", 16)), ("arguments", ("<u1", (1024,)))],
                      align=True)
IMAGE_METADATA = np.dtype([("mode", "<u1"), ("width", "<u2"), ("height", "<u2"), ("data_ptr", "<u8")])
IMAGE_FIELD, INT_FIELD = 2, 1           # ffcv type ids of RGBImageField and IntField
FIELD_METADATA = {IMAGE_FIELD: ("image", IMAGE_METADATA), INT_FIELD: ("label", np.dtype("<i8"))}
FIELD_CLASSES = {0: "FloatField", 1: "IntField", 2: "RGBImageField", 3: "BytesField", 4: "NDArrayField",
                 5: "JSONField", 255: "custom field"}
MODE_JPEG, MODE_RAW = 0, 1


def read_fields(path: str | os.PathLike, header: np.void | None = None) -> list[tuple[str, int]]:
    """(name, ffcv type id) of every field, in stored order."""
    header = read_header(path) if header is None else header
    fields = np.fromfile(path, dtype=FIELD_DESC, count=int(header["num_fields"]), offset=BETON_HEADER.itemsize)
    return [(bytes(f["name"]).rstrip(b"\0").decode("ascii", "replace"), int(f["type_id"])) for f in fields]


def describe_fields(fields: list[tuple[str, int]]) -> str:
    return ", ".join(f"'{name}' ({FIELD_CLASSES.get(kind, f'type {kind}')})" for name, kind in fields) or "none"


def by_pointer(pointers: np.ndarray, sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """An allocation table's pointer and size columns ordered by pointer (contiguous copies), sorted only
    when they are not in order already (FFCV's writer usually leaves them so)."""
    if np.any(pointers[1:] < pointers[:-1]):
        order = np.argsort(pointers)
        return pointers[order], sizes[order]
    return np.ascontiguousarray(pointers), np.ascontiguousarray(sizes)


class BetonSamples:
    """Per-sample access to a beton's stored image bytes and labels, through a read-only memory map.

    The layout is found by field type: one RGBImageField and one IntField, named anything, in either
    order (`field_names` maps "image"/"label" to the stored names). `encoded(i)` is the stored JPEG for
    jpg-mode samples and the raw HxWx3 RGB pixels otherwise (see `mode`).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        header = read_header(self.path)
        check_allocation_table(self.path, header, self.path.stat().st_size,
                               "Re-create it with `python -m convert ... --force`.")
        fields = read_fields(self.path, header)
        if sorted(kind for _, kind in fields) != [INT_FIELD, IMAGE_FIELD]:
            raise BetonError(f"{self.path} has fields {describe_fields(fields)}; fastpipe needs exactly one image "
                             f"field (RGBImageField) and one integer label field (IntField).")
        self.field_names = {FIELD_METADATA[kind][0]: name for name, kind in fields}
        metadata_type = np.dtype([FIELD_METADATA[kind] for _, kind in fields], align=True)
        self.num_samples = int(header["num_samples"])
        fields_end = BETON_HEADER.itemsize + len(fields) * FIELD_DESC.itemsize
        table_at = int(header["alloc_table_ptr"])
        if fields_end + self.num_samples * metadata_type.itemsize > table_at:
            raise BetonError(f"{self.path}: the header points inside the sample metadata (allocation table at "
                             f"byte {table_at}); the file is corrupt or unfinished.")
        metadata = np.fromfile(self.path, dtype=metadata_type, count=self.num_samples, offset=fields_end)
        table = np.fromfile(self.path, dtype=ALLOC_ENTRY, offset=table_at)
        self.mode = metadata["image"]["mode"].copy()
        self.width = metadata["image"]["width"].astype(np.int32)   # FFCV stores them as uint16
        self.height = metadata["image"]["height"].astype(np.int32)
        self.labels = metadata["label"].copy()
        self.offset = metadata["image"]["data_ptr"].astype(np.int64)
        del metadata
        # The allocation table maps each region's start to its size; images are looked up by start.
        starts, sizes = by_pointer(table["ptr"].astype(np.int64), table["size"].astype(np.int64))
        del table
        where = np.searchsorted(starts, self.offset)
        if self.num_samples and (where.max() >= len(starts) or (starts[where] != self.offset).any()):
            raise BetonError(f"{self.path}: an image pointer is missing from the allocation table; "
                             f"the file is corrupt. Re-create it with `python -m convert ... --force`.")
        self.size = sizes[where] if self.num_samples else np.zeros(0, np.int64)
        self.data = np.memmap(self.path, dtype=np.uint8, mode="r")
        if self.num_samples and int((self.offset + self.size).max()) > table_at:
            raise BetonError(f"{self.path}: sample data runs past the data region (truncated or corrupt).")

    def __len__(self) -> int:
        return self.num_samples

    def encoded(self, index: int) -> np.ndarray:
        start = self.offset[index]
        return self.data[start:start + self.size[index]]

    def is_raw(self, index: int) -> bool:
        return self.mode[index] == MODE_RAW
