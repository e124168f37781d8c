"""WebDataset shards (uncompressed tars of `key.ext` members, WebDataset's own layout): members grouped by
key, the image from the usual extensions, the integer label from `key.cls` (or another member, or a field of
`key.json`). Images are read in place (convert.members); only the small label members are read here.

Written by hand: the webdataset package streams samples in order, but the converter's workers need each
sample's byte range to read it in place (twice: to check it, then to write it), which its API does not give.
"""
from __future__ import annotations

import json
from pathlib import Path

from convert.members import Member, ScanProgress, expand_pattern, scan_progress, scan_tar, unreadable
from convert.sources import IMAGE_EXTENSIONS, ConvertError, Source, class_names, split_by_label

NO_IMAGE = "no image member (expected one of: {})".format(", ".join(sorted(e.lstrip(".") for e in IMAGE_EXTENSIONS)))


def split_key(name: str) -> tuple[str, str]:
    """WebDataset's rule: the key is the path up to the first dot of the file name, the rest the extension."""
    folder, _, base = name.rpartition("/")
    stem, dot, extension = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), extension.lower() if dot else ""


def parse_label(data: bytes, label_key: str, where: str) -> int:
    """An integer from a `.cls`-style member, or `json.FIELD` from the sample's JSON member."""
    text = data.decode("utf-8", errors="replace").strip()
    try:
        if label_key.startswith("json."):
            value = json.loads(text)
            for part in label_key.split(".")[1:]:
                value = value[part]
        else:
            value = text
        digits = isinstance(value, str) and value.strip().lstrip("+-").isdigit()
        if isinstance(value, (bool, float)) or (isinstance(value, str) and not digits):
            raise ValueError(value)   # 1.9 or true is not a class: int() would take them as 1
        label = int(value)
    except (ValueError, KeyError, TypeError, json.JSONDecodeError) as err:
        raise ValueError(f"label {label_key} of {where} is not an integer ({text[:40]!r})") from err
    if label < 0:
        raise ValueError(f"label {label_key} of {where} is negative ({label})")
    return label


def shard_samples(paths: list[Path], label_key: str, console=None, what: str = "shards",
                  ) -> tuple[list[tuple[Member, int]], list[dict]]:
    """(image member, label) per sample, in shard order, and the samples left out with their reason."""
    samples, skipped = [], []
    with scan_progress(console, paths, what) as progress:
        for path in paths:
            shard_members(path, label_key, samples, skipped, progress)
    return samples, skipped


def shard_members(path: Path, label_key: str, samples: list, skipped: list, progress: ScanProgress) -> None:
    """Appends one shard's (image member, label) pairs to `samples` and what it leaves out to `skipped`."""
    label_ext = label_key.split(".")[0] if label_key.startswith("json.") else label_key
    # A sample is a run of consecutive members with one key, as WebDataset reads them: a key seen again later,
    # or an extension twice in one run, is another sample or a broken one, never merged silently.
    groups: list[tuple[str, dict[str, Member]]] = []
    for member, info in scan_tar(path, prefix=f"{path.name}/", progress=progress):
        key, extension = split_key(info.name)
        if member is None:
            skipped.append({"path": f"{path.name}/{info.name}", "reason": unreadable(info)})
            continue
        if not groups or groups[-1][0] != key:
            groups.append((key, {}))
        members = groups[-1][1]
        if extension in members:
            skipped.append({"path": f"{path.name}/{info.name}",
                            "reason": f"a second .{extension} member for key {key} in a row (duplicate member)"})
            continue
        members[extension] = member
    seen: set[str] = set()
    for key, members in groups:
        where = f"{path.name}/{key}"
        if key in seen:
            skipped.append({"path": where, "reason": "duplicate key: its members appear again, apart from its "
                                                      "first ones (shards must keep each sample's members together)"})
            continue
        seen.add(key)
        image = next((members[ext] for ext in members if f".{ext}" in IMAGE_EXTENSIONS), None)
        if image is None:
            skipped.append({"path": where, "reason": NO_IMAGE})
            continue
        if label_ext not in members:
            skipped.append({"path": where, "reason": f"no label: no {label_ext} member (--label-key {label_key})"})
            continue
        try:
            samples.append((image, parse_label(members[label_ext].read_bytes(), label_key, where)))
        except (ValueError, OSError) as err:
            skipped.append({"path": where, "reason": str(err)})


def webdataset_source(train: str, val: str | None = None, label_key: str = "cls", classes: Path | None = None,
                      val_fraction: float = 0.1, seed: int = 0, console=None) -> Source:
    """A Source over WebDataset shards. Without `val`, each class's samples are split as `convert folder`
    splits class folders. Class names from `classes` (one per line, in label order), else the labels' numbers."""
    train_paths = expand_pattern(train, "--train")
    splits, skipped = {}, {}
    splits["train"], skipped["train"] = shard_samples(train_paths, label_key, console, "train shards")
    if val is not None:
        splits["val"], skipped["val"] = shard_samples(expand_pattern(val, "--val"), label_key, console, "val shards")
    if not splits["train"]:
        reasons = "; ".join(f"{item['path']}: {item['reason']}" for item in skipped["train"][:3])
        raise ConvertError(f"No usable samples in {train} ({len(skipped['train'])} left out, e.g. {reasons}).")
    names = class_names(1 + max(label for items in splits.values() for _, label in items), classes)
    if val is None:
        splits = split_by_label(splits["train"], val_fraction, seed)
    return Source(root=train_paths[0].parent, layout="webdataset", classes=names, splits=splits,
                  loose={name: [] for name in splits}, skipped=skipped)
