"""Data where it lives: ImageNet's archives (nested per-synset tars, both val-label sources) and WebDataset
shards, converted in place. Every archive here is built by the test from generated JPEGs."""
from __future__ import annotations

import csv
import gzip
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import jpeg_bytes
from PIL import Image

from convert.__main__ import main
from fastpipe.data.beton import BetonError, BetonSamples, read_manifest
from fastpipe.data.sample_table import split_samples

SYNSETS = ["n00000003", "n00000001", "n00000002"]   # archive order is not label order: labels are sorted synsets
PER_SYNSET, VAL_PER_SYNSET = 5, 2
BROKEN = b"\xff\xd8\xff\xe0 cut short"
FAST = ["--workers", "2", "--write-mode", "raw", "--max-resolution", "64"]


def picture(label: int, index: int) -> bytes:
    """A JPEG whose colour says its class and whose size says its index."""
    colour = [(200, 40, 40), (40, 200, 40), (40, 40, 200)][label]
    pixels = np.zeros((40 + index, 48, 3), np.uint8) + np.array(colour, np.uint8)
    pixels[:, : 4 + index] = 255
    return jpeg_bytes(Image.fromarray(pixels))


def add(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


def tar_bytes(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        for name, data in files.items():
            add(archive, name, data)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("ilsvrc")
    sorted_synsets = sorted(SYNSETS)
    train = {}
    for synset in SYNSETS:
        label = sorted_synsets.index(synset)
        images = {f"{synset}_{i}.JPEG": picture(label, i) for i in range(PER_SYNSET)}
        if synset == "n00000002":
            images[f"{synset}_broken.JPEG"] = BROKEN   # a bad member: reported, never lost
        train[f"{synset}.tar"] = tar_bytes(images)
    (root / "train.tar").write_bytes(tar_bytes(train))
    val, truth = {}, []
    for number in range(1, VAL_PER_SYNSET * len(SYNSETS) + 1):
        synset = SYNSETS[number % len(SYNSETS)]
        val[f"ILSVRC2012_val_{number:08d}.JPEG"] = picture(sorted_synsets.index(synset), number)
        truth.append(synset)
    (root / "val.tar").write_bytes(tar_bytes(val))
    with open(root / "LOC_val_solution.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["ImageId", "PredictionString"])
        for number, synset in enumerate(truth, start=1):
            writer.writerow([f"ILSVRC2012_val_{number:08d}", f"{synset} 1 2 30 40 {synset} 3 4 20 30"])
    # the devkit numbers classes its own way (ILSVRC2012_ID), and meta.mat also lists non-leaf synsets
    from scipy.io import savemat

    ids = {synset: 3 - i for i, synset in enumerate(sorted_synsets)}
    fields = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height",
              "num_train_images"]
    rows = [(ids[s], s, f"thing {s[-1]}", "", 0, np.zeros(0), 0, PER_SYNSET) for s in sorted_synsets]
    rows.append((1001, "n09999999", "entity", "", 3, np.array([1, 2, 3]), 5, 0))
    table = np.empty(len(rows), dtype=[(name, object) for name in fields])
    for index, row in enumerate(rows):
        table[index] = row
    meta = io.BytesIO()
    savemat(meta, {"synsets": table})
    ground_truth = "".join(f"{ids[synset]}\n" for synset in truth).encode()
    devkit = tar_bytes({"ILSVRC2012_devkit_t12/data/meta.mat": meta.getvalue(),
                        "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt": ground_truth})
    (root / "devkit.tar.gz").write_bytes(gzip.compress(devkit))
    return {"root": root, "truth": truth}


def convert_imagenet(data: dict, out: Path, *labels: str) -> int:
    root = data["root"]
    return main(["imagenet", "--train", str(root / "train.tar"), "--val", str(root / "val.tar"), *labels,
                 "--out", str(out), *FAST])


def test_imagenet_archives_convert_in_place_with_sorted_synset_labels_from_either_label_source(imagenet, tmp_path):
    root = imagenet["root"]
    assert convert_imagenet(imagenet, tmp_path / "csv", "--val-labels", str(root / "LOC_val_solution.csv")) == 0
    assert convert_imagenet(imagenet, tmp_path / "devkit", "--devkit", str(root / "devkit.tar.gz")) == 0
    by_csv, by_devkit = read_manifest(tmp_path / "csv"), read_manifest(tmp_path / "devkit")
    assert by_csv["classes"] == sorted(SYNSETS)
    assert by_devkit["classes"] == [f"{synset}: thing {synset[-1]}" for synset in sorted(SYNSETS)]   # the words
    assert split_samples(tmp_path / "csv", "val") == split_samples(tmp_path / "devkit", "val")   # the same labels
    train = by_csv["splits"]["train"]
    assert train["written"] == PER_SYNSET * len(SYNSETS)
    assert train["skipped"][0]["path"] == "n00000002/n00000002_broken.JPEG" and len(train["skipped"]) == 1
    names = [name for name, _ in split_samples(tmp_path / "csv", "train")]
    assert names[0] == "n00000001/n00000001_0.JPEG" and names == sorted(names)   # label order, then archive order
    # each sample's pixels say its class: the label the converter gave matches the colour
    for split in ("train", "val"):
        samples = BetonSamples(tmp_path / "csv" / f"{split}.beton")
        for index, (_, label) in enumerate(split_samples(tmp_path / "csv", split)):
            pixels = samples.encoded(index).reshape(samples.height[index], samples.width[index], 3)
            assert int(np.argmax(pixels[:, -1].mean(axis=0))) == label
    expected = [sorted(SYNSETS).index(synset) for synset in imagenet["truth"]]
    assert [label for _, label in split_samples(tmp_path / "csv", "val")] == expected
    assert not list(Path(root).glob("n0*"))   # nothing was extracted beside the archives


def test_an_up_to_date_archive_conversion_is_a_no_op(imagenet, tmp_path, capsys):
    labels = ["--val-labels", str(imagenet["root"] / "LOC_val_solution.csv")]
    assert convert_imagenet(imagenet, tmp_path / "out", *labels) == 0
    before = (tmp_path / "out" / "train.beton").stat().st_mtime_ns
    capsys.readouterr()
    assert convert_imagenet(imagenet, tmp_path / "out", *labels) == 0
    assert "Up to date" in capsys.readouterr().err
    assert (tmp_path / "out" / "train.beton").stat().st_mtime_ns == before
    # the per-sample tables are outputs too: one gone is a clear error for its readers, and a re-run remakes it
    (tmp_path / "out" / "val.names.bin").unlink()
    with pytest.raises(BetonError, match="val.names.bin .* is missing. Re-create it"):
        split_samples(tmp_path / "out", "val")
    assert convert_imagenet(imagenet, tmp_path / "out", *labels) == 0
    assert "Up to date" not in capsys.readouterr().err and len(split_samples(tmp_path / "out", "val")) > 0


def test_val_label_csvs_saved_with_a_byte_order_mark_or_a_short_row(imagenet, tmp_path, capsys):
    text = (imagenet["root"] / "LOC_val_solution.csv").read_text()
    (tmp_path / "bom.csv").write_text("\ufeff" + text)   # as spreadsheet programs save it
    assert convert_imagenet(imagenet, tmp_path / "bom", "--val-labels", str(tmp_path / "bom.csv")) == 0
    lines = text.splitlines()
    (tmp_path / "short.csv").write_text("\n".join([lines[0], lines[1].split(",")[0], *lines[2:]]) + "\n")
    assert convert_imagenet(imagenet, tmp_path / "short", "--val-labels", str(tmp_path / "short.csv")) == 1
    assert "short.csv line 2: no synset" in capsys.readouterr().err
    first_id = lines[1].split(",")[0]
    other = next(synset for synset in SYNSETS if synset not in lines[1])
    (tmp_path / "twice.csv").write_text("\n".join([*lines, lines[1], f"{first_id},{other} 1 2 3 4"]) + "\n")
    assert convert_imagenet(imagenet, tmp_path / "twice", "--val-labels", str(tmp_path / "twice.csv")) == 1
    err = capsys.readouterr().err   # the same row twice is harmless; a second, other label is not
    assert f"lines 2 and {len(lines) + 2} give {first_id} two labels" in err


def test_a_devkit_whose_class_table_is_damaged_is_a_clear_error(imagenet, tmp_path, capsys):
    devkit = tar_bytes({"ILSVRC2012_devkit_t12/data/meta.mat": b"MATLAB 5.0 MAT-file, cut short",
                        "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt": b"1\n"})
    (tmp_path / "devkit.tar.gz").write_bytes(gzip.compress(devkit))
    assert convert_imagenet(imagenet, tmp_path / "out", "--devkit", str(tmp_path / "devkit.tar.gz")) == 1
    err = capsys.readouterr().err
    assert "meta.mat" in err and "not ILSVRC2012's class table" in err and "Traceback" not in err


@pytest.mark.parametrize("damage, message", [
    ("truncate", "truncated"),
    ("gzip", "compressed"),
    ("missing", "does not exist"),
    ("not_imagenet", "not a per-synset tar"),
])
def test_damaged_or_wrong_archives_are_clear_errors(imagenet, tmp_path, capsys, damage, message):
    train = tmp_path / "train.tar"
    data = (imagenet["root"] / "train.tar").read_bytes()
    if damage == "truncate":
        train.write_bytes(data[: len(data) // 2])
    elif damage == "gzip":
        train.write_bytes(gzip.compress(data))
    elif damage == "not_imagenet":
        train.write_bytes(tar_bytes({"cat.jpg": picture(0, 0)}))
    code = main(["imagenet", "--train", str(train), "--val", str(imagenet["root"] / "val.tar"), "--val-labels",
                 str(imagenet["root"] / "LOC_val_solution.csv"), "--out", str(tmp_path / "out"), *FAST])
    assert code == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_val_images_without_a_label_are_an_error_that_names_the_label_file(imagenet, tmp_path, capsys):
    labels = tmp_path / "LOC_val_solution.csv"
    lines = (imagenet["root"] / "LOC_val_solution.csv").read_text().splitlines()
    labels.write_text("\n".join(lines[:-1]) + "\n")   # the last image's row is gone
    assert convert_imagenet(imagenet, tmp_path / "out", "--val-labels", str(labels)) == 1
    err = capsys.readouterr().err
    assert "has no label" in err and str(labels) in err


# ------------------------------------------------------------------------------------------ WebDataset
def write_shards(folder: Path, count: int = 3, per_shard: int = 4) -> list[tuple[str, int]]:
    """Shards train-000000.tar ...: key.jpg + key.cls, one sample with only a JSON label, one without any."""
    folder.mkdir(parents=True, exist_ok=True)
    expected = []
    for shard in range(count):
        files = {}
        for i in range(per_shard):
            key, label = f"s{shard}_{i:03d}", (shard + i) % 3
            files[f"{key}.jpg"] = picture(label, i)
            files[f"{key}.cls"] = f"{label}\n".encode()
            files[f"{key}.json"] = json.dumps({"label": label, "source": "test"}).encode()
            expected.append((f"train-{shard:06d}.tar/{key}.jpg", label))
        files[f"s{shard}_nolabel.jpg"] = picture(0, 9)
        files[f"s{shard}_broken.jpg"] = BROKEN
        files[f"s{shard}_broken.cls"] = b"1"
        (folder / f"train-{shard:06d}.tar").write_bytes(tar_bytes(files))
    return expected


def test_webdataset_shards_convert_with_labels_from_cls_or_json_and_bad_samples_listed(tmp_path):
    expected = write_shards(tmp_path / "shards")
    (tmp_path / "classes.txt").write_text("red\ngreen\nblue\n")
    pattern = str(tmp_path / "shards" / "train-{000000..000002}.tar")
    for name, extra in (("cls", []), ("json", ["--label-key", "json.label"])):
        out = tmp_path / name
        assert main(["webdataset", "--train", pattern, "--val-fraction", "0.25", "--classes",
                     str(tmp_path / "classes.txt"), "--out", str(out), *FAST, *extra]) == 0
        manifest = read_manifest(out)
        assert manifest["classes"] == ["red", "green", "blue"]
        written = split_samples(out, "train") + split_samples(out, "val")
        assert sorted(map(tuple, written)) == sorted(expected)
        skipped = {item["path"]: item["reason"] for split in ("train", "val")
                   for item in manifest["splits"][split]["skipped"]}
        # with .cls labels the broken JPEGs are checked and fail; with JSON labels they have none to begin with
        broken = ".jpg" if name == "cls" else ""
        assert {path.rsplit("/", 1)[1] for path in skipped} == {
            "s0_nolabel", "s1_nolabel", "s2_nolabel", *(f"s{shard}_broken{broken}" for shard in range(3))}
        assert "no label" in skipped["train-000000.tar/s0_nolabel"]


def test_webdataset_pattern_and_label_errors_are_clear(tmp_path, capsys):
    write_shards(tmp_path / "shards", count=1)
    out = ["--out", str(tmp_path / "out"), *FAST]
    assert main(["webdataset", "--train", str(tmp_path / "shards" / "none-*.tar"), *out]) == 1
    assert "no file matches" in capsys.readouterr().err
    assert main(["webdataset", "--train", str(tmp_path / "shards" / "train-{000000..000003}.tar"), *out]) == 1
    err = capsys.readouterr().err
    assert "train-000001.tar" in err and "does not exist" in err
    assert main(["webdataset", "--train", str(tmp_path / "shards" / "train-*.tar"), "--label-key", "txt", *out]) == 1
    assert "No usable samples" in capsys.readouterr().err


def test_shards_and_a_folder_of_the_same_images_make_the_same_betons(tmp_path):
    """An archive source trains and evaluates like a converted folder: the same pixels, labels and order."""
    shards, folder = tmp_path / "shards", tmp_path / "folder"
    for split, count in (("train", 2), ("val", 1)):
        files = {}
        for i in range(6 * count):
            label = i % 3
            data = picture(label, i)
            files[f"{split}{i:03d}.jpg"], files[f"{split}{i:03d}.cls"] = data, str(label).encode()
            (folder / split / f"c{label}").mkdir(parents=True, exist_ok=True)
            (folder / split / f"c{label}" / f"{split}{i:03d}.jpg").write_bytes(data)
        shards.mkdir(exist_ok=True)
        (shards / f"{split}.tar").write_bytes(tar_bytes(files))
    (tmp_path / "classes.txt").write_text("c0\nc1\nc2\n")
    assert main(["folder", str(folder), "--out", str(tmp_path / "a"), *FAST]) == 0
    assert main(["webdataset", "--train", str(shards / "train.tar"), "--val", str(shards / "val.tar"),
                 "--classes", str(tmp_path / "classes.txt"), "--out", str(tmp_path / "b"), *FAST]) == 0
    for split in ("train", "val"):
        ours, theirs = BetonSamples(tmp_path / "a" / f"{split}.beton"), BetonSamples(tmp_path / "b" / f"{split}.beton")
        # the folder orders by class then name; the shards in archive order: compare by name
        names_a = [Path(name).name for name, _ in split_samples(tmp_path / "a", split)]
        names_b = [Path(name).name for name, _ in split_samples(tmp_path / "b", split)]
        assert sorted(names_a) == sorted(names_b)
        for index_a, name in enumerate(names_a):
            index_b = names_b.index(name)
            assert ours.labels[index_a] == theirs.labels[index_b]
            assert np.array_equal(ours.encoded(index_a), theirs.encoded(index_b))


# --------------------------------------------------------------------------------------------- parquet
@pytest.mark.parametrize("damage", ["cut_at_a_member", "cut_in_a_header", "corrupt_header"])
def test_a_shard_damaged_between_members_is_an_error_not_a_shorter_shard(tmp_path, capsys, damage):
    """tarfile ends its member list quietly at a header it cannot read or at a cut between members: the scan
    checks for the end-of-archive block, so the members after the damage are never lost unreported."""
    files = {f"s{i}.{ext}": (picture(i % 3, i) if ext == "jpg" else str(i % 3).encode())
             for i in range(4) for ext in ("jpg", "cls")}
    data = bytearray(tar_bytes(files))
    third = data.index(b"s2.jpg")   # the third sample's header
    if damage == "cut_at_a_member":
        data = data[:third]
    elif damage == "cut_in_a_header":
        data = data[:third + 100]
    else:
        data[third + 148:third + 156] = b"garbage!"   # its checksum field
    (tmp_path / "train-0.tar").write_bytes(bytes(data))
    assert main(["webdataset", "--train", str(tmp_path / "train-0.tar"), "--out", str(tmp_path / "out"),
                 *FAST]) == 1
    err = capsys.readouterr().err
    assert "truncated or corrupt after member s1.cls" in err and "download it again" in err
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_duplicate_keys_and_members_are_listed_not_merged_and_labels_must_be_integers(tmp_path):
    """A sample is a run of members with one key, as WebDataset reads it: a key that comes back later and an
    extension twice in a row are listed, not merged into another sample; 1.9 or true is not a label."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        for name, data in [("dup.jpg", picture(0, 0)), ("dup.cls", b"0"), ("dup.json", b'{"label": 0}'),
                           ("twice.jpg", picture(1, 1)), ("twice.cls", b"1"), ("twice.cls", b"2"),
                           ("twice.json", b'{"label": 1}'),
                           ("float.jpg", picture(2, 2)), ("float.cls", b"2"), ("float.json", b'{"label": 1.9}'),
                           ("yes.jpg", picture(2, 3)), ("yes.cls", b"2"), ("yes.json", b'{"label": true}'),
                           ("dup.jpg", picture(1, 4)), ("dup.cls", b"1")]:   # the key again, further on
            add(archive, name, data)
    (tmp_path / "train-0.tar").write_bytes(buffer.getvalue())
    (tmp_path / "val-0.tar").write_bytes(tar_bytes({f"v{i}.{ext}": (picture(i, i) if ext == "jpg" else
                                                                    json.dumps({"label": i}).encode())
                                                    for i in range(3) for ext in ("jpg", "json")}))
    expected = {"cls": {"dup": 0, "twice": 1, "float": 2, "yes": 2}, "json.label": {"dup": 0, "twice": 1}}
    for label_key, labels in expected.items():
        out = tmp_path / label_key
        val = ["--val", str(tmp_path / "val-0.tar")] if label_key != "cls" else ["--val-fraction", "0.5"]
        assert main(["webdataset", "--train", str(tmp_path / "train-0.tar"), *val, "--label-key", label_key,
                     "--out", str(out), *FAST]) == 0
        manifest = read_manifest(out)
        written = dict(split_samples(out, "train") + (split_samples(out, "val") if label_key == "cls" else []))
        assert written == {f"train-0.tar/{key}.jpg": label for key, label in labels.items()}
        reasons = {item["path"]: item["reason"] for split in ("train", "val")
                   for item in manifest["splits"][split]["skipped"]}
        assert "duplicate key" in reasons["train-0.tar/dup"]
        assert "duplicate member" in reasons["train-0.tar/twice.cls"]
        if label_key == "json.label":
            assert "not an integer" in reasons["train-0.tar/float"] and "not an integer" in reasons["train-0.tar/yes"]
    from convert.webdataset import parse_label
    for text in (b'{"label": 1.9}', b'{"label": true}', b'{"label": "x"}'):
        with pytest.raises(ValueError, match="not an integer"):
            parse_label(text, "json.label", "k")
    assert parse_label(b'{"label": 3}', "json.label", "k") == 3 and parse_label(b" 2\n", "cls", "k") == 2


def write_parquet(path: Path, rows: list[tuple[bytes | None, int | None]], *, struct: bool = True,
                  names: list[str] | None = None, row_group_size: int = 3) -> None:
    """The Hugging Face datasets layout: image {bytes, path} (or plain binary), label, ClassLabel names."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    images = ([{"bytes": data, "path": f"img{i}.jpg"} for i, (data, _) in enumerate(rows)] if struct
              else [data for data, _ in rows])
    table = pa.table({"image": images, "label": pa.array([label for _, label in rows], type=pa.int64())})
    if names:
        features = {"image": {"_type": "Image"}, "label": {"names": names, "_type": "ClassLabel"}}
        table = table.replace_schema_metadata({"huggingface": json.dumps({"info": {"features": features}})})
    pq.write_table(table, path, row_group_size=row_group_size)


def test_parquet_shards_convert_with_class_names_from_the_metadata_and_bad_rows_listed(tmp_path):
    rows = [(picture(i % 3, i), i % 3) for i in range(9)]
    rows[4] = (BROKEN, 1)          # undecodable bytes
    rows[7] = (picture(1, 7), None)   # no label
    write_parquet(tmp_path / "train-00000.parquet", rows[:6], names=["red", "green", "blue"])
    write_parquet(tmp_path / "train-00001.parquet", rows[6:], names=["red", "green", "blue"])
    write_parquet(tmp_path / "val-00000.parquet", [(picture(i % 3, i), i % 3) for i in range(6)], struct=False)
    out = tmp_path / "out"
    assert main(["parquet", "--train", str(tmp_path / "train-*.parquet"), "--val", str(tmp_path / "val-*.parquet"),
                 "--out", str(out), *FAST]) == 0
    manifest = read_manifest(out)
    assert manifest["classes"] == ["red", "green", "blue"]
    train = manifest["splits"]["train"]
    assert train["written"] == 7 and manifest["splits"]["val"]["written"] == 6
    reasons = {item["path"]: item["reason"] for item in train["skipped"]}
    assert set(reasons) == {"train-00000.parquet/rg1/row1", "train-00001.parquet/rg0/row1"}
    assert "no usable label" in reasons["train-00001.parquet/rg0/row1"]
    samples = BetonSamples(out / "train.beton")
    for index, (_, label) in enumerate(split_samples(out, "train")):   # each pixel colour says the label it got
        pixels = samples.encoded(index).reshape(samples.height[index], samples.width[index], 3)
        assert int(np.argmax(pixels[:, -1].mean(axis=0))) == label


def test_a_boolean_label_column_is_listed_as_unusable_rows_not_a_crash(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    images = [{"bytes": picture(i % 2, i), "path": f"img{i}.jpg"} for i in range(4)]
    pq.write_table(pa.table({"image": images, "label": [True, False, True, False]}), tmp_path / "a.parquet")
    assert main(["parquet", "--train", str(tmp_path / "a.parquet"), "--out", str(tmp_path / "out"), *FAST]) == 1
    err = capsys.readouterr().err
    assert "No usable" in err and "no usable label in 'label' (True)" in err


def test_links_and_files_that_are_not_images_in_archives_are_listed_with_their_reason(imagenet, tmp_path):
    def link(name: str, target: str) -> tarfile.TarInfo:
        info = tarfile.TarInfo(name)
        info.type, info.linkname = tarfile.SYMTYPE, target
        return info

    def with_extras(data: bytes, extras: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
        buffer = io.BytesIO()
        with tarfile.open(fileobj=io.BytesIO(data)) as source, tarfile.open(fileobj=buffer, mode="w",
                                                                           format=tarfile.USTAR_FORMAT) as out:
            for info in source:
                out.addfile(info, source.extractfile(info))
            for info, payload in extras:
                if payload is not None:
                    info.size = len(payload)
                out.addfile(info, io.BytesIO(payload) if payload is not None else None)
        return buffer.getvalue()

    root = imagenet["root"]
    with tarfile.open(root / "train.tar") as train:
        synset_tars = {info.name: train.extractfile(info).read() for info in train}
    synset_tars["n00000001.tar"] = with_extras(synset_tars["n00000001.tar"], [
        (link("n00000001_link.JPEG", "n00000001_0.JPEG"), None), (tarfile.TarInfo("notes.txt"), b"hello")])
    (tmp_path / "train.tar").write_bytes(tar_bytes(synset_tars))
    (tmp_path / "val.tar").write_bytes(with_extras((root / "val.tar").read_bytes(),
                                                   [(link("ILSVRC2012_val_99999999.JPEG", "x.JPEG"), None)]))
    out = tmp_path / "out"
    assert main(["imagenet", "--train", str(tmp_path / "train.tar"), "--val", str(tmp_path / "val.tar"),
                 "--val-labels", str(root / "LOC_val_solution.csv"), "--out", str(out), *FAST]) == 0
    manifest = read_manifest(out)
    reasons = {item["path"]: item["reason"] for split in ("train", "val")
               for item in manifest["splits"][split]["skipped"]}
    assert reasons["n00000001/n00000001_link.JPEG"].startswith("a link to n00000001_0.JPEG")
    assert reasons["n00000001/notes.txt"] == "not an image file name"
    assert reasons["ILSVRC2012_val_99999999.JPEG"].startswith("a link to x.JPEG")
    assert manifest["splits"]["train"]["written"] == PER_SYNSET * len(SYNSETS)

    shard = with_extras(tar_bytes({f"{key}{i}.{ext}": picture(label, i) if ext == "jpg" else str(label).encode()
                                   for key, label in (("a", 0), ("c", 1)) for i in range(2) for ext in ("jpg", "cls")}),
                        [(link("b.jpg", "a0.jpg"), None), (tarfile.TarInfo("b.cls"), b"0")])
    (tmp_path / "shard.tar").write_bytes(shard)
    assert main(["webdataset", "--train", str(tmp_path / "shard.tar"), "--val-fraction", "0.5",
                 "--out", str(tmp_path / "wds"), *FAST]) == 0
    skipped = {item["path"]: item["reason"] for split in ("train", "val")
               for item in read_manifest(tmp_path / "wds")["splits"][split]["skipped"]}
    assert skipped["shard.tar/b.jpg"].startswith("a link to a0.jpg") and "no image member" in skipped["shard.tar/b"]


def test_an_image_cell_with_only_a_path_is_listed_with_what_to_do(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    images = [{"bytes": None if i == 2 else picture(i % 3, i), "path": f"img{i}.jpg"} for i in range(6)]
    pq.write_table(pa.table({"image": images, "label": [i % 3 for i in range(6)]}), tmp_path / "a.parquet")
    assert main(["parquet", "--train", str(tmp_path / "a.parquet"), "--val-fraction", "0.5", "--out",
                 str(tmp_path / "out"), *FAST]) == 0
    manifest = read_manifest(tmp_path / "out")
    reasons = {item["path"]: item["reason"] for split in ("train", "val")
               for item in manifest["splits"][split]["skipped"]}
    assert list(reasons) == ["a.parquet/rg0/row2"] and "only a path (img2.jpg)" in reasons["a.parquet/rg0/row2"]


def test_parquet_errors_name_the_file_and_the_column(tmp_path, capsys):
    write_parquet(tmp_path / "a.parquet", [(picture(0, 0), 0)] * 4)
    out = ["--out", str(tmp_path / "out"), *FAST]
    assert main(["parquet", "--train", str(tmp_path / "a.parquet"), "--label-column", "class", *out]) == 1
    err = capsys.readouterr().err
    assert "no column 'class'" in err and "a.parquet" in err
    (tmp_path / "b.parquet").write_bytes(b"PAR1 not really")
    assert main(["parquet", "--train", str(tmp_path / "b.parquet"), *out]) == 1
    assert "not a readable parquet file" in capsys.readouterr().err


def test_the_torch_baseline_says_archive_betons_have_no_image_files(tmp_path):
    write_shards(tmp_path / "shards", count=1, per_shard=6)
    assert main(["webdataset", "--train", str(tmp_path / "shards" / "train-000000.tar"), "--val-fraction", "0.34",
                 "--out", str(tmp_path / "out"), *FAST]) == 0
    from fastpipe.data import build_loader
    from fastpipe.data.beton import BetonError

    with pytest.raises(BetonError, match="converted from archives"):
        build_loader("torch", tmp_path / "out", "val", batch_size=2, resolution=32, workers=1)
    loader = build_loader("ffcv", tmp_path / "out", "val", batch_size=2, resolution=32, workers=1, shuffle=False,
                          drop_last=False)
    assert sum(len(labels) for _, labels in loader) == read_manifest(tmp_path / "out")["splits"]["val"]["written"]


def test_the_scan_reports_its_progress_in_bytes_of_the_archives(tmp_path):
    """A long header scan shows MB/s and ETA: the bar moves to the end of the last member of every shard."""
    from rich.console import Console

    from convert.members import ScanProgress, scan_progress, scan_tar

    write_shards(tmp_path, count=2)
    paths = sorted(tmp_path.glob("*.tar"))

    class Recorder:
        def __init__(self):
            self.done = 0

        def add_task(self, description, total):
            self.total = total
            return 0

        def advance(self, task, delta):
            assert delta >= 0
            self.done += delta

    recorder = Recorder()
    progress = ScanProgress(recorder, paths, "shards")
    ends = [max(info.offset_data + info.size for _, info in scan_tar(path, progress=progress)) for path in paths]
    assert recorder.total == sum(path.stat().st_size for path in paths) and recorder.done == sum(ends)
    console = Console(file=io.StringIO(), force_terminal=False, width=120)
    with scan_progress(console, paths, "shards") as shown:
        for path in paths:
            list(scan_tar(path, progress=shown))
    assert "scan shards" in console.file.getvalue()


def test_a_run_trains_and_evaluates_on_betons_converted_from_the_archives(imagenet, tmp_path):
    """Archive-converted betons are ordinary betons: a run trains on them, and its evaluation names each val
    sample by its member in the val archive and each class by its synset."""
    import pandas as pd

    from fastpipe.config import load_config
    from fastpipe.evaluate import evaluate_run
    from fastpipe.report.run import RunReport
    from fastpipe.train import Trainer

    out, run = tmp_path / "betons", tmp_path / "run"
    assert convert_imagenet(imagenet, out, "--val-labels", str(imagenet["root"] / "LOC_val_solution.csv")) == 0
    tiny = ["--data.workers=1", "--data.batch_size=4", "--resolution.start=32", "--resolution.end=32",
            "--resolution.val=32", "--schedule.epochs=1", "--train.log_every=100", "--optim.lr=0.1",
            "--model.width=8", "--data.backend=ffcv"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(RunReport, "plot", lambda self, **kwargs: {})
        patch.setattr(RunReport, "plot_later", lambda self: None)
        config = load_config("configs/cpu-smoke.toml", [f"--data.path={out}", f"--run.dir={run}", *tiny])
        assert Trainer(config, run).fit() == 0
        summary = evaluate_run(run, out_dir=tmp_path / "eval")
    predictions = pd.read_csv(summary["files"]["predictions"])
    assert len(predictions) == VAL_PER_SYNSET * len(SYNSETS)
    assert predictions["path"].tolist() == [f"ILSVRC2012_val_{n:08d}.JPEG" for n in range(1, len(predictions) + 1)]
    assert predictions["true"].tolist() == imagenet["truth"]   # class names are the synsets
