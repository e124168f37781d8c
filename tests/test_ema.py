"""EMA of weights (model.ema_decay): averaged weights and BatchNorm statistics that differ from the raw ones,
evaluated beside them every epoch, chosen for best.pt and by evaluate when better, and a resume that stays
bitwise exact with the average on."""
from __future__ import annotations

import pandas as pd
import pytest
import torch

from fastpipe.config import load_config
from fastpipe.evaluate import evaluate_run
from fastpipe.report.run import RunReport
from fastpipe.train import Trainer
from fastpipe.train.checkpoint import evaluation_weights, load_checkpoint, save_checkpoint
from fastpipe.train.ema import WeightAverage

TINY = ["--data.workers=1", "--data.batch_size=16", "--resolution.start=32", "--resolution.end=32",
        "--resolution.val=32", "--schedule.epochs=2", "--train.log_every=100", "--optim.lr=0.1",
        "--model.ema_decay=0.8", "--eval.flip_tta=false", "--train.deterministic=true"]


@pytest.fixture(scope="module", autouse=True)
def no_plots():
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(RunReport, "plot", lambda self, **kwargs: {})
        patch.setattr(RunReport, "plot_later", lambda self: None)
        yield


def ema_config(betons, *extra):
    return load_config("cpu-smoke.toml", [f"--data.path={betons}", *TINY, *extra])


@pytest.fixture(scope="module")
def ema_run(betons, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ema") / "run"
    assert Trainer(ema_config(betons), run_dir).fit() == 0
    return run_dir


def test_the_average_follows_weights_and_batchnorm_statistics_at_its_decay():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    average = WeightAverage(model, decay=0.75)
    average.updates = 40                      # past the warm-up: min(0.75, 41 / 50) = 0.75
    start = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model[0].weight.add_(2.0)
    model(torch.randn(8, 3))   # train-mode forward: new running statistics
    average.update()
    now = model.state_dict()
    for key in ("0.weight", "1.running_mean", "1.running_var"):
        # a quarter of the way to the new weights (0.75 and 0.25 told apart: the swapped update is the classic slip)
        torch.testing.assert_close(average.state_dict()[key], 0.75 * start[key] + 0.25 * now[key])
    assert average.state_dict()["1.num_batches_tracked"] == now["1.num_batches_tracked"] == 1
    assert average.updates == 41


def test_the_decay_warms_up_so_early_weights_fade_from_the_average():
    model = torch.nn.Linear(2, 1, bias=False)
    average = WeightAverage(model, decay=0.999)
    assert [average.decay_at(n) for n in (0, 90, 10_000)] == [0.1, 0.91, 0.999]
    with torch.no_grad():
        model.weight.fill_(0.0)
        average.module.weight.fill_(1.0)      # the "initial" weights
    average.update()                          # decay 0.1: 90% of the way to the weights at once
    torch.testing.assert_close(average.module.weight, torch.full_like(model.weight, 0.1))
    for _ in range(999):
        average.update()
    # a fixed 0.999 would keep 0.999 ** 1000 = 37% of the initial weights; the warm-up keeps under 1%
    assert average.module.weight.abs().max().item() < 0.01


def test_ema_weights_differ_from_the_raw_ones_and_both_are_evaluated_each_epoch(ema_run):
    history = pd.read_csv(ema_run / "metrics.csv")
    assert list(history["epoch"]) == [1, 2]
    assert history["ema_val_top1"].between(0, 1).all() and history["raw_val_top1"].between(0, 1).all()
    best_of_both = history[["ema_val_top1", "raw_val_top1"]].max(axis=1)
    assert (history["val_top1"] == best_of_both).all()
    last = load_checkpoint(ema_run / "last.pt")
    assert last["ema"].keys() == last["model"].keys()
    for key in ("conv1.weight", "fc.weight", "bn1.running_mean", "layer4.1.bn2.running_var"):
        assert not torch.equal(last["ema"][key], last["model"][key]), key
    assert "EMA of weights (decay 0.8)" in (ema_run / "train.log").read_text()


@pytest.mark.parametrize("weights", ["ema", "raw"])
def test_evaluate_uses_the_weights_the_checkpoint_marks_as_better(ema_run, tmp_path, weights):
    state = load_checkpoint(ema_run / "last.pt")
    state["eval_weights"] = weights
    save_checkpoint(tmp_path / "marked.pt", state)
    summary = evaluate_run(ema_run, str(tmp_path / "marked.pt"), ["--data.workers=1"], out_dir=tmp_path / "eval")
    last_epoch = pd.read_csv(ema_run / "metrics.csv").iloc[-1]
    assert summary["weights"] == weights
    assert summary["top1"] == pytest.approx(last_epoch[f"{weights}_val_top1"])
    assert evaluation_weights(state) is state[weights if weights == "ema" else "model"]


def test_best_pt_holds_the_weights_that_scored_best(ema_run):
    history = pd.read_csv(ema_run / "metrics.csv")
    best_epoch = history.loc[history["val_top1"].idxmax()]
    best = load_checkpoint(ema_run / "best.pt")
    assert best["eval_weights"] == ("ema" if best_epoch["ema_chosen"] else "raw")
    assert best["epoch"] + 1 == best_epoch["epoch"]


def test_resume_with_ema_on_ends_bitwise_equal_to_an_uninterrupted_run(betons, tmp_path):
    config = ema_config(betons)
    assert Trainer(config, tmp_path / "straight").fit() == 0
    first = Trainer(config, tmp_path / "resumed")
    first.plans = first.plans[:1]
    assert first.fit() == 0
    assert Trainer(config, tmp_path / "resumed", resume=True).fit() == 0
    a, b = load_checkpoint(tmp_path / "straight" / "last.pt"), load_checkpoint(tmp_path / "resumed" / "last.pt")
    for part in ("model", "ema"):
        for key, tensor in a[part].items():
            assert torch.equal(tensor, b[part][key]), (part, key)
    columns = ["train_loss", "val_loss", "ema_val_top1", "raw_val_top1"]
    assert pd.read_csv(tmp_path / "straight" / "metrics.csv")[columns].equals(
        pd.read_csv(tmp_path / "resumed" / "metrics.csv")[columns])
