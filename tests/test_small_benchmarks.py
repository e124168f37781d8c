"""`python -m benchmarks lr-sweep` and `python -m benchmarks quality` in their --quick forms: the commands run
end to end on a tiny generated set and write their tables, so they cannot rot."""
from __future__ import annotations

import gzip
import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from benchmarks.__main__ import main
from benchmarks.quality.lr_sweep import best_and_tied, within_2x
from benchmarks.quality.sets import FASHION_DIR, make_fashion, prepare, read_idx, train_once
from fastpipe.report.run import RunReport


@pytest.fixture(autouse=True)
def no_plots(monkeypatch):
    monkeypatch.setattr(RunReport, "plot", lambda self, **kwargs: {})
    monkeypatch.setattr(RunReport, "plot_later", lambda self: None)


def test_lr_sweep_quick_trains_each_lr_and_auto_and_compares_every_rule(tmp_path, capsys):
    assert main(["lr-sweep", "--quick", "--out", str(tmp_path)]) == 0
    [row] = json.loads((tmp_path / "results.json").read_text())
    assert row["set"] == "synthetic" and [item["lr"] for item in row["fixed"]] == [0.02, 2.0]
    assert row["seeds"] == 2 and all(len(item["top1_seeds"]) == 2 for item in row["fixed"])
    assert row["fixed"][0]["top1"] == pytest.approx(np.mean(row["fixed"][0]["top1_seeds"]))
    assert row["best_lr"] in (0.02, 2.0) and 0 <= row["auto_top1"] <= 1 and len(row["auto_lrs"]) == 2
    assert row["noise"] > 0 and row["best_range"][0] <= row["best_lr"] <= row["best_range"][1]
    assert set(row["rules"]) == {"edge", "steepest", "min_loss_div10", "valley", "min_loss", "min_loss_div2"}
    assert row["rules"][row["rule"]] == pytest.approx(row["auto_lr"])   # lr=auto trained with the chosen rule
    table = pd.read_csv(tmp_path / "results.csv")
    assert set(table["kind"]) == {"fixed", "auto", "rule:edge", "rule:steepest", "rule:min_loss_div10", "rule:valley", "rule:min_loss",
                                  "rule:min_loss_div2"}
    assert (tmp_path / "lr_sweep.png").stat().st_size > 10_000
    assert len(table[table["kind"] == "fixed"]) == 4 and set(table["seed"].dropna()) == {0, 1}
    assert "| synthetic | 120 / 40 | 2 |" in capsys.readouterr().out


def test_quality_quick_prints_top1_and_wall_time_per_recipe(tmp_path, capsys):
    assert main(["quality", "--quick", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())
    assert {(r["recipe"], r["set"]) for r in rows} == {("small", "synthetic"), ("r18-imagenet", "synthetic")}
    assert all(0 <= r["top1"] <= 1 and r["wall_s"] > 0 and r["epochs"] == 1 for r in rows)
    printed = capsys.readouterr().out
    assert "| small | synthetic | 120 | 1 |" in printed and (tmp_path / "results.md").is_file()

    # run again: the finished runs are reused (same wall time read back, not trained again) ...
    assert main(["quality", "--quick", "--out", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "results.json").read_text()) == rows
    # ... but never stand in for other settings or another size of the set
    run_dir, betons = tmp_path / "runs" / "small-synthetic", tmp_path / "data" / "synthetic" / "betons"
    with pytest.raises(RuntimeError, match=r"other settings \(schedule.epochs: 1 there, 3 now"):
        train_once("small.toml", betons, run_dir, ["--schedule.epochs=1", "--data.batch_size=16",
                                                   "--lr_finder.steps=10", "--data.workers=1", "--schedule.epochs=3"])
    with pytest.raises(RuntimeError, match="holds 120 train / 40 val images, but 50 / 4 per class make 500 / 40"):
        prepare("synthetic", tmp_path / "data", per_class=50, val_per_class=4)


def test_lrs_within_the_val_sets_noise_of_the_best_count_as_tied():
    fixed = [{"lr": 0.126, "top1": 0.897, "loss": 0.4}, {"lr": 0.317, "top1": 0.9638, "loss": 0.15},
             {"lr": 0.796, "top1": 0.9694, "loss": 0.12}, {"lr": 2.0, "top1": 0.841, "loss": 0.5}]
    best, noise, tied = best_and_tied(fixed, val_images=359)          # s.e. 0.009: 0.317 ties with 0.796
    assert best["lr"] == 0.796 and noise == pytest.approx(0.00906, abs=1e-4) and tied == [0.317, 0.796]
    assert best_and_tied(fixed, val_images=10_000)[2] == [0.796]      # a big val set separates them
    row = {"best_lr": 0.796, "best_range": [min(tied), max(tied)]}
    assert within_2x(0.2, row) and not within_2x(0.15, row) and within_2x(1.5, row) and not within_2x(1.7, row)


def write_idx(path, array: np.ndarray) -> None:
    """An MNIST-format IDX file, gzipped: magic (0, 0, 0x08, rank), big-endian dims, the bytes."""
    header = bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, ">u4").tobytes()
    with gzip.open(path, "wb") as file:
        file.write(header + array.astype(np.uint8).tobytes())


def test_idx_files_read_back_exactly_and_damage_is_named(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (7, 28, 28), dtype=np.uint8)
    write_idx(tmp_path / "images.gz", images)
    assert np.array_equal(read_idx(tmp_path / "images.gz"), images)
    with gzip.open(tmp_path / "short.gz", "wb") as file:          # header says 7 images, 6.5 follow
        file.write(gzip.decompress((tmp_path / "images.gz").read_bytes())[:-392])
    with pytest.raises(ValueError, match="truncated"):
        read_idx(tmp_path / "short.gz")
    (tmp_path / "header.idx").write_bytes(bytes([0, 0, 0x08, 3, 0, 0, 0, 7]))   # 3 dimensions, 1 given
    with pytest.raises(ValueError, match="end inside its header"):
        read_idx(tmp_path / "header.idx")
    (tmp_path / "text").write_bytes(b"not an idx file")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "text")


def test_fashion_set_is_written_per_class_with_the_test_split_as_val(tmp_path):
    rng = np.random.default_rng(1)
    source = tmp_path / "fashion-mnist"
    source.mkdir()
    for stem, count in (("train", 40), ("t10k", 20)):
        labels = np.arange(count) % 10
        images = (labels[:, None, None] * 25 + rng.integers(0, 5, (count, 28, 28))).astype(np.uint8)
        write_idx(source / f"{stem}-images-idx3-ubyte.gz", images)
        write_idx(source / f"{stem}-labels-idx1-ubyte.gz", labels)
    assert make_fashion(tmp_path / "out", per_class=3, source=source) == 10 * 3 + 20
    train = sorted((tmp_path / "out" / "train").iterdir())
    assert [p.name for p in train][:2] == ["0_tshirt_top", "1_trouser"] and len(train) == 10
    assert all(len(list(folder.iterdir())) == 3 for folder in train)
    assert sum(len(list(f.iterdir())) for f in (tmp_path / "out" / "val").iterdir()) == 20
    coat = np.asarray(Image.open(next((tmp_path / "out" / "val" / "4_coat").iterdir())))
    assert coat.shape == (28, 28, 3) and 100 <= coat.min() and coat.max() <= 104   # label 4's grey level


def test_missing_fashion_mnist_says_how_to_install_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        make_fashion(tmp_path / "out", source=tmp_path / "nowhere")


@pytest.mark.skipif(not (FASHION_DIR / "t10k-labels-idx1-ubyte.gz").is_file(),
                    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist; make fashion-mnist does)")
def test_the_installed_fashion_mnist_has_its_published_shape():
    labels = read_idx(FASHION_DIR / "t10k-labels-idx1-ubyte.gz")
    images = read_idx(FASHION_DIR / "t10k-images-idx3-ubyte.gz")
    assert images.shape == (10_000, 28, 28) and np.bincount(labels).tolist() == [1000] * 10
