"""Per-sample names, labels and stored sizes of a split, beside the manifest rather than in it.

At ImageNet scale a list of [name, label] pairs in manifest.json is ~90 MB of JSON that every loader process
parsed into ~1.3M Python objects. The manifest now names two files per split: `<split>.samples.npy`, one
fixed-size row per sample (label, the name's byte range, width, height), memory-mapped by whoever reads it,
and `<split>.names.bin`, the names as NUL-separated UTF-8, read only by what needs paths (the torch baseline,
predictions.csv). Manifests of earlier releases, with the list inline, keep loading. A name that is not UTF-8
(a file name in another encoding) keeps its bytes: it reads back as Python's surrogate-escaped str, which opens
the same file.
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from fastpipe.data.beton import BetonError, atomic_write, convert_hint, read_manifest, sha256_file, split_info

ROW = np.dtype([("label", "<i8"), ("name_start", "<i8"), ("name_end", "<i8"), ("width", "<i4"), ("height", "<i4")])


def write_sample_table(out: str | os.PathLike, split: str, names: list[str] | None, labels, widths=None,
                       heights=None) -> dict:
    """Write OUT/<split>.samples.npy (and .names.bin unless `names` is None: adopted betons, whose samples
    are named `<beton>#<index>`) atomically; returns the manifest's `sample_table` entry."""
    out = Path(out)
    labels = np.asarray(labels, dtype=np.int64)
    rows = np.zeros(len(labels), dtype=ROW)
    rows["label"] = labels
    rows["width"] = 0 if widths is None else widths
    rows["height"] = 0 if heights is None else heights
    entry = {"rows": f"{split}.samples.npy", "count": len(labels), "names": None}
    if names is not None:
        encoded = [name.encode(errors="surrogateescape") for name in names]   # a non-UTF-8 file name's bytes kept
        lengths = np.fromiter((len(name) + 1 for name in encoded), dtype=np.int64, count=len(encoded))
        rows["name_end"] = np.cumsum(lengths) - 1
        rows["name_start"] = rows["name_end"] - (lengths - 1)
        payload = b"".join(name + b"\0" for name in encoded)
        with atomic_write(out / f"{split}.names.bin", "wb") as handle:
            handle.write(payload)
        entry["names"], entry["names_sha256"] = f"{split}.names.bin", hashlib.sha256(payload).hexdigest()
    with atomic_write(out / entry["rows"], "wb") as handle:
        np.save(handle, rows)
    entry["rows_sha256"] = sha256_file(out / entry["rows"])   # verify compares both
    return entry


class SampleTable:
    """One split's samples as the manifest describes them: `labels` (memory-mapped), `names()` (read on
    demand), `pairs()` ([name, label] lists, as earlier manifests held them)."""

    def __init__(self, data_dir: str | os.PathLike, manifest: dict, split: str):
        self.data_dir, self.split = Path(data_dir), split
        info = split_info(manifest, split, data_dir)
        self.beton = info.get("beton", f"{split}.beton")
        self.inline = info.get("samples")   # an earlier release's manifest
        if self.inline is not None:
            self.labels = np.fromiter((label for _, label in self.inline), dtype=np.int64, count=len(self.inline))
            return
        if "sample_table" not in info:
            raise BetonError(f"The manifest in {data_dir} lists no samples for '{split}'. {convert_hint(data_dir)}")
        self.entry = info["sample_table"]
        path = self.data_dir / self.entry["rows"]
        try:
            self.rows = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as err:
            raise BetonError(f"{path} (the per-sample table the manifest names) is missing or unreadable ({err}). "
                             f"Re-create it with `python -m convert ... --out {data_dir} --force`.") from err
        if self.rows.dtype != ROW:
            raise BetonError(f"{path} is not a per-sample table of this release (rows of {self.rows.dtype}). "
                             f"Re-create it with `python -m convert ... --force`.")
        if len(self.rows) != self.entry["count"]:
            raise BetonError(f"{path} does not match the manifest ({len(self.rows)} rows, manifest says "
                             f"{self.entry['count']}). Re-create it with `python -m convert ... --force`.")
        self.labels = self.rows["label"]

    def __len__(self) -> int:
        return len(self.labels)

    def names(self) -> list[str]:
        return [name for chunk in self.iter_names(max(len(self), 1)) for name in chunk]

    def iter_names(self, chunk: int = 65536) -> Iterator[list[str]]:
        """The names in order, `chunk` at a time: names.bin is read as a stream, so no list of every name is
        built (predictions.csv at any size)."""
        if self.inline is not None or self.entry["names"] is None:
            for start in range(0, len(self), chunk):
                stop = min(start + chunk, len(self))
                yield ([name for name, _ in self.inline[start:stop]] if self.inline is not None
                       else [f"{self.beton}#{index}" for index in range(start, stop)])
            return
        path, pending, count, tail = self.names_path(), [], 0, b""
        with open(path, "rb") as handle:
            while block := handle.read(1 << 20):
                *done, tail = (tail + block).split(b"\0")
                pending.extend(name.decode(errors="surrogateescape") for name in done)
                while len(pending) >= chunk:
                    count += chunk
                    yield pending[:chunk]
                    del pending[:chunk]
        count += len(pending)
        if tail or count != len(self):
            raise BetonError(f"{path} holds {count} names for {len(self)} samples. "
                             f"Re-create it with `python -m convert ... --force`.")
        if pending:
            yield pending

    def name(self, index: int) -> str:
        """One sample's name (a seek into names.bin: for messages, not for loops)."""
        path = self.names_path()
        if path is None:
            return self.inline[index][0] if self.inline is not None else f"{self.beton}#{index}"
        start, end = int(self.rows["name_start"][index]), int(self.rows["name_end"][index])
        with open(path, "rb") as handle:
            handle.seek(start)
            return handle.read(end - start).decode(errors="surrogateescape")

    def check(self) -> None:
        """For verify: the table's files have the checksums the manifest recorded (tables of earlier releases
        have none), and names.bin holds one name per row, each where its row says. A BetonError otherwise."""
        if self.inline is not None:
            return
        names = self.names_path()   # a clear error when it is gone
        for key, path in (("rows_sha256", self.data_dir / self.entry["rows"]), ("names_sha256", names)):
            if self.entry.get(key) and sha256_file(path) != self.entry[key]:
                raise BetonError(f"{path}: sha256 differs from the manifest; the file changed after conversion. "
                                 f"Re-create it with `python -m convert ... --force`.")
        if names is None:
            return
        offset, position = 0, 0   # rows checked, bytes of names.bin read
        for chunk in self.iter_names():
            lengths = np.fromiter((len(name.encode(errors="surrogateescape")) for name in chunk), np.int64, len(chunk))
            ends = position + np.cumsum(lengths + 1) - 1   # each name's NUL
            rows = self.rows[offset:offset + len(chunk)]
            if not (np.array_equal(rows["name_end"], ends) and np.array_equal(rows["name_start"], ends - lengths)):
                raise BetonError(f"{names}: the names do not sit where {self.entry['rows']} says (from sample "
                                 f"{offset} on). Re-create it with `python -m convert ... --force`.")
            offset, position = offset + len(chunk), int(ends[-1]) + 1

    def names_path(self) -> Path | None:
        """names.bin when the split has one (it must exist then: a clear error says how to re-create it)."""
        if self.inline is not None or self.entry["names"] is None:
            return None
        path = self.data_dir / self.entry["names"]
        if not path.is_file():
            raise BetonError(f"{path} (the sample names the manifest names) is missing. Re-create it with "
                             f"`python -m convert ... --out {self.data_dir} --force`.")
        return path

    def pairs(self) -> list[list]:
        return [[name, int(label)] for name, label in zip(self.names(), self.labels)]


def split_samples(data_dir: str | os.PathLike, split: str, manifest: dict | None = None) -> list[list]:
    """[name, label] per sample of `split` (reads every name: for tools and tests, not for loaders)."""
    return SampleTable(data_dir, manifest or read_manifest(data_dir), split).pairs()
