"""The command line and the synthetic data set: deterministic, ImageNet-like, and learnable."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from conftest import SYNTHETIC_CLASSES, SYNTHETIC_TRAIN_PER_CLASS, SYNTHETIC_VAL_PER_CLASS
from PIL import Image

from convert.__main__ import main
from convert.synthetic import make_synthetic


def digest(folder: Path) -> dict[str, str]:
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*.JPEG"))}


def test_synthetic_data_is_deterministic_for_a_seed(tmp_path):
    make_synthetic(tmp_path / "a", classes=2, per_class=3, seed=5, min_side=40, max_side=80, workers=1)
    make_synthetic(tmp_path / "b", classes=2, per_class=3, seed=5, min_side=40, max_side=80, workers=1)
    make_synthetic(tmp_path / "c", classes=2, per_class=3, seed=6, min_side=40, max_side=80, workers=1)
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    assert digest(tmp_path / "a").keys() == digest(tmp_path / "c").keys() != {}
    assert digest(tmp_path / "a") != digest(tmp_path / "c")


def test_synthetic_images_look_like_imagenet_in_size_and_file_size(tmp_path):
    result = make_synthetic(tmp_path, classes=2, per_class=6, seed=0, workers=1)
    sizes = [Image.open(path).size for path in tmp_path.rglob("*.JPEG")]
    assert result["images"] == len(sizes) == 12
    assert all(200 <= side <= 500 for size in sizes for side in size)
    assert len({round(width / height, 1) for width, height in sizes}) >= 3      # mixed aspect ratios
    assert 10_000 < result["bytes"] / result["images"] < 150_000                 # tens of KB, like photos


def test_synthetic_classes_are_separable_by_a_trivial_classifier(synthetic_folder):
    # A stand-in for "a small CNN learns it": nearest class-mean on 8x8 thumbnails must beat chance by far.
    def features(split):
        rows = []
        for path in sorted((synthetic_folder / split).rglob("*.JPEG")):
            thumb = np.asarray(Image.open(path).convert("HSV").resize((8, 8)), dtype=np.float32)
            hue = thumb[..., 0] / 255 * 2 * np.pi
            rows.append((np.concatenate([np.cos(hue).ravel(), np.sin(hue).ravel()]), int(path.parent.name[-3:])))
        return np.stack([r[0] for r in rows]), np.array([r[1] for r in rows])
    train_x, train_y = features("train")
    val_x, val_y = features("val")
    assert len(train_y) == SYNTHETIC_CLASSES * SYNTHETIC_TRAIN_PER_CLASS
    assert len(val_y) == SYNTHETIC_CLASSES * SYNTHETIC_VAL_PER_CLASS
    centroids = np.stack([train_x[train_y == label].mean(axis=0) for label in range(SYNTHETIC_CLASSES)])
    predicted = np.argmin(((val_x[:, None] - centroids[None]) ** 2).sum(-1), axis=1)
    assert (predicted == val_y).mean() >= 0.9


def test_imagenet_mini_without_data_says_where_it_is_expected(tmp_path, capsys):
    assert main(["imagenet-mini", "--root", str(tmp_path / "imagenet-mini"), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert str(tmp_path / "imagenet-mini") in err and "python -m convert synthetic" in err
    assert not (tmp_path / "out").exists()


def test_cli_synthetic_then_folder_then_verify(tmp_path, capsys):
    images, out = tmp_path / "images", tmp_path / "betons"
    assert main(["synthetic", "--out", str(images), "--classes", "3", "--per-class", "5",
                 "--min-size", "40", "--max-size", "70", "--workers", "1"]) == 0
    assert main(["folder", str(images), "--out", str(out), "--val-fraction", "0.2", "--max-resolution", "64",
                 "--val-write-mode", "jpg", "--workers", "2"]) == 0
    err = capsys.readouterr().err
    assert "train: written 12, skipped 0" in err and "val: written 3, skipped 0" in err
    assert main(["verify", str(out)]) == 0
    assert main(["folder", str(images), "--out", str(out), "--val-fraction", "0.2", "--max-resolution", "64",
                 "--val-write-mode", "jpg", "--workers", "2"]) == 0
    assert "Up to date" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--write-mode", "raw", "--max-resolution", "4"], "below --min-side"),
    (["--jpeg-quality", "0"], "--jpeg-quality"),
    (["--workers", "0"], "--workers"),
])
def test_bad_options_are_clear_errors(synthetic_folder, tmp_path, capsys, argv, message):
    assert main(["folder", str(synthetic_folder), "--out", str(tmp_path / "out"), *argv]) == 1
    assert message in capsys.readouterr().err


def test_loose_images_beside_the_class_folders_are_listed_as_skipped_with_the_reason(tmp_path):
    import json
    import shutil

    make_synthetic(tmp_path / "src", classes=2, per_class=4, val_per_class=2, seed=1, min_side=40, max_side=80,
                   workers=1)
    one = next((tmp_path / "src" / "train").rglob("*.JPEG"))
    shutil.copy(one, tmp_path / "src" / "train" / "stray.jpg")
    shutil.copy(one, tmp_path / "src" / "val" / "stray_val.png")
    shutil.copy(one, tmp_path / "src" / "beside_train_and_val.jpeg")
    assert main(["folder", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--workers", "1"]) == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    skipped = {split: {item["path"]: item["reason"] for item in info["skipped"]}
               for split, info in manifest["splits"].items()}
    assert set(skipped["train"]) == {"train/stray.jpg", "beside_train_and_val.jpeg"}
    assert set(skipped["val"]) == {"val/stray_val.png"}
    assert all("outside any class folder" in reason for reasons in skipped.values() for reason in reasons.values())
    assert manifest["splits"]["train"]["written"] == 8 and manifest["splits"]["val"]["written"] == 4
