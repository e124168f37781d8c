"""Evaluation: hand-computed top-1/top-k and loss, flip TTA, predictions.csv, sample ids from the manifest."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from fastpipe.config import load_config
from fastpipe.data.sample_table import split_samples
from fastpipe.evaluate import evaluate, manifest_sample_ids, write_predictions


class Identity(torch.nn.Module):
    """Logits are the inputs themselves, so every score is chosen by the test."""

    def __init__(self):
        super().__init__()
        self.bn = torch.nn.BatchNorm1d(1)  # gives the model a train/eval mode worth restoring

    def forward(self, x):
        return x


def logits_with_true_rank(num_classes: int, label: int, rank: int) -> list[float]:
    """Scores where `label` is the (rank+1)-th highest: other classes get 10, 9, 8, ... in order."""
    others = [c for c in range(num_classes) if c != label]
    order = others[:rank] + [label] + others[rank:]
    scores = [0.0] * num_classes
    for position, cls in enumerate(order):
        scores[cls] = 10.0 - position
    return scores


def cross_entropy_by_hand(scores: list[float], label: int) -> float:
    return -scores[label] + math.log(sum(math.exp(s) for s in scores))


def test_top1_top5_and_loss_match_hand_computed_values():
    labels = [0, 3, 6, 2, 5, 1]
    ranks = [0, 0, 3, 5, 4, 6]  # top-1 hits: 2; top-5 hits (rank < 5): 4
    rows = [logits_with_true_rank(7, label, rank) for label, rank in zip(labels, ranks)]
    inputs, targets = torch.tensor(rows), torch.tensor(labels)
    batches = [(inputs[:4], targets[:4]), (inputs[4:], targets[4:])]  # unequal batches: loss is per sample
    model = Identity().train()

    result = evaluate(model, batches)
    assert result.count == 6 and result.topk == 5 and result.num_classes == 7
    assert result.top1 == pytest.approx(2 / 6)
    assert result.top5 == pytest.approx(4 / 6)
    expected_loss = sum(cross_entropy_by_hand(r, y) for r, y in zip(rows, labels)) / 6
    assert result.loss == pytest.approx(expected_loss, rel=1e-5)
    assert result.targets.tolist() == labels
    assert result.preds.tolist() == [int(np.argmax(r)) for r in rows]
    top_probability = math.exp(10) / sum(math.exp(10 - i) for i in range(7))
    np.testing.assert_allclose(result.confidences, top_probability, rtol=1e-5)
    assert model.training and model.bn.training  # mode restored


def test_top5_falls_back_to_top_k_with_fewer_classes():
    rows = [logits_with_true_rank(3, 1, 2), logits_with_true_rank(3, 0, 1)]
    result = evaluate(Identity(), [(torch.tensor(rows), torch.tensor([1, 0]))])
    assert result.topk == 3
    assert result.top1 == 0.0 and result.top5 == 1.0


def test_flip_tta_averages_the_mirrored_batch():
    # Class 0 looks at the left pixel (weight 2), class 1 at the right pixel (weight 1): not flip-invariant.
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(2, 2, bias=False))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[2.0, 0.0], [0.0, 1.0]]))
    images = torch.tensor([[0.0, 1.0]]).reshape(1, 1, 1, 2)  # NCHW, width 2
    labels = torch.tensor([0])

    plain = evaluate(model, [(images, labels)])
    mirrored = evaluate(model, [(images, labels)], flip_tta=True)
    # plain logits [0, 1] -> class 1; mirrored image gives [2, 0]; average [1, 0.5] -> class 0
    assert plain.preds.tolist() == [1] and plain.top1 == 0.0
    assert mirrored.preds.tolist() == [0] and mirrored.top1 == 1.0
    assert mirrored.confidences[0] == pytest.approx(1 / (1 + math.exp(-0.5)), rel=1e-6)
    assert mirrored.loss == pytest.approx(cross_entropy_by_hand([1.0, 0.5], 0), rel=1e-6)


def test_class_count_mismatch_and_empty_loader_are_clear_errors():
    batch = (torch.eye(3), torch.arange(3))
    with pytest.raises(ValueError, match="2 class names for 3 model outputs"):
        evaluate(Identity(), [batch], classes=["a", "b"])
    with pytest.raises(ValueError, match="no batches"):
        evaluate(Identity(), [])


def test_predictions_csv_has_one_row_per_sample_in_loader_order(tmp_path):
    rows = [logits_with_true_rank(3, label, rank) for label, rank in [(0, 0), (2, 1), (1, 0), (2, 2)]]
    result = evaluate(Identity(), [(torch.tensor(rows), torch.tensor([0, 2, 1, 2]))],
                      classes=["cat", "dog", "eel"])

    by_index = pd.read_csv(write_predictions(result, tmp_path / "by_index.csv"))
    assert list(by_index.columns) == ["index", "true", "predicted", "confidence"]
    assert by_index["index"].tolist() == [0, 1, 2, 3]
    assert by_index["true"].tolist() == ["cat", "eel", "dog", "eel"]
    assert by_index["predicted"].tolist() == ["cat", "cat", "dog", "cat"]
    np.testing.assert_allclose(by_index["confidence"], result.confidences, atol=1e-6)

    paths = [f"val/x/{i}.jpg" for i in range(4)]
    by_path = pd.read_csv(write_predictions(result, tmp_path / "by_path.csv", sample_ids=paths))
    assert list(by_path.columns) == ["path", "true", "predicted", "confidence"]
    assert by_path["path"].tolist() == paths
    with pytest.raises(ValueError, match="3 sample ids for 4 predictions"):
        write_predictions(result, tmp_path / "bad.csv", sample_ids=paths[:3])


def test_sample_ids_come_from_the_manifest_only_when_the_order_matches():
    manifest = {"splits": {"val": {"samples": [["a/1.jpg", 0], ["b/2.jpg", 1], ["a/3.jpg", 0]]}}}
    assert manifest_sample_ids(manifest, "val", np.array([0, 1, 0])).names() == ["a/1.jpg", "b/2.jpg", "a/3.jpg"]
    assert manifest_sample_ids(manifest, "val", np.array([1, 0, 0])) is None  # shuffled loader
    assert manifest_sample_ids(manifest, "val", np.array([0, 1])) is None  # dropped or sharded samples


class ListLoader(list):
    """Batches plus the attributes fastpipe's loaders carry."""

    def __init__(self, batches, manifest, shuffle):
        super().__init__(batches)
        self.manifest, self.split, self.shuffle = manifest, "val", shuffle


def test_evaluate_takes_sample_paths_from_an_unshuffled_loader():
    manifest = {"splits": {"val": {"samples": [["a/1.jpg", 0], ["b/2.jpg", 1], ["a/3.jpg", 0]]}}}
    batches = [(torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0]]), torch.tensor([0, 1, 0]))]
    assert evaluate(Identity(), ListLoader(batches, manifest, shuffle=False)).sample_ids.names() == \
        ["a/1.jpg", "b/2.jpg", "a/3.jpg"]
    assert evaluate(Identity(), ListLoader(batches, manifest, shuffle=True)).sample_ids is None


@pytest.fixture(scope="module")
def saved_run(betons, tmp_path_factory):
    """A run directory as the trainer leaves it (config.toml + best.pt), with untrained weights."""
    from fastpipe.config import load_config, to_toml
    from fastpipe.data.beton import read_manifest
    from fastpipe.model import build_resnet
    from fastpipe.train.checkpoint import save_checkpoint

    run_dir = tmp_path_factory.mktemp("run")
    config = load_config("cpu-smoke.toml", [f"--data.path={betons}", "--data.backend=torch", "--data.workers=1",
                                            "--data.val_batch_size=12", "--resolution.val=32",
                                            "--eval.flip_tta=true"])
    (run_dir / "config.toml").write_text(to_toml(config))
    classes = read_manifest(betons)["classes"]
    torch.manual_seed(0)
    model = build_resnet("resnet18", len(classes), blurpool=False)
    save_checkpoint(run_dir / "best.pt", {"model": model.state_dict(), "epoch": 2, "classes": classes})
    return run_dir, read_manifest(betons)


@pytest.mark.parametrize("backend", ["ffcv", "dali", "torch"])
def test_evaluate_cli_writes_the_report_with_manifest_paths_and_classes_for_every_backend(saved_run, capsys,
                                                                                         backend):
    from fastpipe.evaluate import main

    run_dir, manifest = saved_run
    out = run_dir / f"eval-{backend}"
    # one image a batch: 32 batches, so a loader that recycles its label buffers would show it
    assert main([str(run_dir), "--checkpoint", "best", "--backend", backend, "--out", str(out),
                 "--data.val_batch_size=1"]) == 0
    assert "top-1" in capsys.readouterr().out
    samples = split_samples(load_config(run_dir / "config.toml").data.path, "val")
    predictions = pd.read_csv(out / "predictions.csv")
    assert predictions["path"].tolist() == [path for path, _ in samples]
    assert predictions["true"].tolist() == [manifest["classes"][label] for _, label in samples]
    summary = pd.read_json(out / "eval.json", typ="series")
    assert summary["count"] == len(samples) and summary["epoch"] == 3 and summary["flip_tta"]
    assert summary["top1"] == pytest.approx((predictions["true"] == predictions["predicted"]).mean())
    per_class = pd.read_csv(out / "per_class.csv")
    assert per_class["support"].tolist() == np.bincount([label for _, label in samples]).tolist()
    assert (out / "confusion_matrix.png").stat().st_size > 1000


def test_evaluate_cli_reports_a_missing_checkpoint_clearly(saved_run, capsys):
    from fastpipe.evaluate import main

    run_dir, _ = saved_run
    assert main([str(run_dir), "--checkpoint", "last"]) == 1
    assert "last.pt does not exist" in capsys.readouterr().err
    assert main([str(run_dir.parent)]) == 2
    assert "no config.toml" in capsys.readouterr().err
