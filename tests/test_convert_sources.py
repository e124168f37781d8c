"""Finding samples: class indices, train/val layout, the stratified seeded split, and clear errors."""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pytest

from convert.sources import ConvertError, find_samples


def touch_images(folder: Path, count: int, suffix: str = ".jpg") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        (folder / f"img{index:03d}{suffix}").write_bytes(b"\xff\xd8\xff")


def flat_folder(root: Path, counts: dict[str, int]) -> Path:
    for name, count in counts.items():
        touch_images(root / name, count)
    return root


def test_class_indices_are_the_sorted_train_folder_names(tmp_path):
    root = flat_folder(tmp_path, {"zebra": 4, "Apple": 4, "mango": 4})
    source = find_samples(root)
    assert source.classes == ["Apple", "mango", "zebra"]
    for path, label in source.splits["train"] + source.splits["val"]:
        assert path.parent.name == source.classes[label]


def test_train_val_layout_is_used_as_is(tmp_path):
    flat_folder(tmp_path / "train", {"a": 5, "b": 3})
    flat_folder(tmp_path / "val", {"b": 2})
    source = find_samples(tmp_path)
    assert source.layout == "train_val"
    assert Counter(label for _, label in source.splits["train"]) == {0: 5, 1: 3}
    assert [(path.parent.parent.name, label) for path, label in source.splits["val"]] == [("val", 1)] * 2


def test_val_class_missing_from_train_is_an_error_naming_it(tmp_path):
    flat_folder(tmp_path / "train", {"a": 2})
    flat_folder(tmp_path / "val", {"a": 1, "ghost": 1})
    with pytest.raises(ConvertError, match="ghost"):
        find_samples(tmp_path)


def test_split_is_stratified_disjoint_and_seeded(tmp_path):
    root = flat_folder(tmp_path, {"a": 20, "b": 10, "c": 3})
    source = find_samples(root, val_fraction=0.2, seed=1)
    assert source.layout == "split"
    train = {path for path, _ in source.splits["train"]}
    val = {path for path, _ in source.splits["val"]}
    assert not train & val and len(train | val) == 33
    assert Counter(label for _, label in source.splits["val"]) == {0: 4, 1: 2, 2: 1}
    again = find_samples(root, val_fraction=0.2, seed=1)
    assert again.splits == source.splits
    other = find_samples(root, val_fraction=0.2, seed=2)
    assert {path for path, _ in other.splits["val"]} != val


def test_hidden_and_non_image_files_are_ignored_and_extensions_are_case_insensitive(tmp_path):
    touch_images(tmp_path / "a", 2)
    touch_images(tmp_path / "a", 1, suffix=".JPEG")
    (tmp_path / "a" / "nested").mkdir()
    (tmp_path / "a" / "nested" / "deep.PNG").write_bytes(b"x")
    (tmp_path / "a" / ".hidden.jpg").write_bytes(b"x")
    (tmp_path / "a" / ".thumbs").mkdir()
    (tmp_path / "a" / ".thumbs" / "t.jpg").write_bytes(b"x")
    (tmp_path / "a" / "readme.txt").write_text("x")
    (tmp_path / ".git").mkdir()
    touch_images(tmp_path / ".git", 2)
    touch_images(tmp_path / "b", 2)
    source = find_samples(tmp_path, val_fraction=0.3)
    assert source.classes == ["a", "b"]
    names = sorted(path.name for path, _ in source.splits["train"] + source.splits["val"])
    assert names == ["deep.PNG", "img000.JPEG", "img000.jpg", "img000.jpg", "img001.jpg", "img001.jpg"]


def test_empty_class_folder_is_an_error_naming_it(tmp_path):
    flat_folder(tmp_path, {"a": 3})
    (tmp_path / "empty_class").mkdir()
    (tmp_path / "empty_class" / "notes.txt").write_text("no images here")
    with pytest.raises(ConvertError, match="empty_class.*holds no image files"):
        find_samples(tmp_path)


def test_empty_split_is_an_error(tmp_path):
    flat_folder(tmp_path, {"a": 3, "b": 3})
    with pytest.raises(ConvertError, match="val split .* is empty"):
        find_samples(tmp_path, val_fraction=0.0)
    flat_folder(tmp_path / "layout" / "train", {"a": 2})
    (tmp_path / "layout" / "val").mkdir()
    with pytest.raises(ConvertError, match="val split .* is empty"):
        find_samples(tmp_path / "layout")


@pytest.mark.parametrize("make_root, message", [
    (lambda root: root / "missing", "does not exist"),
    (lambda root: (root / "file.jpg").write_bytes(b"x") and root / "file.jpg", "not a folder"),
    (lambda root: touch_images(root / "loose", 2) or root / "loose", "no class folders.*one sub-folder per class"),
])
def test_bad_roots_are_clear_errors(tmp_path, make_root, message):
    with pytest.raises(ConvertError, match=message):
        find_samples(make_root(tmp_path))


def test_unreadable_root_is_a_clear_error(tmp_path, monkeypatch):
    flat_folder(tmp_path / "data", {"a": 2})
    # Simulated: the tests may run as root, who reads any folder whatever its permissions.
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(ConvertError, match="permission denied"):
        find_samples(tmp_path / "data")


def test_unreadable_class_folder_is_a_clear_error(tmp_path, monkeypatch):
    flat_folder(tmp_path / "data", {"a": 2})
    real_scandir = os.scandir

    def scandir(path):
        if Path(path).name == "data":
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)
    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(ConvertError, match="permission denied"):
        find_samples(tmp_path / "data")
