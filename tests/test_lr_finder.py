"""LR range test: exact state restoration, a useful suggestion on a toy problem, stopping, outputs."""
from __future__ import annotations

import copy
import random

import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.image import imread

from fastpipe.train.lr_finder import find_lr

FEATURES, CLASSES, SAMPLES, BATCH = 16, 4, 1024, 32


@pytest.fixture(autouse=True)
def single_thread(request):
    """The toy models are tiny: one intra-op thread is faster than two on a busy 2-core machine."""
    if "betons" in request.fixturenames:  # the CLI test runs a real ResNet: leave it the threads
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def blobs(seed: int = 0):
    """Four overlapping Gaussian blobs: learnable, but not so easy that every LR works."""
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(CLASSES, FEATURES, generator=gen)
    labels = torch.randint(0, CLASSES, (SAMPLES,), generator=gen)
    inputs = centers[labels] + torch.randn(SAMPLES, FEATURES, generator=gen)
    return inputs, labels


def batches_of(inputs, labels):
    return [(inputs[i:i + BATCH], labels[i:i + BATCH]) for i in range(0, len(inputs), BATCH)]


def mlp(seed: int = 0, extras: bool = False) -> torch.nn.Module:
    torch.manual_seed(seed)
    layers = [torch.nn.Linear(FEATURES, 32)]
    if extras:  # BN buffers and dropout's RNG use make restoration harder to get right
        layers += [torch.nn.BatchNorm1d(32), torch.nn.Dropout(0.2)]
    layers += [torch.nn.ReLU(), torch.nn.Linear(32, CLASSES)]
    return torch.nn.Sequential(*layers)


def train_step(model, optimizer, batch, scaler=None):
    images, labels = batch
    optimizer.zero_grad(set_to_none=True)
    loss = torch.nn.functional.cross_entropy(model(images), labels)
    if scaler is None:
        loss.backward()
        optimizer.step()
    else:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    return loss


def assert_same_tensors(left: dict, right: dict):
    assert left.keys() == right.keys()
    for name, tensor in left.items():
        assert torch.equal(tensor, right[name]), name


def rng_fingerprint():
    return (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state().clone())


def test_model_optimizer_scaler_and_rng_are_restored_bitwise():
    data = batches_of(*blobs())
    model = mlp(extras=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0, growth_interval=3)
    train_step(model, optimizer, data[0], scaler)  # momentum buffers and scaler counters now exist
    train_step(model, optimizer, data[1], scaler)
    model[2].eval()  # a mixed train/eval module tree must come back as it was
    random.seed(3), np.random.seed(3), torch.manual_seed(3)

    twin_model = copy.deepcopy(model)
    twin_optimizer = torch.optim.SGD(twin_model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    twin_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    twin_scaler = torch.amp.GradScaler("cpu", init_scale=8.0, growth_interval=3)
    twin_scaler.load_state_dict(scaler.state_dict())
    before_model = {k: v.clone() for k, v in model.state_dict().items()}
    before_grads = [p.grad.clone() for p in model.parameters()]
    before_optimizer = copy.deepcopy(optimizer.state_dict())
    before_scaler = copy.deepcopy(scaler.state_dict())
    before_modes = [m.training for m in model.modules()]
    before_rng = rng_fingerprint()

    result = find_lr(model, optimizer, torch.nn.CrossEntropyLoss(), data, start_lr=1e-4, end_lr=1.0,
                     steps=40, scaler=scaler)
    assert len(result.lrs) > 10  # the sweep really trained, so there was something to undo

    assert_same_tensors(model.state_dict(), before_model)
    for param, grad in zip(model.parameters(), before_grads):
        assert torch.equal(param.grad, grad)
    assert [m.training for m in model.modules()] == before_modes
    after_optimizer = optimizer.state_dict()
    assert after_optimizer["param_groups"] == before_optimizer["param_groups"]
    for key, state in before_optimizer["state"].items():
        assert_same_tensors(after_optimizer["state"][key], state)
    assert scaler.state_dict() == before_scaler
    after_rng = rng_fingerprint()
    assert after_rng[0] == before_rng[0]
    assert np.array_equal(after_rng[1], before_rng[1])
    assert torch.equal(after_rng[2], before_rng[2])

    # The strongest check: training continues exactly as if the sweep never happened.
    model.train(), twin_model.train()
    for net, opt, scl in ((model, optimizer, scaler), (twin_model, twin_optimizer, twin_scaler)):
        torch.manual_seed(5)  # same dropout masks for both
        for batch in data[2:5]:
            train_step(net, opt, batch, scl)
    assert_same_tensors(model.state_dict(), twin_model.state_dict())


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_suggestion_lies_in_the_range_where_training_works(momentum):
    inputs, labels = blobs()
    data = batches_of(inputs, labels)

    def final_loss(lr: float) -> float:
        # the suggestion is OneCycleLR's max_lr: train the way the trainer does, warm-up and annealing
        model = mlp()
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=2 * len(data),
                                                       pct_start=0.125, cycle_momentum=momentum > 0,
                                                       base_momentum=0.85 * momentum, max_momentum=momentum)
        for _ in range(2):
            for batch in data:
                train_step(model, optimizer, batch)
                schedule.step()
        with torch.no_grad():
            loss = torch.nn.functional.cross_entropy(model(inputs), labels).item()
        return loss if np.isfinite(loss) else np.inf

    grid = np.logspace(-4, 1, 16)
    losses = np.array([final_loss(lr) for lr in grid])
    good = grid[losses <= 5 * losses.min()]  # within 5x of the best loss a grid LR reached
    assert good.min() > grid[0] and good.max() < grid[-1]  # the toy problem has a real good range

    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=momentum)
    result = find_lr(model, optimizer, torch.nn.CrossEntropyLoss(), data, start_lr=1e-4, end_lr=10,
                     steps=100)
    # the suggestion itself trains: its final loss is within 5x of the best the grid reached
    assert final_loss(result.suggestion) <= 5 * losses.min(), (result.suggestions(), good)
    assert result.stopped_early and "exceeded 4x" in result.reason  # large LRs blow this problem up
    assert len(result.lrs) < 100
    assert result.lrs == sorted(result.lrs) and result.lrs[0] == pytest.approx(1e-4)
    assert result.rule == "edge" and result.suggestion == result.edge
    for lr in result.suggestions().values():
        assert result.lrs[0] <= lr <= result.lrs[-1]


def test_non_finite_loss_stops_the_sweep_and_still_restores():
    data = batches_of(*blobs())
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []

    def criterion(logits, labels):
        calls.append(1)
        loss = torch.nn.functional.cross_entropy(logits, labels)
        return loss * float("nan") if len(calls) == 7 else loss

    result = find_lr(model, optimizer, criterion, data, steps=50)
    assert result.stopped_early
    assert "nan" in result.reason
    assert len(result.losses) == 6 and all(np.isfinite(result.losses))
    assert_same_tensors(model.state_dict(), before)


def test_short_loader_is_cycled_and_empty_loader_is_an_error():
    data = batches_of(*blobs())[:3]
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    result = find_lr(model, optimizer, torch.nn.CrossEntropyLoss(), data, start_lr=1e-5, end_lr=1e-3,
                     steps=20)
    assert len(result.lrs) == 20 and not result.stopped_early
    with pytest.raises(ValueError, match="no batches"):
        find_lr(model, optimizer, torch.nn.CrossEntropyLoss(), iter([]), steps=5)
    with pytest.raises(ValueError, match="start_lr"):
        find_lr(model, optimizer, torch.nn.CrossEntropyLoss(), data, start_lr=1.0, end_lr=0.1)


def test_writes_csv_and_png_with_the_sweep(tmp_path):
    data = batches_of(*blobs())
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    result = find_lr(model, optimizer, torch.nn.CrossEntropyLoss(), data, start_lr=1e-4, end_lr=10,
                     steps=60, out_dir=tmp_path / "finder")
    assert result.csv_path == tmp_path / "finder" / "lr_finder.csv"
    table = pd.read_csv(result.csv_path)
    assert list(table.columns) == ["step", "lr", "loss", "smoothed_loss"]
    assert len(table) == len(result.lrs)
    np.testing.assert_allclose(table["lr"], result.lrs)
    np.testing.assert_allclose(table["smoothed_loss"], result.smoothed)
    image = imread(result.png_path)
    assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 500


def test_lr_find_cli_sweeps_a_config_and_writes_outputs(betons, tmp_path, capsys, monkeypatch):
    from fastpipe.lr_find import main
    from fastpipe.train.step import TrainStep

    stepped = []   # the sweep runs the trainer's own step, once per LR
    original = TrainStep.__call__
    monkeypatch.setattr(TrainStep, "__call__", lambda self, *batch: stepped.append(1) or original(self, *batch))

    out = tmp_path / "sweep"
    code = main(["--config", "cpu-smoke.toml", f"--data.path={betons}", "--data.backend=torch",
                 "--data.workers=1", "--data.batch_size=8", "--resolution.start=32", "--resolution.end=32",
                 "--lr_finder.steps=6", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "edge of the valley (suggestion)" in printed and "--optim.lr=" in printed
    command = next(line for line in printed.splitlines() if line.startswith("Train with it:"))
    assert f"--data.path={betons}" in command and "--lr_finder.steps" not in command   # same data, new LR
    table = pd.read_csv(out / "lr_finder.csv")
    assert len(table) == 6 and len(stepped) == 6
    summary = pd.read_json(out / "lr_finder.json", typ="series")
    assert table["lr"].min() <= summary["edge"] <= table["lr"].max() and summary["rule"] == "edge"
    assert (out / "lr_finder.png").stat().st_size > 1000
    assert main(["--config", "cpu-smoke.toml", "--optim.lrr=1"]) == 2  # config errors name the key
    assert "optim.lr" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_amp_sweep_restores_weights_scaler_and_cuda_rng(dtype):
    from functools import partial

    device = torch.device("cuda")
    inputs, labels = blobs()
    data = batches_of(inputs.to(device), labels.to(device))
    model = mlp(extras=True).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    train_step(model, optimizer, data[0], scaler)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    before_scaler = copy.deepcopy(scaler.state_dict())
    cuda_rng = torch.cuda.get_rng_state()

    result = find_lr(model, optimizer, torch.nn.CrossEntropyLoss(), data, start_lr=1e-4, end_lr=10, steps=60,
                     autocast=partial(torch.autocast, "cuda", dtype=dtype),
                     scaler=scaler if scaler.is_enabled() else None)
    assert result.suggestion is not None
    assert_same_tensors(model.state_dict(), before)
    assert scaler.state_dict() == before_scaler
    assert torch.equal(torch.cuda.get_rng_state(), cuda_rng)
