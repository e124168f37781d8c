"""Per-sample names and labels live beside the manifest (memory-mapped), not in it; old manifests still load."""
from __future__ import annotations

import json

import numpy as np
import pytest

from fastpipe.data.beton import BetonError, read_manifest
from fastpipe.data.sample_table import SampleTable, split_samples, write_sample_table


def test_a_written_table_reads_back_with_names_labels_and_sizes(tmp_path):
    names = ["a/ü 1.jpg", "b/2.JPEG", "shard-000.tar/key3.jpg"]
    entry = write_sample_table(tmp_path, "val", names, [2, 0, 1], [10, 20, 30], [11, 21, 31])
    manifest = {"splits": {"val": {"beton": "val.beton", "sample_table": entry}}}
    table = SampleTable(tmp_path, manifest, "val")
    assert isinstance(table.rows, np.memmap) and len(table) == 3
    assert table.labels.tolist() == [2, 0, 1] and table.rows["width"].tolist() == [10, 20, 30]
    assert table.names() == names and table.pairs() == [[n, label] for n, label in zip(names, [2, 0, 1])]
    unnamed = write_sample_table(tmp_path, "train", None, [0, 1], [5, 5], [5, 5])   # adopted betons
    manifest["splits"]["train"] = {"beton": "x.beton", "sample_table": unnamed}
    assert SampleTable(tmp_path, manifest, "train").names() == ["x.beton#0", "x.beton#1"]
    assert not (tmp_path / "train.names.bin").exists()


def test_names_stream_in_chunks_and_predictions_are_written_in_pieces(tmp_path, monkeypatch):
    """predictions.csv at any size: the names come from names.bin a chunk at a time and the CSV is written
    a chunk of rows at a time, the same file as one write."""
    import pandas as pd

    from fastpipe.evaluate import EvalResult, manifest_sample_ids, write_predictions
    from fastpipe.report import classes

    names = [f"class{i % 3}/é{i}.jpg" for i in range(10)]
    labels = np.array([i % 3 for i in range(10)])
    manifest = {"splits": {"val": {"beton": "val.beton",
                                   "sample_table": write_sample_table(tmp_path, "val", names, labels)}}}
    table = SampleTable(tmp_path, manifest, "val")
    assert [len(chunk) for chunk in table.iter_names(3)] == [3, 3, 3, 1]
    assert [name for chunk in table.iter_names(4) for name in chunk] == names
    assert manifest_sample_ids(manifest, "val", labels, tmp_path) is not None
    preds = (labels + np.arange(10) % 2) % 3
    result = EvalResult(loss=1.0, top1=0.5, top5=1.0, targets=labels, preds=preds,
                        confidences=np.linspace(0.1, 1, 10, dtype=np.float32), count=10, topk=3, num_classes=3,
                        classes=["a", "b", "c"], sample_ids=manifest_sample_ids(manifest, "val", labels, tmp_path))
    whole = pd.read_csv(write_predictions(result, tmp_path / "whole.csv"))
    monkeypatch.setattr(classes, "ROWS_PER_WRITE", 3)
    pieces = pd.read_csv(write_predictions(result, tmp_path / "pieces.csv"))
    assert (tmp_path / "whole.csv").read_bytes() == (tmp_path / "pieces.csv").read_bytes()
    assert pieces["path"].tolist() == names and pieces["true"].tolist() == [["a", "b", "c"][i] for i in labels]
    assert pieces["predicted"].tolist() == [["a", "b", "c"][i] for i in preds] and len(whole) == 10
    (tmp_path / "val.names.bin").write_bytes("\0".join(names[:-1]).encode() + b"\0")   # a name short
    with pytest.raises(BetonError, match="9 names for 10 samples"):
        list(SampleTable(tmp_path, manifest, "val").iter_names(4))


def test_an_earlier_manifest_with_the_samples_inline_loads_the_same(tmp_path):
    pairs = [["a/1.jpg", 1], ["b/2.jpg", 0]]
    inline = {"splits": {"val": {"samples": pairs}}}
    assert SampleTable(tmp_path, inline, "val").pairs() == pairs
    assert SampleTable(tmp_path, inline, "val").labels.tolist() == [1, 0]


def test_a_missing_or_mismatched_table_is_a_clear_error(tmp_path):
    entry = write_sample_table(tmp_path, "val", ["a"], [0])
    manifest = {"splits": {"val": {"sample_table": {**entry, "count": 2}}}}
    with pytest.raises(BetonError, match="does not match the manifest"):
        SampleTable(tmp_path, manifest, "val")
    (tmp_path / entry["rows"]).unlink()
    with pytest.raises(BetonError, match="missing or unreadable"):
        SampleTable(tmp_path, {"splits": {"val": {"sample_table": entry}}}, "val")


def test_converted_manifests_hold_no_per_sample_lists(betons):
    manifest = read_manifest(betons)
    text = (betons / "manifest.json").read_text()
    for split in ("train", "val"):
        assert "samples" not in manifest["splits"][split]
        assert len(split_samples(betons, split)) == manifest["splits"][split]["written"]
    # what is left per sample is the skipped list (none here): the manifest's size does not grow with the set
    assert len(text) < 8_000, len(text)
    assert json.loads(text)["splits"]["train"]["sample_table"]["rows"] == "train.samples.npy"


def test_file_names_that_are_not_utf8_convert_load_and_are_written_to_predictions(tmp_path):
    """A Latin-1 file name (bytes that are not UTF-8, as old archives and Windows copies have): converted,
    kept byte for byte in the sample table so the torch baseline opens it, escaped in predictions.csv."""
    import os

    from PIL import Image

    from convert.__main__ import main
    from fastpipe.data import build_loader
    from fastpipe.evaluate import EvalResult, manifest_sample_ids, write_predictions

    rng = np.random.default_rng(3)
    for split in ("train", "val"):
        for label in ("a", "b"):
            folder = os.fsencode(tmp_path / "images" / split / label)
            os.makedirs(folder)
            for index in range(3):
                name = os.path.join(folder, b"caf\xe9-%d.jpg" % index if index == 0 else b"%d.jpg" % index)
                Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(os.fsdecode(name), "JPEG")
    out = tmp_path / "out"
    assert main(["folder", str(tmp_path / "images"), "--out", str(out), "--workers", "1", "--write-mode", "raw"]) == 0
    names = [name for name, _ in split_samples(out, "val")]
    assert "val/a/caf\udce9-0.jpg" in names and os.fsencode(names[2]) == b"val/a/caf\xe9-0.jpg"
    loader = build_loader("torch", out, "val", batch_size=3, resolution=16, workers=1, seed=0)
    assert sum(len(batch) for batch, _ in loader) == 6
    assert main(["folder", str(tmp_path / "images"), "--out", str(out), "--workers", "1", "--write-mode",
                 "raw"]) == 0   # the fingerprint takes the name too (an up-to-date re-run)
    labels = np.array([label for _, label in split_samples(out, "val")])
    manifest = read_manifest(out)
    result = EvalResult(loss=1.0, top1=1.0, top5=1.0, targets=labels, preds=labels,
                        confidences=np.ones(6, dtype=np.float32), count=6, topk=2, num_classes=2,
                        classes=["a", "b"], sample_ids=manifest_sample_ids(manifest, "val", labels, out))
    text = write_predictions(result, tmp_path / "predictions.csv").read_text(encoding="utf-8")
    assert "val/a/caf\\xe9-0.jpg" in text
