"""The training step and its measurements: no device reads in steady state, data wait without a sync, and
one builder for the trainer and the benchmarks."""
from __future__ import annotations

import sys
import threading
import time

import pandas as pd
import pytest
import torch

import fastpipe.train.assemble
from fastpipe.config import load_config
from fastpipe.report.run import RunReport
from fastpipe.train import Trainer

HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")


@pytest.fixture(autouse=True)
def no_plots(monkeypatch):
    monkeypatch.setattr(RunReport, "plot", lambda self, **kwargs: {})
    monkeypatch.setattr(RunReport, "plot_later", lambda self: None)


def small_run(betons, *extra):
    return load_config("cpu-smoke.toml", [f"--data.path={betons}", "--data.workers=1", "--resolution.start=32",
                                          "--resolution.end=32", "--resolution.val=32", "--optim.lr=0.05",
                                          "--eval.flip_tta=false", *extra])


def test_training_reads_the_device_once_per_log_interval_plus_a_constant_per_epoch(betons, tmp_path,
                                                                                    monkeypatch):
    # 96 images / batch 4 = 24 steps an epoch, 7 epochs: 168 steps
    trainer = Trainer(small_run(betons, "--data.batch_size=4", "--schedule.epochs=7", "--train.log_every=50"),
                      tmp_path / "run")
    reads = []
    main = threading.main_thread()

    def counting(name):
        original = getattr(torch.Tensor, name)

        def read(tensor, *args, **kwargs):
            # FFCV takes numpy views of its host-side batch buffers when an epoch starts: never device memory
            caller = sys._getframe(1).f_code.co_filename
            if trainer.model.training and threading.current_thread() is main and "/ffcv/" not in caller:
                reads.append(name)
            return original(tensor, *args, **kwargs)
        return read

    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    assert trainer.fit() == 0
    steps, epochs = 7 * 24, 7
    assert trainer.global_step == steps
    # one read per log point (steps 50, 100, 150) and one at each epoch's end (before: over one a step)
    assert len(reads) <= steps // 50 + epochs, reads
    assert len(reads) / steps < 0.07


class ReplayLoader:
    """The trainer's loader, its first epoch's batches kept and replayed after that, `delay` seconds before
    each: from the second epoch on, a batch costs the injected delay plus microseconds, on any machine."""

    def __init__(self, loader, delay: float):
        self.loader, self.delay, self.kept = loader, delay, []

    def __getattr__(self, name):
        return getattr(self.loader, name)

    def __iter__(self):
        if not self.kept:
            for batch in self.loader:
                self.kept.append(batch)
                yield batch
            return
        for batch in self.kept:
            time.sleep(self.delay)
            yield batch


class SlowStep:
    """The trainer's step with `delay` seconds of host work added after each step."""

    def __init__(self, step, delay: float):
        self.inner, self.delay = step, delay

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, images, labels):
        self.inner(images, labels)
        time.sleep(self.delay)


def last_epoch_wait(betons, run_dir, batch_delay: float, step_delay: float) -> tuple[float, int]:
    """(seconds the last epoch waited for data, its steps)."""
    trainer = Trainer(small_run(betons, "--data.batch_size=16", "--schedule.epochs=2"), run_dir)
    trainer.train_loader = ReplayLoader(trainer.train_loader, batch_delay)
    trainer.train_step = SlowStep(trainer.train_step, step_delay)
    assert trainer.fit() == 0
    last = pd.read_csv(run_dir / "metrics.csv").iloc[-1]
    return float(last["data_wait_pct"]) / 100 * float(last["epoch_time_s"]), trainer.plans[-1].steps


def test_data_wait_counts_the_time_spent_waiting_for_batches_and_not_the_step(betons, tmp_path):
    # Thresholds are shares of the injected delays, so a busy or slow machine moves them by microseconds.
    delay = 0.3
    waited, steps = last_epoch_wait(betons, tmp_path / "slow-data", batch_delay=delay, step_delay=0.0)
    injected = steps * delay
    assert injected <= waited <= 1.5 * injected, (waited, injected)
    waited, steps = last_epoch_wait(betons, tmp_path / "slow-step", batch_delay=0.0, step_delay=delay)
    assert waited <= 0.25 * steps * delay, (waited, steps * delay)   # the slow step is not data wait


def test_the_trainer_and_the_train_step_benchmark_get_their_step_from_the_same_builder(betons, tmp_path,
                                                                                       monkeypatch):
    from benchmarks.train_step import build_train_step, synthetic_rate

    built = []
    original = fastpipe.train.assemble.build_step

    def spy(config, runtime, *args, **kwargs):
        step = original(config, runtime, *args, **kwargs)
        built.append((config.model.arch, step))
        return step

    monkeypatch.setattr(fastpipe.train.assemble, "build_step", spy)
    config = small_run(betons, "--data.batch_size=16", "--schedule.epochs=1", "--model.compile=true",
                       "--model.compile_backend=aot_eager")
    trainer = Trainer(config, tmp_path / "run")
    bench = build_train_step(config, num_classes=4, device="cpu")
    assert [arch for arch, _ in built] == ["resnet18", "resnet18"]
    assert built[0][1] is trainer.train_step and built[1][1] is bench.training.step
    assert type(trainer.train_step) is type(bench.training.step)
    # the same compile settings: static shapes, so one graph per shape in both
    synthetic_rate(bench, 8, 32, 4, steps=2)
    synthetic_rate(bench, 8, 48, 4, steps=2)
    assert bench.graphs == 2


def test_fused_optimizer_skips_the_update_on_the_device_after_a_non_finite_loss(betons):
    from fastpipe.train.assemble import build_benchmark_training
    from fastpipe.train.runtime import build_runtime

    config = small_run(betons, "--data.batch_size=8")
    training = build_benchmark_training(config, 4, build_runtime(config))
    step = training.step
    images, labels = torch.randn(8, 3, 32, 32), torch.randint(0, 4, (8,))
    step(images, labels)
    weights = {k: v.clone() for k, v in training.model.named_parameters()}
    momentum = {id(p): s["momentum_buffer"].clone() for p, s in training.optimizer.state.items()}
    criterion = step.criterion
    step.criterion = lambda logits, targets: criterion(logits, targets) * float("nan")
    step(images, labels)
    step.criterion = criterion
    step(images, labels)   # finite again, but the run is poisoned: still no update
    assert all(torch.equal(weights[k], v) for k, v in training.model.named_parameters())
    assert all(torch.equal(momentum[id(p)], s["momentum_buffer"]) for p, s in training.optimizer.state.items())
    totals = step.read()
    assert totals.nonfinite == 1 and totals.first_nonfinite == 1 and totals.samples == 16


def test_a_skipped_first_step_leaves_zero_momentum_not_uninitialised_memory(betons):
    from fastpipe.train.assemble import build_benchmark_training
    from fastpipe.train.runtime import build_runtime

    config = small_run(betons, "--data.batch_size=8")
    training = build_benchmark_training(config, 4, build_runtime(config))
    step, criterion = training.step, training.step.criterion
    step.criterion = lambda logits, targets: criterion(logits, targets) * float("nan")
    step(torch.randn(8, 3, 32, 32), torch.randint(0, 4, (8,)))
    buffers = [state["momentum_buffer"] for state in training.optimizer.state.values()]
    assert buffers and all(torch.count_nonzero(buffer) == 0 for buffer in buffers)


def test_restored_optimizer_stays_fused_whatever_the_checkpoint_says(betons):
    from fastpipe.train.assemble import build_benchmark_training
    from fastpipe.train.checkpoint import restore_training, training_state
    from fastpipe.train.runtime import build_runtime

    config = small_run(betons, "--data.batch_size=8")
    training = build_benchmark_training(config, 4, build_runtime(config))
    state = training_state(model=training.model, optimizer=training.optimizer, scheduler=training.scheduler,
                           scaler=training.step.scaler, epoch=0, completed=True, step=0, global_step=0,
                           config={}, classes=[], peak_lr=0.1, lr_scale=1.0, best_top1=0.0, epochs_since_best=0)
    for group in state["optimizer"]["param_groups"]:   # as an older, unfused optimizer saved it
        group["fused"] = None
    restore_training(state, model=training.model, optimizer=training.optimizer, scheduler=training.scheduler,
                     scaler=training.step.scaler)
    assert all(group["fused"] for group in training.optimizer.param_groups)
    training.step(torch.randn(8, 3, 32, 32), torch.randint(0, 4, (8,)))   # found_inf needs the fused kernel


def test_fp16_loss_scale_goes_back_to_its_last_healthy_value_after_a_non_finite_stop():
    from fastpipe.train.runtime import resolve_precision
    from fastpipe.train.step import TrainStep

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, fused=True)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=100)
    step = TrainStep(model, optimizer, scheduler, torch.nn.CrossEntropyLoss(), resolve_precision("fp16", "cpu"),
                     total_steps=100)
    images, labels = torch.randn(4, 3, 2, 2), torch.randint(0, 3, (4,))
    step(images, labels)
    assert step.read().nonfinite == 0
    healthy_scale = step.scaler.get_scale()
    criterion = step.criterion
    step.criterion = lambda logits, targets: criterion(logits, targets) * float("nan")
    for _ in range(3):
        step(images, labels)
    assert step.scaler.get_scale() < healthy_scale   # each skipped step halved it
    assert step.read().nonfinite == 3
    step.restore_healthy_state()
    assert step.scaler.get_scale() == healthy_scale
