"""ImageNet (ILSVRC2012) from its archives as distributed: `ILSVRC2012_img_train.tar` (a tar of 1,000
per-synset tars) and `ILSVRC2012_img_val.tar` (flat), read in place (convert.members), never extracted.

Labels are the sorted synset order, as torchvision's ImageNet has them. Val labels come from Kaggle's
`LOC_val_solution.csv` or from the devkit (`ILSVRC2012_devkit_t12.tar.gz`: data/meta.mat maps the
ground truth file's ILSVRC2012_IDs to synsets); both give the same labels. With the devkit, class names
are the synsets' words ("n01440764: tench, Tinca tinca").
"""
from __future__ import annotations

import csv
import io
import re
import tarfile
from pathlib import Path

from convert.members import Member, ScanProgress, nested_members, scan_progress, scan_tar, unreadable
from convert.sources import IMAGE_EXTENSIONS, ConvertError, Source

SYNSET = re.compile(r"n\d{8}")


def images_only(members: list[Member], skipped: list[dict]) -> list[Member]:
    """The members with an image's file name; the others go to `skipped` with the reason."""
    kept = []
    for member in members:
        if Path(member.name).suffix.lower() in IMAGE_EXTENSIONS:
            kept.append(member)
        else:
            skipped.append({"path": member.name, "reason": "not an image file name"})
    return kept


def train_members(path: Path, progress: ScanProgress | None, skipped: list[dict]) -> dict[str, list[Member]]:
    """{synset: its images} from the train archive (one uncompressed tar per synset inside); what cannot be
    an image goes to `skipped` with the reason."""
    found: dict[str, list[Member]] = {}
    for member, info in scan_tar(path, progress=progress):
        stem = Path(info.name).stem
        if member is None or not (info.name.endswith(".tar") and SYNSET.fullmatch(stem)):
            raise ConvertError(f"{path} holds {info.name}, not a per-synset tar such as n01440764.tar: is this "
                               f"ILSVRC2012_img_train.tar? (For an extracted folder use `python -m convert folder`.)")
        members, unread = nested_members(path, info)
        skipped += unread
        found.setdefault(stem, []).extend(images_only(members, skipped))   # a synset's tar twice: both kept
    if not found:
        raise ConvertError(f"{path} holds no per-synset tars: is this ILSVRC2012_img_train.tar?")
    empty = [synset for synset, members in found.items() if not members]
    if empty:
        raise ConvertError(f"{path}: the tar(s) of {', '.join(empty[:5])} hold no images; the archive is damaged.")
    return found


def val_members(path: Path, progress: ScanProgress | None, skipped: list[dict]) -> list[Member]:
    """The val archive's images; what cannot be one goes to `skipped` with the reason."""
    members = []
    for member, info in scan_tar(path, progress=progress):
        if member is None:
            skipped.append({"path": info.name, "reason": unreadable(info)})
        else:
            members.append(member)
    members = images_only(members, skipped)
    if not members:
        raise ConvertError(f"{path} holds no images: is this ILSVRC2012_img_val.tar?")
    return members


def labels_from_csv(path: Path) -> dict[str, str]:
    """{image id: synset} from Kaggle's LOC_val_solution.csv (ImageId, PredictionString = "synset x y x y ...")."""
    if not path.is_file():
        raise ConvertError(f"Val labels file {path} does not exist.")
    with open(path, newline="", encoding="utf-8-sig") as handle:   # -sig: a byte-order mark, as Excel saves it
        rows = list(csv.DictReader(handle))
    if not rows or not {"ImageId", "PredictionString"} <= set(rows[0]):
        raise ConvertError(f"{path} is not LOC_val_solution.csv: expected the columns ImageId and PredictionString.")
    labels, lines = {}, {}
    for number, row in enumerate(rows, start=2):
        words = (row["PredictionString"] or "").split()   # None: a row with fewer fields
        if not words or not SYNSET.fullmatch(words[0]):
            raise ConvertError(f"{path} line {number}: no synset in PredictionString {row['PredictionString']!r}.")
        image_id = row["ImageId"]
        if labels.get(image_id, words[0]) != words[0]:
            raise ConvertError(f"{path} lines {lines[image_id]} and {number} give {image_id} two labels "
                               f"({labels[image_id]}, {words[0]}): which is right?")
        labels[image_id] = words[0]
        lines.setdefault(image_id, number)
    return labels


def read_devkit(path: Path) -> tuple[dict[str, str], dict[str, str]]:
    """({image id: synset} of val, {synset: words}) from ILSVRC2012_devkit_t12.tar.gz."""
    try:
        from scipy.io import loadmat  # meta.mat is a MATLAB file: scipy reads it (optional dependency)
    except ImportError as err:
        raise ConvertError("Reading the devkit's meta.mat needs scipy: `pip install scipy`, or pass "
                           "--val-labels LOC_val_solution.csv instead.") from err
    if not path.is_file():
        raise ConvertError(f"Devkit {path} does not exist.")
    try:
        with tarfile.open(path) as devkit:
            files = {Path(info.name).name: info for info in devkit if info.isfile()}
            if not {"meta.mat", "ILSVRC2012_validation_ground_truth.txt"} <= set(files):
                raise ConvertError(f"{path} lacks data/meta.mat or data/ILSVRC2012_validation_ground_truth.txt: "
                                   f"is this ILSVRC2012_devkit_t12.tar.gz?")
            meta = devkit.extractfile(files["meta.mat"]).read()
            truth = devkit.extractfile(files["ILSVRC2012_validation_ground_truth.txt"]).read().decode().split()
    except (tarfile.TarError, EOFError, OSError) as err:
        raise ConvertError(f"{path} is not a readable devkit archive ({err}).") from err
    try:
        synsets = loadmat(io.BytesIO(meta), squeeze_me=True)["synsets"]
        leaves = [row for row in synsets if int(row["num_children"]) == 0]   # the 1,000 classes
        by_id = {int(row["ILSVRC2012_ID"]): str(row["WNID"]) for row in leaves}
        words = {str(row["WNID"]): str(row["words"]) for row in leaves}
    except Exception as err:   # scipy raises ValueError, TypeError, KeyError, IndexError... for a damaged file
        raise ConvertError(f"data/meta.mat in {path} is not ILSVRC2012's class table ({type(err).__name__}: "
                           f"{err}); download the devkit again, or pass --val-labels LOC_val_solution.csv.") from err
    try:
        labels = {f"ILSVRC2012_val_{index:08d}": by_id[int(value)] for index, value in enumerate(truth, start=1)}
    except KeyError as err:
        raise ConvertError(f"{path}: the ground truth names class id {err}, which meta.mat does not have.") from err
    return labels, words


def imagenet_source(train: Path, val: Path, val_labels: Path | None = None, devkit: Path | None = None,
                    console=None) -> Source:
    """A Source over the two archives: classes sorted synsets (with the devkit's words when given)."""
    if (val_labels is None) == (devkit is None):
        raise ConvertError("Val labels: pass exactly one of --val-labels LOC_val_solution.csv and "
                           "--devkit ILSVRC2012_devkit_t12.tar.gz.")
    train, val = Path(train).expanduser().resolve(), Path(val).expanduser().resolve()
    skipped: dict[str, list[dict]] = {"train": [], "val": []}
    with scan_progress(console, [train, val], "archives") as progress:
        by_synset = train_members(train, progress, skipped["train"])
        val_found = val_members(val, progress, skipped["val"])
    synsets = sorted(by_synset)
    index = {synset: label for label, synset in enumerate(synsets)}
    words = {}
    if devkit is not None:
        truth, words = read_devkit(Path(devkit).expanduser().resolve())
    else:
        truth = labels_from_csv(Path(val_labels).expanduser().resolve())
    val_items = []
    for member in val_found:
        image_id = Path(member.name).stem
        synset = truth.get(image_id)
        if synset is None:
            raise ConvertError(f"{member.name} in {val} has no label in "
                               f"{val_labels or devkit}: are these the labels of this val archive?")
        if synset not in index:
            raise ConvertError(f"{member.name} is labelled {synset}, a synset the train archive does not have.")
        val_items.append((member, index[synset]))
    classes = [f"{synset}: {words[synset]}" if synset in words else synset for synset in synsets]
    train_items = [(member, index[synset]) for synset in synsets for member in by_synset[synset]]
    return Source(root=train.parent, layout="imagenet_archives", classes=classes,
                  splits={"train": train_items, "val": val_items}, loose={}, skipped=skipped)
