"""`python -m convert adopt DIR`: write the manifest for betons FFCV wrote itself (ffcv-imagenet's
`write_imagenet.py` and the like), so they load, train and evaluate like converted ones.

Everything comes from the betons' own header, field descriptors and per-sample metadata: counts,
labels, image sizes and storage modes, without decoding a single image.
"""
from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from rich.console import Console

from convert.pipeline import tool_versions
from convert.sources import ConvertError, class_names
from fastpipe.data.beton import (
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    MODE_JPEG,
    MODE_RAW,
    BetonError,
    BetonSamples,
    check_beton,
    describe_fields,
    read_fields,
    sha256_file,
    write_json_atomic,
)
from fastpipe.data.sample_table import write_sample_table

ADOPTED_LAYOUT = "adopted"


def storage_mode(modes: np.ndarray) -> str:
    jpeg, raw = int((modes == MODE_JPEG).sum()), int((modes == MODE_RAW).sum())
    if raw == 0:
        return "jpg"
    return "raw" if jpeg == 0 else f"mixed ({jpeg} jpg, {raw} raw)"


def split_record(split: str, path: Path, samples: BetonSamples) -> dict:
    sides = np.stack([samples.width, samples.height], axis=1)
    return {
        "beton": path.name, "written": len(samples), "skipped": [],
        "size_bytes": path.stat().st_size, "sha256": sha256_file(path),
        # no source files: a sample is named by its beton and index (predictions.csv rows, verify)
        "sample_table": write_sample_table(path.parent, split, None, samples.labels, samples.width, samples.height),
        "fields": samples.field_names,
        "settings": {"write_mode": storage_mode(samples.mode), "max_resolution": int(sides.max(initial=0))},
        "image_stats": {"min_side": int(sides.min()) if sides.size else 0, "max_side": int(sides.max(initial=0)),
                        "mean_width": round(float(samples.width.mean()), 1),
                        "mean_height": round(float(samples.height.mean()), 1)},
    }


def open_split(path: Path, split: str) -> BetonSamples:
    if not path.is_file():
        raise ConvertError(f"No {split} beton at {path}: name it with --{split} FILE (relative to the folder).")
    try:
        samples = BetonSamples(path)
    except BetonError as err:
        hint = (" FFCV's write_imagenet.py writes them as 'image' (RGBImageField) and 'label' (IntField)."
                if "field" in str(err) else "")
        raise ConvertError(f"{err}{hint}") from err
    if len(samples) == 0:
        raise ConvertError(f"{path} holds no samples.")
    if samples.labels.min() < 0:
        raise ConvertError(f"{path} has negative labels ({int(samples.labels.min())}); labels must be 0..N-1.")
    return samples


def adopt(data_dir: str | Path, *, classes_file: str | Path | None = None, train: str = "train.beton",
          val: str = "val.beton", force: bool = False, console: Console | None = None) -> dict:
    """Write DIR/manifest.json for DIR/<train> and DIR/<val>; returns the manifest."""
    console = console or Console(stderr=True, soft_wrap=True)
    data_dir = Path(data_dir).expanduser().resolve()
    if not data_dir.is_dir():
        raise ConvertError(f"{data_dir} is not a folder: pass the folder that holds the betons.")
    if (data_dir / MANIFEST_NAME).exists() and not force:
        raise ConvertError(f"{data_dir / MANIFEST_NAME} already exists; pass --force to replace it.")
    for split, name in (("train", train), ("val", val)):
        if Path(name).name != name:   # the manifest names betons by file name, in DIR
            raise ConvertError(f"--{split} {name}: give the name of a beton in {data_dir} (a file name, no folder); "
                               f"adopt the folder that holds it instead.")
    opened = {split: (data_dir / name, open_split(data_dir / name, split))
              for split, name in (("train", train), ("val", val))}
    if train == val:
        console.print(f"warning: train and val are the same beton ({train}): validation will measure the "
                      f"training data.")
    for split, (path, samples) in opened.items():
        console.print(f"{split}: {path.name}: {len(samples)} samples, fields "
                      f"{describe_fields(read_fields(path))} (image: '{samples.field_names['image']}', "
                      f"label: '{samples.field_names['label']}'), storage {storage_mode(samples.mode)}")
    count = 1 + max(int(samples.labels.max()) for _, samples in opened.values())
    classes = class_names(count, classes_file)
    manifest = {"format": MANIFEST_FORMAT, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "source_root": None, "layout": ADOPTED_LAYOUT, "classes": classes, "splits": {},
                "versions": tool_versions()}
    for split, (path, samples) in opened.items():
        with console.status(f"sha256 of {path.name} ..."):
            manifest["splits"][split] = split_record(split, path, samples)
    write_json_atomic(data_dir / MANIFEST_NAME, manifest)
    for split in opened:
        check_beton(data_dir, split, manifest)   # the same check every loader runs first
    console.print(f"Wrote {data_dir / MANIFEST_NAME}: {len(classes)} classes "
                  f"({'from ' + str(classes_file) if classes_file else 'numbered'}). Train with "
                  f"`python -m fastpipe.train --config r50.toml --data.path={data_dir}` (backend ffcv or dali: "
                  f"there are no source images for the torch baseline).")
    return manifest
