"""Find the samples of an ImageFolder: class names, labels and the train/val split.

Two layouts: SRC/train and SRC/val (each with one folder per class), or class folders directly under
SRC, split into train and val per class with a seeded shuffle (stratified).
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from pathlib import Path

from fastpipe.data.images import IMAGE_EXTENSIONS


class ConvertError(RuntimeError):
    """A problem with the input or options; the message says what is wrong and what to do."""


@dataclass
class Source:
    """Everything the writer needs: absolute paths (or archive members) and labels per split, in beton order."""
    root: Path
    layout: str                       # "train_val" or "split"
    classes: list[str]
    splits: dict[str, list[tuple[Path, int]]] = field(default_factory=dict)
    loose: dict[str, list[Path]] = field(default_factory=dict)   # image files outside any class folder
    skipped: dict[str, list[dict]] = field(default_factory=dict)   # left out while scanning: {path, reason}


LOOSE_REASON = "image file outside any class folder, so it has no label: move it into a class folder to use it"


def is_hidden(name: str) -> bool:
    return name.startswith(".")


def is_image_file(name: str) -> bool:
    return not is_hidden(name) and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _list_dir(folder: Path) -> list[os.DirEntry]:
    try:
        with os.scandir(folder) as entries:
            return sorted(entries, key=lambda entry: entry.name)
    except PermissionError as err:
        raise ConvertError(f"Cannot read folder {folder}: permission denied. Fix its permissions "
                           f"(e.g. `chmod -R u+rX {folder}`).") from err
    except NotADirectoryError as err:
        raise ConvertError(f"{folder} is a file, not a folder of images.") from err
    except FileNotFoundError as err:
        raise ConvertError(f"Folder {folder} does not exist.") from err


def class_folders(folder: Path) -> list[str]:
    """Visible sub-folder names, sorted: these are the class names (their order gives the labels)."""
    return [entry.name for entry in _list_dir(folder) if entry.is_dir() and not is_hidden(entry.name)]


def image_files(folder: Path) -> list[Path]:
    """Image files under a class folder (recursively, like torchvision's ImageFolder), sorted.
    Hidden files and folders and files without an image extension are ignored."""
    found = []
    def on_error(err: OSError) -> None:
        raise ConvertError(f"Cannot read {err.filename}: {err.strerror}. Fix its permissions.")
    for directory, subdirs, files in os.walk(folder, onerror=on_error, followlinks=True):
        subdirs[:] = sorted(name for name in subdirs if not is_hidden(name))
        found += [Path(directory) / name for name in files if is_image_file(name)]
    return sorted(found)


def loose_images(folder: Path) -> list[Path]:
    """Image files lying directly in `folder`, beside its class folders."""
    return [Path(entry.path) for entry in _list_dir(folder) if entry.is_file() and is_image_file(entry.name)]


def _collect(folder: Path, classes: list[str], split: str) -> dict[str, list[Path]]:
    files = {}
    for name in classes:
        files[name] = image_files(folder / name)
        if not files[name]:
            raise ConvertError(f"Class folder {folder / name} ({split}) holds no image files "
                               f"(extensions: {', '.join(sorted(IMAGE_EXTENSIONS))}). "
                               f"Add images or remove the folder.")
    return files


def _check_root(root: Path) -> None:
    if not root.exists():
        raise ConvertError(f"Source folder {root} does not exist.")
    if not root.is_dir():
        raise ConvertError(f"Source {root} is not a folder: pass an ImageFolder (one sub-folder per class).")
    if not os.access(root, os.R_OK | os.X_OK):
        raise ConvertError(f"Cannot read source folder {root}: permission denied.")


def stratified_split(files: dict[str, list[Path]], val_fraction: float, seed: int
                     ) -> tuple[dict[str, list[Path]], dict[str, list[Path]]]:
    """Per class, a seeded shuffle puts round(n * val_fraction) files into val (at least one when the
    class has two or more files and val_fraction > 0); the rest go to train."""
    train, val = {}, {}
    for index, (name, paths) in enumerate(sorted(files.items())):
        order = list(paths)
        random.Random(seed * 1_000_003 + index).shuffle(order)
        count = round(len(order) * val_fraction)
        if val_fraction > 0 and len(order) >= 2:
            count = min(max(count, 1), len(order) - 1)
        val[name], train[name] = sorted(order[:count]), sorted(order[count:])
    return train, val


def split_by_label(items: list, val_fraction: float, seed: int) -> dict[str, list]:
    """(sample, label) items of one set into train and val, each class as `stratified_split` splits class
    folders; in label order, each class's samples in their order. For sources without a val set."""
    by_class: dict[str, list] = {}
    for item in items:
        by_class.setdefault(str(item[1]), []).append(item)
    train, val = stratified_split(by_class, val_fraction, seed)
    splits = {name: [item for key in sorted(part, key=int) for item in part[key]]
              for name, part in (("train", train), ("val", val))}
    if not splits["val"]:
        raise ConvertError("The val split is empty: pass --val PATTERN, or --val-fraction > 0 with at least two "
                           "samples per class.")
    return splits


def class_names(count: int, path: str | os.PathLike | None = None, found: list[str] | None = None) -> list[str]:
    """Names of labels 0..count-1: one per line of the file at `path` (label order), else `found` (names the
    data carries itself, e.g. parquet's ClassLabel metadata), else zero-padded numbers. Every label must
    have a name, and names must be unique."""
    if path is None and not found:
        width = len(str(max(count - 1, 0)))
        return [f"{index:0{width}d}" for index in range(count)]
    origin = path if path is not None else "the names stored with the data"
    if path is not None:
        try:
            found = [line.strip() for line in Path(path).expanduser().read_text().splitlines() if line.strip()]
        except OSError as err:
            raise ConvertError(f"Cannot read the class file {path}: {err.strerror or err}.") from err
    if len(found) < count:
        raise ConvertError(f"{origin} names {len(found)} classes but the data uses labels up to {count - 1}: "
                           f"give one name per line for every label, in label order.")
    if len(set(found)) != len(found):
        raise ConvertError(f"{origin} names some classes twice; class names must be unique.")
    return list(found)


def find_samples(root: str | os.PathLike, val_fraction: float = 0.1, seed: int = 0) -> Source:
    """Scan an ImageFolder. Uses SRC/train and SRC/val when both exist, else splits the class folders
    under SRC (or under SRC/train when there is no val/)."""
    root = Path(root).expanduser().resolve()
    _check_root(root)
    if not 0.0 <= val_fraction < 1.0:
        raise ConvertError(f"--val-fraction must be in [0, 1), got {val_fraction}.")
    train_dir, val_dir = root / "train", root / "val"
    if train_dir.is_dir() and val_dir.is_dir():
        classes = class_folders(train_dir)
        if not classes:
            raise ConvertError(f"{train_dir} has no class folders: expected one sub-folder per class.")
        val_classes = class_folders(val_dir)
        unknown = [name for name in val_classes if name not in set(classes)]
        if unknown:
            raise ConvertError(f"Class folder(s) {', '.join(unknown)} in {val_dir} do not exist in {train_dir}: "
                               f"labels come from the train classes, so every val class must be in train.")
        train = _collect(train_dir, classes, "train")
        val = _collect(val_dir, val_classes, "val")
        layout = "train_val"
        loose = {"train": loose_images(root) + loose_images(train_dir), "val": loose_images(val_dir)}
    else:
        base = train_dir if train_dir.is_dir() else root
        classes = class_folders(base)
        if not classes:
            loose = [name for name in os.listdir(base) if is_image_file(name)]
            hint = " (found image files directly in it; put them into one sub-folder per class)" if loose else ""
            raise ConvertError(f"{base} has no class folders{hint}. Expected SRC/<class>/<image> or "
                               f"SRC/train/<class>/<image> and SRC/val/<class>/<image>.")
        train, val = stratified_split(_collect(base, classes, "train"), val_fraction, seed)
        layout = "split"
        loose = {"train": loose_images(base) + (loose_images(root) if base != root else []), "val": []}
    labels = {name: index for index, name in enumerate(classes)}
    splits = {name: [(path, labels[cls]) for cls in sorted(files) for path in files[cls]]
              for name, files in (("train", train), ("val", val))}
    for name, items in splits.items():
        if not items:
            fix = "use --val-fraction > 0 with at least two images per class" if layout == "split" \
                else f"add images to {root / name}"
            raise ConvertError(f"The {name} split of {root} is empty: {fix}.")
    return Source(root=root, layout=layout, classes=classes, splits=splits, loose=loose)
