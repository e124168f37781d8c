"""`python -m convert adopt`: betons written by FFCV's own DatasetWriter (no manifest) become a data set
every loader, the trainer, evaluation and the benchmarks use like a converted one."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from ffcv.fields import FloatField, IntField, RGBImageField
from ffcv.writer import DatasetWriter
from rich.console import Console

from convert.__main__ import main as convert_main
from convert.adopt import adopt
from convert.sources import ConvertError
from fastpipe.data import build_loader
from fastpipe.data.beton import BetonError
from fastpipe.data.sample_table import split_samples

CLASSES = 3


class Pictures:
    """An indexed data set for DatasetWriter: class-coloured noisy images of 48-80 px; `order` says where
    the image and the label go in each sample tuple."""

    def __init__(self, count: int, seed: int, order=("image", "label"), extra=None):
        rng = np.random.default_rng(seed)
        self.labels = rng.integers(0, CLASSES, count)
        self.sizes = rng.integers(48, 81, (count, 2))
        self.seed, self.order, self.extra = seed, order, extra

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        rng = np.random.default_rng(self.seed * 10_000 + index)
        height, width = self.sizes[index]
        colour = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200]])[self.labels[index]]
        image = np.clip(colour + rng.normal(0, 25, (height, width, 3)), 0, 255).astype(np.uint8)
        item = {"image": image, "label": int(self.labels[index])}
        if self.extra:
            item[self.extra] = 0.5
        return tuple(item[name] for name in self.order)


def write_beton(path, dataset, fields):
    DatasetWriter(str(path), fields, num_workers=1).from_indexed_dataset(dataset)


@pytest.fixture(scope="module")
def imagenet_style(tmp_path_factory):
    """As ffcv-imagenet's write_imagenet.py writes them: fields 'image' (RGBImageField) and 'label'."""
    folder = tmp_path_factory.mktemp("ffcv-written")
    for split, count, mode in (("train", 60, "jpg"), ("val", 24, "raw")):
        write_beton(folder / f"{split}.beton", Pictures(count, seed=len(split)),
                    {"image": RGBImageField(write_mode=mode, max_resolution=96, jpeg_quality=90),
                     "label": IntField()})
    (folder / "classes.txt").write_text("red\ngreen\nblue\n")
    return folder


def test_betons_without_a_manifest_say_to_adopt_them_and_adopt_writes_it(imagenet_style):
    with pytest.raises(BetonError, match="python -m convert adopt"):
        build_loader("ffcv", imagenet_style, "train", batch_size=8, resolution=32, workers=1)
    assert convert_main(["adopt", str(imagenet_style), "--classes", str(imagenet_style / "classes.txt")]) == 0
    manifest = json.loads((imagenet_style / "manifest.json").read_text())
    assert manifest["classes"] == ["red", "green", "blue"] and manifest["layout"] == "adopted"
    train = manifest["splits"]["train"]
    expected = Pictures(60, seed=5)
    assert train["written"] == 60 and [label for _, label in split_samples(imagenet_style, "train")] == expected.labels.tolist()
    assert train["settings"]["write_mode"] == "jpg" and manifest["splits"]["val"]["settings"]["write_mode"] == "raw"
    assert train["image_stats"]["max_side"] <= 96 and train["sha256"] and train["size_bytes"] > 0
    assert train["image_stats"]["min_side"] == min(min(size) for size in expected.sizes) > 0
    assert train["fields"] == {"image": "image", "label": "label"}
    assert convert_main(["verify", str(imagenet_style)]) == 0   # every sample decodes, labels and sha256 agree


@pytest.mark.parametrize("backend", ["ffcv", "dali"])
def test_loaders_read_adopted_betons_with_their_labels(imagenet_style, backend):
    if not (imagenet_style / "manifest.json").exists():
        adopt(imagenet_style, console=Console(quiet=True))
    loader = build_loader(backend, imagenet_style, "val", batch_size=8, resolution=32, workers=1, shuffle=False,
                          drop_last=False, normalize=False)
    labels = torch.cat([batch_labels.clone() for _, batch_labels in loader])
    assert labels.tolist() == Pictures(24, seed=3).labels.tolist()


def test_train_evaluate_and_benchmark_run_on_adopted_betons(imagenet_style, tmp_path, monkeypatch):
    from benchmarks.__main__ import main as bench_main
    from fastpipe.config import load_config
    from fastpipe.evaluate import evaluate_run
    from fastpipe.report.run import RunReport
    from fastpipe.train import Trainer

    if not (imagenet_style / "manifest.json").exists():
        adopt(imagenet_style, classes_file=imagenet_style / "classes.txt", console=Console(quiet=True))
    config = load_config("cpu-smoke.toml", [f"--data.path={imagenet_style}", "--data.workers=1",
                                            "--data.batch_size=12", "--resolution.start=32", "--resolution.end=32",
                                            "--resolution.val=32", "--schedule.epochs=2"])
    monkeypatch.setattr(RunReport, "plot", lambda self, **kwargs: {})
    monkeypatch.setattr(RunReport, "plot_later", lambda self: None)
    assert Trainer(config, tmp_path / "run").fit() == 0
    summary = evaluate_run(tmp_path / "run", "best")
    predictions = pd.read_csv(tmp_path / "run" / "eval-best" / "predictions.csv")
    assert predictions["path"].tolist() == [f"val.beton#{index}" for index in range(24)]
    assert predictions["true"].tolist() == [["red", "green", "blue"][label] for label in Pictures(24, 3).labels]
    assert summary["top1"] > 1 / CLASSES   # colours are easy
    out = tmp_path / "loaders"
    assert bench_main(["loaders", "--data", str(imagenet_style), "--backends", "ffcv,dali", "--res", "32",
                       "--workers", "1", "--batch-size", "12", "--epochs", "1", "--out", str(out)]) == 0
    rows = json.loads((out / "results.json").read_text())["results"]
    assert {row["backend"] for row in rows} >= {"ffcv", "dali"}


def test_the_torch_baseline_says_adopted_betons_have_no_source_images(imagenet_style):
    if not (imagenet_style / "manifest.json").exists():
        adopt(imagenet_style, console=Console(quiet=True))
    with pytest.raises(BetonError, match="no source images .* Use backend 'ffcv' or 'dali'"):
        build_loader("torch", imagenet_style, "train", batch_size=8, resolution=32, workers=1)


def test_adopt_takes_beton_names_in_its_folder_and_warns_when_train_is_val(imagenet_style, tmp_path, capsys):
    folder = tmp_path / "with space"
    (folder / "sub").mkdir(parents=True)
    for split in ("train", "val"):
        (folder / "sub" / f"{split}.beton").write_bytes((imagenet_style / f"{split}.beton").read_bytes())
    assert convert_main(["adopt", str(folder), "--train", "sub/train.beton", "--val", "sub/val.beton"]) == 1
    assert "a file name, no folder" in capsys.readouterr().err and not (folder / "manifest.json").exists()
    (folder / "sub" / "train.beton").rename(folder / "train.beton")
    assert convert_main(["adopt", str(folder), "--val", "train.beton"]) == 0
    assert "validation will measure the training data" in capsys.readouterr().err


def test_fields_are_found_by_type_whatever_their_names_and_order(tmp_path):
    for split, count in (("training", 30), ("validation", 12)):
        write_beton(tmp_path / f"{split}.beton", Pictures(count, seed=count, order=("label", "image")),
                    {"lbl": IntField(), "picture": RGBImageField(write_mode="raw")})
    manifest = adopt(tmp_path, train="training.beton", val="validation.beton", console=Console(quiet=True))
    assert manifest["splits"]["train"]["fields"] == {"image": "picture", "label": "lbl"}
    assert manifest["classes"] == ["0", "1", "2"]
    for backend in ("ffcv", "dali"):
        loader = build_loader(backend, tmp_path, "train", batch_size=6, resolution=32, workers=1, shuffle=False,
                              drop_last=False, normalize=False)
        labels = torch.cat([batch_labels.clone() for _, batch_labels in loader])
        assert labels.tolist() == Pictures(30, seed=30).labels.tolist(), backend


def test_a_beton_whose_fields_do_not_fit_names_what_it_found_and_what_is_needed(tmp_path, capsys):
    for split in ("train", "val"):
        write_beton(tmp_path / f"{split}.beton", Pictures(6, seed=1, order=("image", "score"), extra="score"),
                    {"image": RGBImageField(), "score": FloatField()})
    with pytest.raises(ConvertError, match=r"'image' \(RGBImageField\), 'score' \(FloatField\).*IntField"):
        adopt(tmp_path, console=Console(quiet=True))
    assert convert_main(["adopt", str(tmp_path)]) == 1
    assert "FloatField" in capsys.readouterr().err
    assert not (tmp_path / "manifest.json").exists()
