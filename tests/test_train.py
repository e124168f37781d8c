"""End-to-end trainer behaviour on the shared tiny beton set (4 classes, 96 train / 32 val images) at 32 px."""
from __future__ import annotations

import dataclasses
import json
import os
import signal
from pathlib import Path

import pandas as pd
import pytest
import torch

from fastpipe.config import load_config
from fastpipe.report.run import RunReport
from fastpipe.train import Trainer, TrainingError, main
from fastpipe.train.checkpoint import load_checkpoint

TINY = ["--data.workers=1", "--data.batch_size=16", "--resolution.start=32", "--resolution.end=32",
        "--resolution.val=32", "--schedule.epochs=2", "--train.log_every=100", "--optim.lr=0.1"]


@pytest.fixture(scope="module", autouse=True)
def no_plots():
    """PNG plots cost seconds per epoch and are test_report.py's subject; here they would only slow runs."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(RunReport, "plot", lambda self, **kwargs: {})
        patch.setattr(RunReport, "plot_later", lambda self: None)
        yield


def tiny_config(betons, *extra):
    return load_config("cpu-smoke.toml", [f"--data.path={betons}", *TINY, *extra])


def metrics(run_dir) -> pd.DataFrame:
    return pd.read_csv(run_dir / "metrics.csv")


@pytest.fixture(scope="module")
def trained_run(betons, tmp_path_factory):
    """The cpu-smoke recipe, shrunk, with torch.compile on (inductor: C++ code generation with gcc), so the
    compiled path runs in CI. Most of this fixture's time is that one compilation."""
    run_dir = tmp_path_factory.mktemp("run")
    cache = tmp_path_factory.mktemp("compile-cache")
    assert Trainer(tiny_config(betons, "--model.compile=true", f"--model.compile_cache={cache}"), run_dir).fit() == 0
    return run_dir


def test_tiny_compiled_run_learns_well_above_chance_and_writes_its_outputs(trained_run):
    summary = json.loads((trained_run / "summary.json").read_text())
    chance = 1 / 4
    assert summary["final_val_top1"] > 3 * chance
    history = metrics(trained_run)
    assert list(history["epoch"]) == [1, 2]
    assert list(history["graphs_compiled"]) == [1, 1]
    assert history["data_wait_pct"].between(0, 100).all() and (history["images_per_second"] > 0).all()
    for name in ("config.toml", "model_summary.txt", "best.pt", "last.pt", "train.log", "predictions.csv"):
        assert (trained_run / name).is_file(), name
    last = load_checkpoint(trained_run / "last.pt")
    assert last["epoch"] == 1 and last["completed"] and last["classes"] == ["class000", "class001", "class002",
                                                                            "class003"]
    # seconds outside the step loop, per epoch and by kind; evaluation ran in both epochs
    outside = summary["outside_step_s"]
    assert [row["epoch"] for row in outside["per_epoch"]] == [1, 2]
    assert all({"epoch_start", "eval", "report", "plots", "checkpoint"} <= set(row) for row in outside["per_epoch"])
    assert outside["total"]["eval"] > 0 and all(seconds >= 0 for seconds in outside["total"].values())


def test_best_checkpoint_is_last_checkpoint_s_bytes_not_a_second_serialisation(betons, tmp_path, monkeypatch):
    import fastpipe.train.checkpoint

    saves = []
    original = fastpipe.train.checkpoint.save_checkpoint
    monkeypatch.setattr(fastpipe.train.checkpoint, "save_checkpoint", lambda path, state: saves.append(path.name)
                        or original(path, state))
    run_dir = tmp_path / "run"
    trainer = Trainer(tiny_config(betons), run_dir)
    real = trainer.evaluate()
    trainer.evaluate = lambda tta=False: dataclasses.replace(real, top1=0.5 + 0.1 * len(saves))   # each one a new best
    assert trainer.fit() == 0
    assert saves == ["last.pt", "last.pt"]   # one serialisation per epoch
    assert (run_dir / "best.pt").read_bytes() == (run_dir / "last.pt").read_bytes()
    best = load_checkpoint(run_dir / "best.pt")
    assert best["epoch"] == 1 and best["best_top1"] == pytest.approx(0.6)



def test_fine_tune_with_frozen_backbone_changes_only_the_head(trained_run, betons, tmp_path):
    config = tiny_config(betons, "--schedule.epochs=1", "--model.freeze=backbone")
    trainer = Trainer(config, tmp_path / "ft", init_from=trained_run)
    assert trainer.fit() == 0
    source = load_checkpoint(trained_run / "best.pt")["model"]
    tuned = load_checkpoint(tmp_path / "ft" / "last.pt")["model"]
    assert torch.equal(tuned["layer1.0.conv1.weight"], source["layer1.0.conv1.weight"])
    assert torch.equal(tuned["bn1.running_mean"], source["bn1.running_mean"])   # frozen BN keeps its statistics
    assert not torch.equal(tuned["fc.weight"], source["fc.weight"])


def assert_same_run(run_a, run_b):
    a, b = load_checkpoint(run_a / "last.pt"), load_checkpoint(run_b / "last.pt")
    for key, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][key]), key
    assert a["optimizer"]["param_groups"][0]["lr"] == b["optimizer"]["param_groups"][0]["lr"]
    assert list(metrics(run_a)["val_loss"]) == list(metrics(run_b)["val_loss"])


def test_resume_after_one_epoch_ends_bitwise_equal_to_an_uninterrupted_run(betons, tmp_path):
    # default random crops and flips; MixUp draws from torch's global RNG, so this also checks that RNG
    # state survives the resume
    config = tiny_config(betons, "--augment.mixup=0.4", "--eval.flip_tta=false", "--train.deterministic=true")
    assert Trainer(config, tmp_path / "straight").fit() == 0

    first = Trainer(config, tmp_path / "resumed")
    first.plans = first.plans[:1]   # stop after epoch 1, as if the job had ended there
    assert first.fit() == 0
    assert load_checkpoint(tmp_path / "resumed" / "last.pt")["epoch"] == 0
    assert Trainer(config, tmp_path / "resumed", resume=True).fit() == 0
    assert_same_run(tmp_path / "straight", tmp_path / "resumed")
    assert list(metrics(tmp_path / "resumed")["train_loss"]) == list(metrics(tmp_path / "straight")["train_loss"])


def test_sigterm_mid_epoch_then_resume_is_bitwise_equal_to_straight_runs_which_equal_each_other(betons, tmp_path):
    # ffcv with its default augmentation: crops and flips are a function of (seed, epoch, sample index)
    config = tiny_config(betons, "--train.deterministic=true", "--eval.flip_tta=false")
    assert config.augment.min_scale < 1 and config.augment.flip and config.data.backend == "ffcv"
    for name in ("straight", "rerun"):
        assert Trainer(config, tmp_path / name).fit() == 0
    assert_same_run(tmp_path / "straight", tmp_path / "rerun")

    interrupted = Trainer(config, tmp_path / "resumed")
    forwards = []

    def sigterm_at_step_9(module, args):   # 6 steps an epoch: step 3 of epoch 2
        if module.training:
            forwards.append(1)
            if len(forwards) == 9:
                os.kill(os.getpid(), signal.SIGTERM)

    interrupted.model.register_forward_pre_hook(sigterm_at_step_9)
    assert interrupted.fit() == 0
    state = load_checkpoint(tmp_path / "resumed" / "last.pt")
    assert (state["epoch"], state["step"], state["completed"]) == (1, 3, False)
    assert Trainer(config, tmp_path / "resumed", resume=True).fit() == 0
    assert_same_run(tmp_path / "straight", tmp_path / "resumed")


def test_progressive_stages_change_resolution_batch_and_lr_compiling_once_per_shape(betons, tmp_path):
    # aot_eager goes through dynamo's graph capture and guards like inductor, without C++ code generation.
    config = tiny_config(betons, "--optim.lr=auto", "--lr_finder.steps=8", "--schedule.epochs=3",
                         "--model.compile=true", "--model.compile_backend=aot_eager",
                         ("--resolution.stages=[{epochs = 1, resolution = 32}, "
                          "{epochs = 1, resolution = 48, batch_size = 8}, {epochs = 1, resolution = 32}]"))
    trainer = Trainer(config, tmp_path / "run")
    seen = []

    def record(module, args):
        if module.training:
            seen.append((tuple(args[0].shape), trainer.optimizer.param_groups[0]["max_lr"]))

    trainer.model.register_forward_pre_hook(record)
    assert trainer.fit() == 0

    steps = [96 // 16, 96 // 8, 96 // 16]
    assert len(seen) == sum(steps)
    epochs = [seen[:6], seen[6:18], seen[18:]]
    peak = trainer.peak_lr
    for epoch, shape, lr_scale in ((0, (16, 3, 32, 32), 1), (1, (8, 3, 48, 48), 0.5), (2, (16, 3, 32, 32), 1)):
        assert {shape_seen for shape_seen, _ in epochs[epoch]} == {shape}
        # linear LR scaling: half the batch, half the one-cycle curve
        assert all(max_lr == pytest.approx(peak * lr_scale) for _, max_lr in epochs[epoch])
    history = metrics(tmp_path / "run")
    assert list(history["resolution"]) == [32, 48, 32] and list(history["batch_size"]) == [16, 8, 16]
    assert list(history["graphs_compiled"]) == [1, 2, 2]   # a shape seen before reuses its graph
    assert (tmp_path / "run" / "lr_finder.png").is_file() and peak > 0


def test_early_stopping_ends_the_run_after_patience_evaluations_without_improvement(betons, tmp_path):
    trainer = Trainer(tiny_config(betons, "--schedule.epochs=4", "--train.early_stop_patience=1",
                                  "--data.batch_size=32"), tmp_path / "run")
    frozen = trainer.evaluate()
    trainer.evaluate = lambda tta=False: frozen   # the same val accuracy every epoch: no improvement after the first
    assert trainer.fit() == 0
    assert list(metrics(tmp_path / "run")["epoch"]) == [1, 2]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "early_stopped"


def test_a_planted_nan_stops_the_run_within_one_log_interval_with_weights_from_before_it(betons, tmp_path):
    # 96 images / batch 16 = 6 steps an epoch; the loss turns NaN from step 4 of epoch 2 (global step 10).
    # Log points (log_every=4): global steps 4, 6 (epoch end), 8, 12.
    trainer = Trainer(tiny_config(betons, "--train.log_every=4"), tmp_path / "run")
    criterion, forwards = trainer.train_step.criterion, []

    def snapshot(module, args):
        if module.training:
            forwards.append({k: v.detach().clone() for k, v in module.state_dict().items()})

    trainer.model.register_forward_pre_hook(snapshot)
    trainer.train_step.criterion = lambda logits, targets: criterion(logits, targets) * (
        float("nan") if len(forwards) >= 10 else 1.0)
    with pytest.raises(TrainingError, match=r"non-finite at step 10 .*lr [0-9.]+.*lower --optim.lr") as error:
        trainer.fit()
    assert len(forwards) == 12   # stopped at the log point after step 12: within one interval of step 10
    assert "3 step(s) up to step 12" in str(error.value)
    saved = load_checkpoint(tmp_path / "run" / "last.pt")
    assert saved["nonfinite_from_step"] == 9 and not saved["completed"]
    for key, value in saved["model"].items():
        is_statistic = "running_" in key or "num_batches" in key
        # parameters: exactly before step 10; BatchNorm statistics: as of the log point after step 8
        expected = forwards[8 if is_statistic else 9][key]
        assert torch.equal(value, expected), key
        assert torch.equal(trainer.model.state_dict()[key], expected), key


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step")
def test_a_finished_run_trains_longer_on_the_schedule_rebuilt_for_the_new_length(betons, tmp_path):
    run_dir = tmp_path / "run"
    config = tiny_config(betons, f"--run.dir={run_dir}")
    assert Trainer(config, run_dir).fit() == 0
    first = json.loads((run_dir / "summary.json").read_text())
    longer = tiny_config(betons, f"--run.dir={run_dir}", "--schedule.epochs=4")
    resumed = Trainer(longer, run_dir, resume=True)
    assert resumed.run.start_epoch == 2 and resumed.scheduler.total_steps == 4 * 6
    # the LR where a 4-epoch one-cycle run stands after 12 of its 24 steps
    planned = Trainer(longer, tmp_path / "planned")
    for _ in range(12):
        planned.scheduler.step()
    assert resumed.current_lr() == pytest.approx(planned.current_lr())
    assert resumed.fit() == 0
    history = metrics(run_dir)
    assert list(history["epoch"]) == [1, 2, 3, 4]
    assert load_checkpoint(run_dir / "last.pt")["epoch"] == 3
    assert resumed.current_lr() == pytest.approx(0.1 / 25 / 1e4, rel=1e-6)   # annealed to the floor again
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["wall_time_s"] > first["wall_time_s"]


def test_resuming_a_finished_run_says_how_to_train_longer_and_keeps_its_summary(trained_run, betons, capsys):
    summary = (trained_run / "summary.json").read_bytes()
    assert main(["--resume", str(trained_run)]) == 0
    assert f"--resume {trained_run} --schedule.epochs=N" in capsys.readouterr().out
    assert (trained_run / "summary.json").read_bytes() == summary
    assert "eval" in json.loads(summary)


def test_a_stop_signal_after_a_nan_between_log_points_does_not_save_poisoned_weights(betons, tmp_path):
    trainer = Trainer(tiny_config(betons, "--train.log_every=100"), tmp_path / "run")
    criterion, forwards = trainer.train_step.criterion, []

    def snapshot_then_sigterm(module, args):
        if module.training:
            forwards.append({k: v.detach().clone() for k, v in module.named_parameters()})
            if len(forwards) == 4:
                os.kill(os.getpid(), signal.SIGTERM)

    trainer.model.register_forward_pre_hook(snapshot_then_sigterm)
    trainer.train_step.criterion = lambda logits, targets: criterion(logits, targets) * (
        float("nan") if len(forwards) >= 3 else 1.0)
    with pytest.raises(TrainingError, match="non-finite at step 3"):
        trainer.fit()   # the stop reads the counters first, so the NaN is found and reported
    saved = load_checkpoint(tmp_path / "run" / "last.pt")
    for key, value in forwards[2].items():
        assert torch.equal(saved["model"][key], value), key


def test_missing_data_message_gives_the_convert_command(tmp_path, capsys):
    code = main(["--config", "cpu-smoke.toml", f"--data.path={tmp_path / 'nowhere'}", f"--run.dir={tmp_path / 'r'}"])
    assert code == 1
    assert "python -m convert" in capsys.readouterr().err


def test_resume_from_corrupt_checkpoint_is_a_clear_error(betons, tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.toml").write_text(f'[data]\npath = "{betons}"\n')
    (run_dir / "last.pt").write_bytes(b"\x00" * 100)
    assert main(["--resume", str(run_dir)]) == 1
    assert "last.pt is corrupt or incomplete" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_defaults_compile_once_with_mixed_precision_and_report_data_wait(betons, tmp_path):
    trainer = Trainer(tiny_config(betons, "--train.device=auto", "--model.compile=auto"), tmp_path / "run")
    assert trainer.device.type == "cuda" and trainer.precision.name in ("bf16", "fp16")
    assert trainer.fit() == 0
    history = metrics(tmp_path / "run")
    assert list(history["graphs_compiled"]) == [1, 1]
    assert history["data_wait_pct"].between(0, 100).all()


def test_compile_time_is_reported_apart_and_a_later_run_loads_its_graphs_from_the_cache(trained_run, betons,
                                                                                          tmp_path):
    import subprocess
    import sys

    config = load_config(trained_run / "config.toml")
    cache = Path(config.model.compile_cache)
    assert any(cache.rglob("*.py")) or any(cache.rglob("*.so"))   # inductor's generated code was kept
    summary = json.loads((trained_run / "summary.json").read_text())
    per_epoch = summary["outside_step_s"]["per_epoch"]
    assert per_epoch[0]["compile"] > 0 and "compile" not in per_epoch[1]   # one shape: compiled once
    assert "left out of its img/s" in (trained_run / "train.log").read_text()
    # a new process with the same shapes: its graphs come from the cache folder, not from a new compile
    again = tmp_path / "again"
    result = subprocess.run([sys.executable, "-m", "fastpipe.train", "--config", str(trained_run / "config.toml"),
                             f"--run.dir={again}", "--schedule.epochs=1", "--eval.flip_tta=false"],
                            check=False, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    line = next(line for line in (again / "train.log").read_text().splitlines() if "compiled graphs" in line)
    assert " 0 miss(es)" in line and " 0 hit(s)" not in line, line
