"""Conversion end to end: pixels and labels survive, bad files are listed not written, and an
identical re-run is a no-op."""
from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import gradient, write_bad_images
from PIL import Image
from rich.console import Console

from convert.pipeline import convert_source, fingerprint
from convert.sources import IMAGE_EXTENSIONS, ConvertError, find_samples
from convert.verify import iter_samples, verify
from convert.write import WriteSettings
from fastpipe.data.sample_table import split_samples

CLASSES = ["cat", "dog", "emu"]


def quadrant_colour(index: int, label: int, quadrant: int) -> tuple[int, int, int]:
    """Flat colours that encode a sample's index and label, different in each quadrant."""
    return ((37 * index + 60 * quadrant) % 256, (80 * label + 40 * quadrant) % 256, (90 + 50 * quadrant) % 256)


def coded_image(index: int, label: int, width: int, height: int) -> np.ndarray:
    image = np.empty((height, width, 3), np.uint8)
    half_h, half_w = height // 2, width // 2
    for quadrant, (rows, cols) in enumerate([(slice(0, half_h), slice(0, half_w)), (slice(0, half_h), slice(half_w, None)),
                                             (slice(half_h, None), slice(0, half_w)),
                                             (slice(half_h, None), slice(half_w, None))]):
        image[rows, cols] = quadrant_colour(index, label, quadrant)
    return image


def quadrant_centres(image: np.ndarray) -> list[np.ndarray]:
    height, width = image.shape[:2]
    return [image[y - 1:y + 2, x - 1:x + 2].reshape(-1, 3).mean(axis=0)
            for y in (height // 4, 3 * height // 4) for x in (width // 4, 3 * width // 4)]


@pytest.fixture(scope="module")
def coded_folder(tmp_path_factory) -> Path:
    """train: 80x60 PNGs (stored downscaled as JPEG); val: 30x20 PNGs (stored raw, full size)."""
    root = tmp_path_factory.mktemp("coded")
    index = 0
    for split, count, size in (("train", 4, (80, 60)), ("val", 2, (30, 20))):
        for label, name in enumerate(CLASSES):
            (root / split / name).mkdir(parents=True)
            for _ in range(count):
                Image.fromarray(coded_image(index, label, *size)).save(root / split / name / f"img{index:03d}.png")
                index += 1
    return root


def run(src: Path, out: Path, train=None, val=None, **options) -> tuple[dict, str]:
    buffer = io.StringIO()
    manifest = convert_source(find_samples(src), out, train or WriteSettings(), val or WriteSettings(),
                              workers=options.pop("workers", 2), console=Console(file=buffer, width=200),
                              **options)
    return manifest, buffer.getvalue()


def test_round_trip_preserves_pixels_labels_and_class_names(coded_folder, tmp_path):
    out = tmp_path / "out"
    manifest, _ = run(coded_folder, out, train=WriteSettings(write_mode="jpg", max_resolution=40),
                      val=WriteSettings(write_mode="raw", max_resolution=40))
    assert manifest["classes"] == CLASSES
    assert manifest["layout"] == "train_val" and manifest["source_root"] == str(coded_folder.resolve())
    for split, stored_size in (("train", (40, 30)), ("val", (30, 20))):
        info = manifest["splits"][split]
        assert info["written"] == len(split_samples(out, split)) == (4 if split == "train" else 2) * len(CLASSES)
        for (image, label), (relative, manifest_label) in zip(iter_samples(out / f"{split}.beton"), split_samples(out, split)):
            source_index = int(Path(relative).stem[3:])
            assert label == manifest_label == CLASSES.index(Path(relative).parent.name)
            assert (image.shape[1], image.shape[0]) == stored_size
            if split == "val":      # raw storage at source size: bit exact
                assert np.array_equal(image, np.asarray(Image.open(coded_folder / relative).convert("RGB")))
            for quadrant, centre in enumerate(quadrant_centres(image)):
                expected = np.array(quadrant_colour(source_index, label, quadrant))
                assert np.abs(centre - expected).max() <= 8, (relative, quadrant, centre, expected)


def test_identical_rerun_is_a_noop_and_force_rewrites(coded_folder, tmp_path):
    out = tmp_path / "out"
    first, _ = run(coded_folder, out)
    first_samples = split_samples(out, "train")
    before = {name: (out / name).stat().st_mtime_ns for name in ("train.beton", "val.beton", "manifest.json")}
    second, text = run(coded_folder, out)
    assert "Up to date" in text and second == first
    assert {name: (out / name).stat().st_mtime_ns for name in before} == before
    _, text = run(coded_folder, out, force=True)
    assert "written" in text and "Up to date" not in text
    assert (out / "manifest.json").stat().st_mtime_ns != before["manifest.json"]
    assert split_samples(out, "train") == first_samples


def test_fingerprint_changes_with_inputs_and_options(coded_folder, tmp_path):
    source = find_samples(coded_folder)
    settings = {"train": WriteSettings(), "val": WriteSettings()}
    base = fingerprint(source, settings)
    assert fingerprint(find_samples(coded_folder), settings) == base
    assert fingerprint(source, {**settings, "val": WriteSettings(max_resolution=128)}) != base
    path = source.splits["train"][0][0]
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    try:
        assert fingerprint(source, settings) != base
    finally:
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


@pytest.fixture(scope="module")
def bad_source(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("badsrc")
    expected = write_bad_images(root / "train" / "odd")
    for split, count in (("train", 3), ("val", 2)):
        for name in ("odd", "plain"):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                Image.fromarray(gradient(50 + index, 40)).save(folder / f"ok{index}.jpg", quality=95)
    return root, expected


def test_bad_files_are_listed_with_reasons_and_everything_else_is_written(bad_source, tmp_path):
    root, expected = bad_source
    out = tmp_path / "out"
    manifest, text = run(root, out, train=WriteSettings(max_resolution=96, min_side=8),
                         val=WriteSettings(max_resolution=96, min_side=8))
    train = manifest["splits"]["train"]
    skipped = {Path(item["path"]).name: item["reason"] for item in train["skipped"]}
    written = {Path(path).name for path, _ in split_samples(out, "train") if Path(path).parent.name == "odd"}
    assert skipped.keys() == {name for name, reason in expected.items() if reason}
    for name, reason in skipped.items():
        assert expected[name].lower() in reason.lower(), (name, reason)
    assert written == {name for name, reason in expected.items() if reason is None} | {"ok0.jpg", "ok1.jpg", "ok2.jpg"}
    image_files = {path.name for path in (root / "train" / "odd").iterdir()
                   if path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")}
    assert image_files == skipped.keys() | written         # nothing dropped silently, nothing hidden read
    assert f"train: written {train['written']}, skipped {len(skipped)}" in text
    assert "truncated" in text and "val: written 4, skipped 0" in text
    samples = dict(zip((Path(path).name for path, _ in split_samples(out, "train")), iter_samples(out / "train.beton")))
    assert samples["exif_rotated.jpg"][0].shape == (60, 40, 3)      # rotation applied: 60x40 file shown 40x60
    assert samples["wide.jpg"][0].shape == (10, 96, 3)
    assert verify(out, console=Console(quiet=True)) == {"train": train["written"], "val": 4}


def test_strict_mode_stops_at_the_first_bad_file_and_writes_nothing(bad_source, tmp_path):
    root, _ = bad_source
    out = tmp_path / "out"
    with pytest.raises(ConvertError, match="--strict"):
        run(root, out, strict=True)
    assert not list(out.iterdir())


def test_a_failed_rerun_keeps_the_previous_output_intact(coded_folder, bad_source, tmp_path):
    out = tmp_path / "out"
    run(coded_folder, out)
    before = {path.name: path.read_bytes() for path in out.iterdir()}
    with pytest.raises(ConvertError, match="--strict"):
        run(bad_source[0], out, strict=True, force=True)
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before


def test_manifest_records_settings_versions_and_checksums(betons):
    manifest = json.loads((betons / "manifest.json").read_text())
    assert manifest["format"] == 1 and set(manifest["versions"]) >= {"ffcv", "numpy", "pillow", "torch", "python"}
    for split in ("train", "val"):
        info = manifest["splits"][split]
        assert set(info["settings"]) >= {"write_mode", "max_resolution", "jpeg_quality", "compress_probability", "seed"}
        assert info["size_bytes"] == (betons / info["beton"]).stat().st_size
        assert len(info["sha256"]) == 64
        assert info["image_stats"]["max_side"] <= info["settings"]["max_resolution"]
