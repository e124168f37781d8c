"""Hugging Face datasets' parquet shards: an image column ({bytes, path} structs, or plain binary) and an
integer label column; class names from the `huggingface` schema metadata (ClassLabel names) when present.

pyarrow reads them (`pip install 'fastpipe[parquet]'`). A sample is a `ParquetRow`; the converter's workers
read its bytes through a small per-process cache of row groups, since parquet is read by row group and the
workers take samples in order.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from convert.members import expand_pattern
from convert.sources import ConvertError, Source, class_names, split_by_label


def _pyarrow():
    try:
        import pyarrow.parquet as pq  # optional: only `convert parquet` needs it
    except ImportError as err:
        raise ConvertError("convert parquet needs pyarrow: `pip install 'fastpipe[parquet]'` (or `pip install "
                           "pyarrow`).") from err
    return pq


def _image_path(file: str, row_group: int, column: str, row: int) -> str | None:
    """The `path` of a {bytes, path} image cell (for the reason a cell without bytes is left out)."""
    values = _pyarrow().ParquetFile(file).read_row_group(row_group, columns=[column]).column(0).combine_chunks()
    return values.field("path")[row].as_py() if hasattr(values, "field") else None


@lru_cache(maxsize=2)   # per process: the workers read samples in order, a row group after another
def _row_group_images(file: str, row_group: int, column: str) -> list:
    table = _pyarrow().ParquetFile(file).read_row_group(row_group, columns=[column])
    values = table.column(0).combine_chunks()
    if hasattr(values, "field"):   # a struct column: {bytes, path}
        values = values.field("bytes")
    return values.to_pylist()


@dataclass(frozen=True, order=True)
class ParquetRow:
    """Row `row` of row group `row_group` of `file`; `name` is how the manifest and the bad-file report call it."""
    file: str
    row_group: int
    row: int
    column: str
    name: str

    def read_bytes(self) -> bytes:
        data = _row_group_images(self.file, self.row_group, self.column)[self.row]
        if data is None:
            path = _image_path(self.file, self.row_group, self.column, self.row)
            raise OSError(f"the image cell holds no bytes, only a path ({path}): images kept as files beside the "
                          f"parquet are not read; embed them (datasets' `cast_column(..., Image())` then "
                          f"`to_parquet`)" if path else "the image cell is empty")
        return data


def class_names_from_schema(schema, label_column: str) -> list[str] | None:
    """ClassLabel names from the `huggingface` metadata the datasets library writes, if any."""
    metadata = schema.metadata or {}
    raw = metadata.get(b"huggingface")
    if not raw:
        return None
    try:
        features = json.loads(raw)["info"]["features"]
        names = features[label_column].get("names")
    except (KeyError, TypeError, AttributeError, json.JSONDecodeError):
        return None
    return list(names) if names else None


def parquet_rows(paths: list[Path], image_column: str, label_column: str):
    """(rows, skipped, class names or None) over the files, in file and row order."""
    pq = _pyarrow()
    rows, skipped, names = [], [], None
    for path in paths:
        try:
            handle = pq.ParquetFile(path)
        except Exception as err:   # pyarrow raises ArrowInvalid, OSError ...: say which file
            raise ConvertError(f"{path} is not a readable parquet file ({err}).") from err
        schema = handle.schema_arrow
        for column in (image_column, label_column):
            if column not in schema.names:
                raise ConvertError(f"{path} has no column {column!r} (its columns: {', '.join(schema.names)}); "
                                   f"name the right one with --image-column / --label-column.")
        names = names or class_names_from_schema(schema, label_column)
        for group in range(handle.num_row_groups):
            labels = handle.read_row_group(group, columns=[label_column]).column(0).to_pylist()
            for row, label in enumerate(labels):
                name = f"{path.name}/rg{group}/row{row}"
                if label is None or not isinstance(label, int) or isinstance(label, bool) or label < 0:
                    skipped.append({"path": name, "reason": f"no usable label in {label_column!r} ({label!r})"})
                    continue
                rows.append((ParquetRow(str(path), group, row, image_column, name), label))
    return rows, skipped, names


def parquet_source(train: str, val: str | None = None, image_column: str = "image", label_column: str = "label",
                   classes: Path | None = None, val_fraction: float = 0.1, seed: int = 0) -> Source:
    """A Source over parquet shards; without `val`, each class's rows are split as `convert folder` does."""
    train_paths = expand_pattern(train, "--train")
    splits, skipped, found = {}, {}, None
    splits["train"], skipped["train"], found = parquet_rows(train_paths, image_column, label_column)
    if val is not None:
        splits["val"], skipped["val"], _ = parquet_rows(expand_pattern(val, "--val"), image_column, label_column)
    if not splits["train"]:
        left = skipped["train"]
        example = f", e.g. {left[0]['path']}: {left[0]['reason']}" if left else ""
        raise ConvertError(f"No usable rows in {train} ({len(left)} without a usable label{example}); labels "
                           f"must be non-negative integers (--label-column names the column).")
    names = class_names(1 + max(label for items in splits.values() for _, label in items), classes, found)
    if val is None:
        splits = split_by_label(splits["train"], val_fraction, seed)
    return Source(root=train_paths[0].parent, layout="parquet", classes=names, splits=splits,
                  loose={name: [] for name in splits}, skipped=skipped)
