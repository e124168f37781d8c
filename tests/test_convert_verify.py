"""`verify` catches tampered, truncated and inconsistent betons with a clear error (never a crash),
and `info` summarises a converted folder."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from rich.console import Console

from convert.__main__ import main
from convert.verify import MODE_JPEG, iter_samples, verify
from fastpipe.data.beton import BETON_HEADER, BetonError, BetonSamples, check_beton, sha256_file
from fastpipe.data.sample_table import split_samples


@pytest.fixture
def copy(betons, tmp_path):
    target = tmp_path / "betons"
    shutil.copytree(betons, target)
    return target


def rewrite_manifest(folder, split="train", **changes):
    """Make the manifest agree with an edited beton, so that a deeper check has to catch the damage."""
    manifest = json.loads((folder / "manifest.json").read_text())
    info = manifest["splits"][split]
    beton = folder / info["beton"]
    info.update(size_bytes=beton.stat().st_size, sha256=sha256_file(beton), **changes)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return manifest


def test_a_fresh_conversion_verifies(betons, capsys):
    manifest = json.loads((betons / "manifest.json").read_text())
    assert verify(betons, console=Console(quiet=True)) == {s: manifest["splits"][s]["written"] for s in ("train", "val")}
    assert main(["verify", str(betons)]) == 0
    assert "train:" in capsys.readouterr().out


def test_a_flipped_byte_is_caught_by_the_checksum(copy, capsys):
    beton = copy / "train.beton"
    data = bytearray(beton.read_bytes())
    data[len(data) // 2] ^= 0xFF
    beton.write_bytes(bytes(data))
    with pytest.raises(BetonError, match="sha256 differs"):
        verify(copy, console=Console(quiet=True))
    assert main(["verify", str(copy)]) == 1
    assert "error:" in capsys.readouterr().err


def test_a_truncated_beton_is_caught_before_it_is_read(copy):
    beton = copy / "val.beton"
    beton.write_bytes(beton.read_bytes()[:-1000])
    with pytest.raises(BetonError, match="truncated"):
        verify(copy, console=Console(quiet=True))


def test_a_beton_whose_header_was_never_fixed_up_is_caught(copy):
    # What FFCV leaves when a write dies: header written at the start, allocation table pointer still 0.
    beton = copy / "train.beton"
    data = bytearray(beton.read_bytes())
    offset = BETON_HEADER.fields["alloc_table_ptr"][1]
    data[offset:offset + 8] = bytes(8)
    beton.write_bytes(bytes(data))
    rewrite_manifest(copy)
    with pytest.raises(BetonError, match="did not finish"):
        check_beton(copy, "train")
    with pytest.raises(BetonError, match="did not finish"):
        verify(copy, console=Console(quiet=True))


def test_a_corrupt_jpeg_payload_is_reported_not_crashed_on(copy):
    beton = copy / "train.beton"
    samples = BetonSamples(beton)
    jpeg_samples = np.flatnonzero(samples.mode == MODE_JPEG)
    assert jpeg_samples.size, "the train beton of the fixture stores some samples as JPEG"
    index = int(jpeg_samples[0])
    pointer, size = int(samples.offset[index]), int(samples.size[index])
    del samples   # its memory map would keep the old bytes visible
    data = bytearray(beton.read_bytes())
    data[pointer:pointer + size] = bytes(size)
    beton.write_bytes(bytes(data))
    rewrite_manifest(copy)
    with pytest.raises(BetonError, match=f"sample {index}: expected a .* JPEG, got undecodable JPEG"):
        verify(copy, console=Console(quiet=True))


def test_labels_and_counts_must_match_the_manifest(copy):
    manifest = json.loads((copy / "manifest.json").read_text())
    samples = split_samples(copy, "val")
    samples[0][1] = (samples[0][1] + 1) % len(manifest["classes"])
    rewrite_manifest(copy, split="val", samples=samples)
    with pytest.raises(BetonError, match="sample 0 has label"):
        verify(copy, console=Console(quiet=True))
    rewrite_manifest(copy, split="val", samples=samples[1:], written=len(samples) - 1)
    with pytest.raises(BetonError, match="holds .* samples but the manifest says"):
        verify(copy, console=Console(quiet=True))


def test_a_per_sample_table_that_disagrees_with_its_beton_is_named_in_the_error(copy):
    """The tables beside the manifest: a changed label names the sample; a names file cut short, reordered or
    gone is caught by verify, not first by the report at the end of a training run."""
    rows_path = copy / "val.samples.npy"
    rows = np.load(rows_path)
    original = rows.copy()
    rows["label"][1] = (rows["label"][1] + 1) % 3
    np.save(rows_path, rows)
    name = split_samples(copy, "val")[1][0]
    with pytest.raises(BetonError, match=f"sample 1 has label .* its table says .*{name}"):
        verify(copy, console=Console(quiet=True))
    np.save(rows_path, original)
    names = (copy / "val.names.bin").read_bytes().split(b"\0")[:-1]
    swapped = [names[1], names[0], *names[2:]]
    for damaged, message in ((names[:-2], "sha256 differs"), (swapped, "sha256 differs"), (None, "is missing")):
        if damaged is None:
            (copy / "val.names.bin").unlink()
        else:
            (copy / "val.names.bin").write_bytes(b"".join(name + b"\0" for name in damaged))
        with pytest.raises(BetonError, match=message):
            verify(copy, console=Console(quiet=True))
    # a table of an earlier release has no checksums: names cut short or moved are still caught
    manifest = json.loads((copy / "manifest.json").read_text())
    for key in ("names_sha256", "rows_sha256"):
        del manifest["splits"]["val"]["sample_table"][key]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    for damaged, message in ((names[:-2], "names for"), ([names[0][:-1], *names[1:]], "do not sit where")):
        (copy / "val.names.bin").write_bytes(b"".join(name + b"\0" for name in damaged))
        with pytest.raises(BetonError, match=message):
            verify(copy, console=Console(quiet=True))


def test_decoded_samples_follow_the_manifest_order(betons, synthetic_folder):
    manifest = json.loads((betons / "manifest.json").read_text())
    info = manifest["splits"]["val"]
    for (image, label), (relative, expected) in zip(iter_samples(betons / "val.beton"), split_samples(betons, "val")):
        assert label == expected and manifest["classes"][label] == relative.split("/")[-2]
        assert image.dtype == np.uint8 and max(image.shape[:2]) <= info["settings"]["max_resolution"]


def test_verify_and_info_on_a_folder_without_betons_say_how_to_make_them(tmp_path, capsys):
    assert main(["verify", str(tmp_path)]) == 1
    assert main(["info", str(tmp_path / "nope")]) == 1
    assert "python -m convert" in capsys.readouterr().err


def test_info_prints_classes_counts_and_sizes(betons, capsys):
    assert main(["info", str(betons)]) == 0
    out = capsys.readouterr().out
    manifest = json.loads((betons / "manifest.json").read_text())
    assert f"{len(manifest['classes'])} classes" in out and manifest["classes"][0] in out
    assert str(manifest["splits"]["train"]["written"]) in out and "proportion" in out
