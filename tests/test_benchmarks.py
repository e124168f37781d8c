"""The benchmark suite end to end on tiny data: reports are well formed, compare catches regressions,
autotune stays inside its budget and writes settings the trainer and the loaders accept."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tomllib

from benchmarks.__main__ import main
from benchmarks.compare import compare_rows
from benchmarks.loaders import add_ratios
from benchmarks.resources import ResourceSampler
from benchmarks.search import Budget, successive_halving

REQUIRED_COLUMNS = {"backend", "split", "res", "workers", "batch_size", "img_per_s", "img_per_s_min",
                    "img_per_s_max", "peak_rss_mb", "cpu_util_pct", "ratio_to_torch"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class FakeClock:
    """Time that moves only when a trial says so, so budget logic is tested without sleeping."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_successive_halving_finds_the_best_without_a_full_grid():
    calls = []

    def score(candidate, units):
        calls.append((candidate, units))
        return -(candidate - 5) ** 2

    result = successive_halving(list(range(1, 9)), score, Budget(1e9), min_units=2)
    assert result.best == 5 and result.complete
    assert len(calls) < 8 * 3   # a full grid over the same rungs would measure every candidate each time
    assert [units for candidate, units in calls if candidate == 5] == [2, 4, 8, 16]
    assert {candidate for candidate, units in calls if units == 4} == {3, 4, 5, 6}


def test_successive_halving_stops_before_a_trial_that_would_overrun_the_budget():
    clock = FakeClock()

    def slow(candidate, units):
        clock.now += 3.0
        return float(candidate)

    result = successive_halving([1, 2, 3, 4, 5], slow, Budget(10.0, clock), min_units=1)
    assert not result.complete and "budget" in result.reason
    assert clock.now <= 10.0
    assert len(result.trials) == 3 and result.best == 3   # the best of what was measured


def test_a_failing_candidate_is_dropped_with_its_error():
    def fragile(candidate, units):
        if candidate == 64:
            raise RuntimeError("CUDA out of memory")
        return float(candidate)

    result = successive_halving([16, 32, 64], fragile, Budget(1e9))
    assert result.best == 32
    assert any("out of memory" in trial.note for trial in result.trials if trial.candidate == 64)


def test_resource_sampler_counts_child_process_memory():
    child_code = "import time; block = bytearray(300 * 2**20); time.sleep(1.0)"
    with ResourceSampler(interval_s=0.02) as alone:
        pass
    with ResourceSampler(interval_s=0.02) as usage:
        subprocess.run([sys.executable, "-c", child_code], check=True)
    assert usage.peak_rss_mb > alone.peak_rss_mb + 250


def rows(rates: dict[tuple, float]) -> list[dict]:
    return [{"backend": backend, "split": "train", "res": res, "workers": 2, "batch_size": 64,
             "img_per_s": rate} for (backend, res), rate in rates.items()]


def write_results(path, rates):
    path.write_text(json.dumps({"machine": {"cpu_model": "test"}, "results": rows(rates)}))
    return str(path)


def test_compare_flags_a_planted_regression_and_fails_only_with_the_flag(tmp_path, capsys):
    before = {("ffcv", 160): 2000.0, ("torch", 160): 1000.0, ("dali", 160): 1500.0}
    after = {("ffcv", 160): 1600.0, ("torch", 160): 1010.0, ("dali", 160): 1800.0}
    a, b = write_results(tmp_path / "a.json", before), write_results(tmp_path / "b.json", after)
    status = {entry["backend"]: entry["status"] for entry in compare_rows(rows(before), rows(after))}
    assert status == {"ffcv": "regression", "torch": "same", "dali": "gain"}
    assert main(["compare", a, b]) == 0
    assert main(["compare", a, b, "--fail-on-regression"]) == 1
    assert "regression" in capsys.readouterr().out
    assert main(["compare", a, a, "--fail-on-regression"]) == 0
    # A looser threshold turns the 20% drop into noise.
    assert main(["compare", a, b, "--fail-on-regression", "--threshold", "0.25"]) == 0


def test_compare_lists_rows_missing_from_one_side():
    compared = compare_rows(rows({("ffcv", 160): 1.0}), rows({("ffcv", 192): 1.0}))
    assert [entry["status"] for entry in compared] == ["only in A", "only in B"]


def test_compare_rejects_a_file_that_is_not_a_report(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(SystemExit, match="results"):
        main(["compare", str(bad), str(bad)])


def test_loaders_cli_writes_a_complete_report(betons, tmp_path):
    # torch only (plus an unknown backend) keeps this short: FFCV's JIT compile alone takes ~10 s here.
    # Each case runs in its own spawned process (the default), so this also covers that path.
    out = tmp_path / "report"
    code = main(["loaders", "--data", str(betons), "--backends", "nosuch", "--res", "32,40",
                 "--workers", "1", "--batch-size", "8", "--epochs", "2", "--out", str(out),
                 "--json", str(tmp_path / "copy.json")])
    assert code == 0
    train_count = json.loads((betons / "manifest.json").read_text())["splits"]["train"]["written"]
    payload = json.loads((out / "results.json").read_text())
    assert payload == json.loads((tmp_path / "copy.json").read_text())
    assert {"cpu_model", "cores_logical", "gpu", "versions"} <= payload["machine"].keys()
    assert {"torch", "ffcv", "dali"} <= payload["machine"]["versions"].keys()
    # The baseline is added when not asked for; the unknown backend is a note, not a crash.
    assert {(row["backend"], row["res"], row["workers"]) for row in payload["results"]} == {
        ("torch", res, 1) for res in (32, 40)}
    assert any("nosuch" in note and "skipped" in note for note in payload["notes"])
    for row in payload["results"]:
        assert REQUIRED_COLUMNS <= row.keys()
        assert row["img_per_s_min"] <= row["img_per_s"] <= row["img_per_s_max"]
        assert row["img_per_s"] > 0 and row["peak_rss_mb"] > 0 and row["ratio_to_torch"] == 1.0
        assert row["decoded_px_per_output_px"] > 0   # the baseline decodes every original file whole
        assert row["images_per_epoch"] == train_count // 8 * 8   # drop_last: full batches only

    with open(out / "results.csv", newline="") as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == len(payload["results"]) and REQUIRED_COLUMNS <= table[0].keys()
    markdown = (out / "results.md").read_text().splitlines()
    header = next(i for i, line in enumerate(markdown) if line.startswith("| backend"))
    assert len([line for line in markdown[header + 2:] if line.startswith("|")]) == len(payload["results"])
    assert any("nosuch" in line for line in markdown)
    for name in ("img_per_s_vs_workers.png", "img_per_s_vs_resolution.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC


def test_each_row_is_divided_by_the_matching_torch_row():
    measured = [{"backend": backend, "split": "train", "res": res, "workers": 2, "batch_size": 64,
                 "img_per_s": rate} for backend, res, rate in
                [("torch", 160, 1000.0), ("torch", 192, 500.0), ("ffcv", 160, 2500.0), ("ffcv", 192, 1500.0),
                 ("dali", 224, 900.0)]]
    add_ratios(measured)
    assert [row["ratio_to_torch"] for row in measured] == [1.0, 1.0, 2.5, 3.0, None]


def test_loaders_cli_rejects_a_folder_without_betons(tmp_path):
    with pytest.raises(SystemExit, match="convert"):
        main(["loaders", "--data", str(tmp_path), "--out", str(tmp_path / "report")])


def write_config(path, betons, backend="torch"):
    path.write_text(f"""
[data]
path = "{betons}"
backend = "{backend}"
workers = 1
batch_size = 8

[resolution]
start = 32
end = 32
ramp_start = 0
ramp_end = 0
val = 32

[model]
arch = "resnet18"
blurpool = false

[schedule]
epochs = 1
""")
    return path


def test_autotune_stays_in_budget_and_writes_settings_that_run(betons, tmp_path):
    import torch

    from fastpipe.config import load_config
    from fastpipe.data import build_loader

    config_path = write_config(tmp_path / "tiny.toml", betons)
    tuned_path = tmp_path / "autotune.toml"
    budget = 6.0
    code = main(["autotune", "--config", str(config_path), "--budget-s", str(budget), "--out", str(tuned_path),
                 "--device", "cpu", "--min-batch-size", "4", "--max-batch-size", "16"])
    assert code == 0
    report = json.loads(tuned_path.with_suffix(".json").read_text())
    assert report["trials"], "autotune measured nothing"
    assert all(trial["started_s"] < budget for trial in report["trials"])
    assert {"loader", "batch"} & {trial["phase"] for trial in report["trials"]}
    assert tomllib.loads(tuned_path.read_text())["data"].keys() >= {"workers", "batch_size"}

    config = load_config(config_path, tune=tuned_path)
    assert config.data.workers in (1, 2) and config.data.batch_size in (4, 8, 16)
    train_images = json.loads((betons / "manifest.json").read_text())["splits"]["train"]["written"]
    assert config.data.batch_size * 8 <= train_images   # never so large that an epoch is a handful of steps
    loader = build_loader(backend=config.data.backend, data=config.data.path, batch_size=config.data.batch_size,
                          resolution=32, workers=config.data.workers, **config.data.options_for(config.data.backend))
    images, labels = next(iter(loader))
    assert images.shape == (config.data.batch_size, 3, 32, 32) and labels.dtype == torch.int64


def test_train_step_reports_the_data_stall_ratio(betons, tmp_path):
    config_path = write_config(tmp_path / "tiny.toml", betons)
    out = tmp_path / "train-step"
    assert main(["train-step", "--config", str(config_path), "--steps", "1", "--backends", "torch",
                 "--device", "cpu", "--out", str(out)]) == 0
    payload = json.loads((out / "results.json").read_text())
    assert "trainer's own step" in payload["settings"]["step"]
    assert payload["settings"]["precision"] == "off" and payload["settings"]["channels_last"] is True
    feeds = {row["backend"]: row for row in payload["results"]}
    assert feeds.keys() == {"synthetic", "torch"}
    assert feeds["synthetic"]["ratio_to_synthetic"] == 1.0
    assert feeds["torch"]["ratio_to_synthetic"] == pytest.approx(
        feeds["torch"]["img_per_s"] / feeds["synthetic"]["img_per_s"], rel=1e-2)


def test_autotune_with_no_time_left_keeps_the_config_values_and_says_so(betons, tmp_path):
    config_path = write_config(tmp_path / "tiny.toml", betons)
    tuned_path = tmp_path / "autotune.toml"
    assert main(["autotune", "--config", str(config_path), "--budget-s", "0.01", "--out", str(tuned_path),
                 "--device", "cpu"]) == 0
    report = json.loads(tuned_path.with_suffix(".json").read_text())
    assert [trial["phase"] for trial in report["trials"]] == ["warm-up"]   # nothing measured after it
    assert report["notes"] and all("budget" in note for note in report["notes"])
    assert "partial" in tuned_path.read_text()
    assert tomllib.loads(tuned_path.read_text())["data"] == {"workers": 1, "batch_size": 8}


def test_tuned_batch_sizes_go_into_each_resolution_stage(betons, tmp_path):
    from benchmarks.autotune import PhaseResult, tuned_values, write_tune_file
    from benchmarks.search import SearchResult
    from fastpipe.config import load_config

    stages = [{"epochs": 2, "resolution": 64, "batch_size": 8}, {"epochs": 1, "resolution": 96}]
    config = load_config(write_config(tmp_path / "tiny.toml", betons),
                         overrides={"resolution": {"stages": stages}, "schedule": {"epochs": 3}})
    phases = [PhaseResult("loader", 64, SearchResult((("workers", 2),), 900.0)),
              PhaseResult("batch", 64, SearchResult(64, 50.0)),
              PhaseResult("loader", 96, SearchResult((("workers", 1),), 500.0)),
              PhaseResult("batch", 96, SearchResult(32, 20.0))]
    values = tuned_values(config, phases)
    # workers from the resolution most epochs train at; one data.batch_size that fits the largest one
    assert values["data"] == {"workers": 2, "batch_size": 32}
    # optim.lr is defined for data.batch_size (8 in the config): it moves with the batch, linearly
    assert values["optim"]["lr"] == pytest.approx(config.optim.lr * 32 / 8)
    assert [stage["batch_size"] for stage in values["resolution"]["stages"]] == [64, 32]
    write_tune_file(tmp_path / "tune.toml", values, ["header"])
    tuned = load_config(tmp_path / "tiny.toml", overrides={"schedule": {"epochs": 3}}, tune=tmp_path / "tune.toml")
    schedule = tuned.schedule_for_resolution()
    assert [schedule.batch_size_at(epoch) for epoch in range(3)] == [64, 64, 32]
    # so every stage trains at the LR it had before tuning: lr * stage batch / data.batch_size
    for stage_batch in (64, 32):
        assert tuned.optim.lr * stage_batch / tuned.data.batch_size == pytest.approx(
            config.optim.lr * stage_batch / config.data.batch_size)


def test_the_tune_file_says_how_the_learning_rate_came_with_the_batch_size(tmp_path):
    from benchmarks.autotune import lr_for_batch, lr_note
    from fastpipe.config import load_config

    config = load_config(None, {"data": {"batch_size": 256}, "optim": {"lr": 0.5}})
    assert lr_for_batch(config, 512) == pytest.approx(1.0) and lr_for_batch(config, 256) is None
    note = lr_note(config, {"data": {"batch_size": 512}, "optim": {"lr": 1.0}})
    assert "0.5 at batch 256 -> 1 at batch 512" in note and "linearly" in note
    auto = load_config(None, {"optim": {"lr": "auto"}})
    assert lr_for_batch(auto, 512) is None and "LR finder" in lr_note(auto, {"data": {"batch_size": 512}})


def test_convert_subcommand_hands_its_arguments_to_the_converter_benchmark(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", "--help"])
    assert exit_info.value.code == 0
    assert "python -m benchmarks convert" in capsys.readouterr().out


def test_autotune_tries_few_and_many_workers_first_so_a_short_budget_still_spans_the_range():
    from benchmarks.autotune import loader_candidates, spread

    assert spread([1, 2, 4, 8, 16]) == [16, 1, 4, 2, 8]
    assert sorted(spread(list(range(11)))) == list(range(11))
    first = [dict(setting)["workers"] for setting in loader_candidates("ffcv", "cpu", 16)[:3]]
    assert first == [16, 1, 4]
    # DALI on a GPU: thread counts, prefetch depths and hardware-decoder shares all in the grid, and its
    # first six trials already reach both ends of the thread range
    grid = loader_candidates("dali", "cuda", 16)
    assert {dict(setting)["hw_decoder_load"] for setting in grid} == {0.0, 0.5, 0.75}
    assert {1, 16} <= {dict(setting)["workers"] for setting in grid[:6]}


def test_loader_rows_give_the_decoding_work_of_each_ffcv_decoder(betons):
    from benchmarks.loaders import LoaderCase, measure_case, split_variant, whole_image_decoded_pixels
    from fastpipe.data import crop_decode

    if not crop_decode.available():
        pytest.skip(crop_decode.MISSING)
    rows = {name: measure_case(LoaderCase(name, 48, 1, 8), str(betons), "cpu", epochs=1, warmup=0)
            for name in ("ffcv", "ffcv:stock")}
    whole = whole_image_decoded_pixels(str(betons), "train", 48)
    assert whole > 0   # the fixture's train split stores about half its samples as JPEG
    assert rows["ffcv:stock"]["decoded_px_per_output_px"] == round(whole, 2)
    assert rows["ffcv:stock"]["options"] == {"decoder": "stock"}
    # crops cover 8-100% of an image: decoding only them is less work than decoding all of it
    assert 0 < rows["ffcv"]["decoded_px_per_output_px"] < rows["ffcv:stock"]["decoded_px_per_output_px"]
    assert split_variant("ffcv:crop") == ("ffcv", {"decoder": "crop"})
    with pytest.raises(SystemExit, match="unknown backend variant"):
        split_variant("torch:fast")


def test_ddp_benchmark_times_each_option_pair_under_two_processes(tmp_path):
    out = tmp_path / "ddp"
    result = subprocess.run([sys.executable, "-m", "benchmarks", "ddp", "--steps=1", "--rounds=1", "--res=32",
                             "--batch-size=4", f"--out={out}"], check=False, capture_output=True, text=True,
                            timeout=300, cwd=Path(__file__).resolve().parent.parent,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    rows = json.loads((out / "results.json").read_text())["results"]
    assert {(row["broadcast_buffers"], row["bucket_view"]) for row in rows} == {
        (True, False), (True, True), (False, False), (False, True)}
    assert all(row["processes"] == 2 and row["ms_per_step"] > 0 for row in rows)
    assert "gradient_as_bucket_view" in result.stdout   # rank 0's table, once
    assert result.stdout.count("DDP options:") == 1


def test_scale_benchmark_reports_manifest_size_first_batch_and_memory_per_size(tmp_path):
    out = tmp_path / "scale"
    assert main(["scale", "--samples", "600,1800", "--backends", "dali", "--work", str(tmp_path / "data"),
                 "--out", str(out)]) == 0
    rows = json.loads((out / "results.json").read_text())["results"]
    assert [row["samples"] for row in rows] == [600, 1800]
    assert rows[0]["manifest_kb"] == rows[1]["manifest_kb"] < 64   # the manifest does not grow with the set
    assert rows[1]["table_mb"] > rows[0]["table_mb"]               # the per-sample table does
    assert all(row["first_batch_s"] > 0 and row["peak_rss_mb"] > row["anon_mb"] > 0 for row in rows)
    assert "anon_bytes_per_added_sample" in rows[1]


def test_paired_benchmark_alternates_folders_and_reports_ratios_to_the_first(betons, tmp_path):
    out = tmp_path / "paired"
    assert main(["paired", "--data", f"{betons},{betons}", "--backend", "torch", "--res", "32", "--workers", "1",
                 "--batch-size", "8", "--rounds", "3", "--split", "val", "--out", str(out)]) == 0
    rows = json.loads((out / "results.json").read_text())["results"]
    assert [row["data"] for row in rows] == [str(betons)] * 2
    assert rows[0]["ratio"] == 1.0 and rows[0]["ratios"] == "1.00 1.00 1.00"
    assert len(rows[1]["ratios"].split()) == 3 and rows[1]["ratio"] > 0 and rows[1]["img_per_s"] > 0
    with pytest.raises(SystemExit, match="at least two"):
        main(["paired", "--data", str(betons), "--out", str(out)])


def test_restart_interval_benchmark_gives_each_rule_its_bytes_and_reads(tmp_path):
    out = tmp_path / "intervals"
    assert main(["restart-intervals", "--count", "3", "--sides", "256", "--targets", "1,4,row", "--crops", "3",
                 "--rounds", "1", "--out", str(out)]) == 0
    rows = {row["rule"]: row for row in json.loads((out / "results.json").read_text())["results"]}
    assert list(rows) == ["none", "1", "4", "row"]
    assert [rows[rule]["interval_mcus"] for rule in rows] == [0, 1, 4, 16]
    # every interval costs its marker and padding: the shorter, the more bytes
    assert rows["none"]["bytes_over_pct"] == 0 < rows["row"]["bytes_over_pct"] < rows["4"]["bytes_over_pct"] \
        < rows["1"]["bytes_over_pct"]
    # and the shorter, the less of each row is read (none decodes the whole stream: no reads counted)
    reads = {rule: rows[rule]["entropy_read_share"] for rule in rows}
    assert reads["none"] == 0 and 0 < reads["1"] <= reads["4"] <= reads["row"] < 1
    assert rows["1"]["restart_decodes_share"] > 0 and rows["none"]["restart_decodes_share"] == 0
    assert all(row["us_per_crop"] > 0 and row["full_decode_us"] > 0 for row in rows.values())
    assert (out / "restart-intervals.png").stat().st_size > 0


def test_restart_interval_benchmark_reads_a_folder_of_photos_and_names_bad_arguments(tmp_path):
    from PIL import Image

    from benchmarks.photos import photo_like

    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(1)
    for name, (height, width) in {"a.png": (150, 200), "b.jpg": (300, 180)}.items():
        Image.fromarray(photo_like(rng, height, width)).save(photos / name)
    out = tmp_path / "intervals"
    assert main(["restart-intervals", "--images", str(photos), "--count", "3", "--sides", "128",
                 "--targets", "2", "--crops", "2", "--rounds", "1", "--out", str(out)]) == 0
    rows = json.loads((out / "results.json").read_text())["results"]
    assert [row["rule"] for row in rows] == ["none", "2"] and rows[1]["bytes_over_pct"] > 0
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no images in it"):
        main(["restart-intervals", "--images", str(tmp_path / "empty"), "--out", str(out)])
    with pytest.raises(SystemExit, match="no such folder"):
        main(["restart-intervals", "--images", str(tmp_path / "nowhere"), "--out", str(out)])
    with pytest.raises(SystemExit, match="'x' is neither"):
        main(["restart-intervals", "--targets", "4,x", "--out", str(out)])


def test_the_photographs_scikit_image_ships_load_at_their_storage_size():
    pytest.importorskip("skimage")
    from benchmarks.photos import SKIMAGE_PHOTOS, load

    count = len(SKIMAGE_PHOTOS)
    images = load("skimage", 256, 2 * count + 1)
    assert len(images) == 2 * count + 1
    assert all(image.dtype == np.uint8 and image.ndim == 3 and max(image.shape[:2]) <= 256 for image in images)
    assert max(max(image.shape[:2]) for image in images) == 256     # the large ones brought down to 256
    assert np.array_equal(images[count], images[0][:, ::-1])          # a second pass is mirrored,
    assert np.array_equal(images[2 * count], images[0][::-1])         # a third upside down
    assert all(image.std() > 10 for image in images)                  # photographs, not flat fills
