"""Run reports: metrics.csv, log.md, TensorBoard events, plots, summary.json and the class report."""
from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest
from matplotlib.image import imread

from fastpipe.evaluate import EvalResult
from fastpipe.report.classes import confused_subset, confusion_matrix, per_class_table
from fastpipe.report.run import METRIC_KEYS, PLOTS, RunReport


def epoch_metrics(epoch: int) -> dict:
    return {"epoch": epoch, "train_loss": 2.0 / epoch, "train_top1": 0.1 * epoch, "val_loss": 2.2 / epoch,
            "val_top1": [0.3, 0.5, 0.4][epoch - 1], "val_top5": 0.6 + 0.1 * epoch, "lr": 0.1 * epoch,
            "momentum": 0.9 - 0.02 * epoch, "resolution": 160 + 32 * (epoch - 1), "batch_size": 256,
            "images_per_second": 1000.0 + epoch, "epoch_time_s": 10.0 * epoch, "data_wait_pct": 5.0 * epoch}


def eval_result(targets, preds, classes) -> EvalResult:
    targets, preds = np.asarray(targets), np.asarray(preds)
    return EvalResult(loss=0.5, top1=float(np.mean(targets == preds)), top5=1.0, targets=targets, preds=preds,
                      confidences=np.linspace(0.5, 0.9, len(targets)), count=len(targets), topk=5,
                      num_classes=len(classes), classes=None)


def tensorboard_scalars(log_dir) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    classes = ["ant", "bee", "cat"]
    report = RunReport(run_dir, classes)
    report.log("starting [data] check")
    for step in range(12):
        report.step(step, epoch=step / 4, lr=0.01 * step, momentum=0.95 - 0.01 * step)
    for epoch in (1, 2, 3):
        report.epoch(epoch_metrics(epoch))
    result = eval_result(targets=[0, 0, 0, 1, 1, 2, 2, 2], preds=[0, 0, 1, 1, 2, 2, 2, 0], classes=classes)
    summary = report.finish({"stopped": "completed"}, result)
    return run_dir, summary


def test_metrics_csv_and_markdown_log_hold_one_row_per_epoch(finished_run):
    run_dir, _ = finished_run
    table = pd.read_csv(run_dir / "metrics.csv")
    assert list(table.columns) == list(METRIC_KEYS)
    assert table["epoch"].tolist() == [1, 2, 3] and table["epoch"].dtype.kind == "i"
    np.testing.assert_allclose(table["val_top1"], [0.3, 0.5, 0.4])
    lines = (run_dir / "log.md").read_text().splitlines()
    table_lines = [line for line in lines if line.startswith("|")]
    assert len(table_lines) == 2 + 3  # header, separator, 3 epochs
    assert {line.count("|") for line in table_lines} == {table_lines[0].count("|")}
    assert "50.00%" in table_lines[3] and "| 2 |" in table_lines[3]
    log = (run_dir / "train.log").read_text()
    assert "starting [data] check" in log and "epoch 3" in log


def test_tensorboard_events_hold_epoch_and_step_scalars(finished_run):
    run_dir, _ = finished_run
    scalars = tensorboard_scalars(run_dir / "tensorboard")
    assert [step for step, _ in scalars["accuracy/val_top1"]] == [1, 2, 3]
    np.testing.assert_allclose([v for _, v in scalars["accuracy/val_top1"]], [0.3, 0.5, 0.4], rtol=1e-6)
    assert {"loss/train", "loss/val", "epoch/lr", "epoch/data_wait_pct", "step/lr"} <= set(scalars)
    assert len(scalars["step/lr"]) == 12


def test_plots_are_written_as_readable_pngs(finished_run):
    run_dir, _ = finished_run
    for name in ("dashboard", *PLOTS):
        image = imread(run_dir / "plots" / f"{name}.png")
        assert image.ndim == 3 and image.shape[0] > 200
        assert image[..., :3].std() > 0.05  # something was drawn, not a blank canvas


def test_summary_json_has_best_final_time_and_environment(finished_run):
    run_dir, returned = finished_run
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["best_val_top1"] == 0.5 and summary["best_epoch"] == 2
    assert summary["final_val_top1"] == 0.4 and summary["final_val_top5"] == pytest.approx(0.9)
    assert summary["train_time_s"] == pytest.approx(60.0)
    assert summary["mean_images_per_second"] == pytest.approx(1002.0)
    assert summary["stopped"] == "completed"
    assert summary["eval"]["top1"] == pytest.approx(5 / 8) and summary["eval"]["count"] == 8
    assert {"python", "torch", "cuda", "device", "cpu", "cpu_count"} <= set(summary["environment"])
    assert returned["best_epoch"] == 2


def test_per_class_report_matches_hand_counts(finished_run):
    run_dir, _ = finished_run
    table = pd.read_csv(run_dir / "per_class.csv")
    assert table["class"].tolist() == ["ant", "bee", "cat"]
    # ant: 2 of 3 right, predicted 3 times (one was cat); bee: 1 of 2, predicted twice; cat: 2 of 3, predicted 3x
    np.testing.assert_allclose(table["precision"], [2 / 3, 1 / 2, 2 / 3], rtol=1e-5)
    np.testing.assert_allclose(table["recall"], [2 / 3, 1 / 2, 2 / 3], rtol=1e-5)
    np.testing.assert_allclose(table["f1"], [2 / 3, 1 / 2, 2 / 3], rtol=1e-5)
    assert table["support"].tolist() == [3, 2, 3]
    predictions = pd.read_csv(run_dir / "predictions.csv")
    assert len(predictions) == 8 and predictions["predicted"].tolist()[-1] == "ant"
    assert imread(run_dir / "confusion_matrix.png").shape[0] > 200


def test_per_class_table_gives_zero_not_nan_for_never_predicted_class():
    matrix = confusion_matrix([0, 1, 1], [0, 0, 0], 3)
    table = per_class_table(matrix, ["a", "b", "c"])
    assert table["precision"].tolist() == [pytest.approx(1 / 3), 0.0, 0.0]
    assert table["f1"].tolist()[1:] == [0.0, 0.0] and table["support"].tolist() == [1, 2, 0]


def test_confusion_image_for_many_classes_shows_the_most_confused(tmp_path):
    classes = [f"class{i:02d}" for i in range(60)]
    rng = np.random.default_rng(0)
    targets = np.repeat(np.arange(60), 10)
    preds = targets.copy()
    # Heavy confusions between a few known pairs, plus sparse noise elsewhere.
    for true, wrong, count in [(7, 8, 6), (8, 7, 5), (40, 3, 4), (55, 12, 3)]:
        preds[np.flatnonzero(targets == true)[:count]] = wrong
    noise = rng.choice(len(targets), 5, replace=False)
    preds[noise] = (targets[noise] + 30) % 60
    matrix = confusion_matrix(targets, preds, 60)

    subset = confused_subset(matrix, limit=8)
    assert len(subset) == 8
    assert {7, 8, 40, 3, 55, 12} <= set(subset.tolist())

    report = RunReport(tmp_path, classes, tensorboard=False, plots=False)
    result = eval_result(targets, preds, classes)
    paths = report.finish({}, result)["files"]
    assert imread(paths["confusion_matrix"]).shape[0] > 300
    confusions = pd.read_csv(paths["top_confusions"])
    assert confusions.iloc[0][["true", "predicted", "count"]].tolist() == ["class07", "class08", 6]


def test_resume_keeps_earlier_epochs_and_replaces_a_rerun_epoch(tmp_path):
    first = RunReport(tmp_path, ["a", "b"], tensorboard=False, plots=False)
    first.epoch(epoch_metrics(1), echo=False)
    first.epoch(epoch_metrics(2), echo=False)
    for step in range(10):
        first.step(step, epoch=step / 5, lr=0.1)
    resumed = RunReport(tmp_path, ["a", "b"], tensorboard=False, plots=False, resume=True)
    for step in range(6, 8):  # the checkpoint was older than the last logged steps
        resumed.step(step, epoch=step / 5, lr=0.2)
    steps = pd.read_csv(tmp_path / "steps.csv")
    assert steps["step"].tolist() == [0, 1, 2, 3, 4, 5, 6, 7]
    assert steps["lr"].tolist() == [0.1] * 6 + [0.2] * 2
    rerun = {**epoch_metrics(2), "val_top1": 0.55}
    resumed.epoch(rerun, echo=False)
    resumed.epoch(epoch_metrics(3), echo=False)
    table = pd.read_csv(tmp_path / "metrics.csv")
    assert table["epoch"].tolist() == [1, 2, 3]
    assert table["val_top1"].tolist() == [0.3, 0.55, 0.4]


def test_disabled_report_writes_nothing(tmp_path):
    report = RunReport(tmp_path / "rank1", ["a"], enabled=False)
    report.log("hello")
    report.step(0, epoch=0.0, lr=0.1)
    report.epoch(epoch_metrics(1))
    assert report.finish({}, None) == {}
    assert not (tmp_path / "rank1").exists()


def record_draw(run_dir, history, steps):
    """A stand-in for draw_plots: notes which process drew which epoch, slowly enough to overlap."""
    import os
    import time

    time.sleep(0.3)
    with open(run_dir / "draws.txt", "a") as handle:
        handle.write(f"{os.getpid()} {int(history['epoch'].iloc[-1])}\n")


def test_background_redraws_run_in_another_process_and_the_newest_request_is_drawn(tmp_path):
    from fastpipe.report.plots import BackgroundPlots

    plots = BackgroundPlots(draw=record_draw)
    try:
        for epoch in range(1, 6):   # requests faster than the drawing: the ones waiting are replaced
            plots.submit(tmp_path, pd.DataFrame({"epoch": [epoch]}), pd.DataFrame())
        plots.wait()
    finally:
        plots.close()
    draws = [line.split() for line in (tmp_path / "draws.txt").read_text().splitlines()]
    assert {pid for pid, _ in draws} != {str(os.getpid())} and len({pid for pid, _ in draws}) == 1
    epochs = [int(epoch) for _, epoch in draws]
    assert epochs[0] == 1 and epochs[-1] == 5 and len(epochs) < 5 and epochs == sorted(epochs)


def test_the_dashboard_is_drawn_while_the_epochs_go_on(tmp_path):
    report = RunReport(tmp_path, ["a", "b"], tensorboard=False)
    for epoch in (1, 2):
        report.epoch(epoch_metrics(epoch))
    assert report.background is not None   # epoch() handed the drawing over
    report.background.wait()
    image = imread(tmp_path / "plots" / "dashboard.png")
    assert image[..., :3].std() > 0.05
    report.close()
    assert report.background is None
