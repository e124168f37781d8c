"""Evaluation: loss, top-1/top-5 and per-sample predictions of a model over a loader (optionally with flip
TTA), and `python -m fastpipe.evaluate RUN_DIR` to re-evaluate a saved checkpoint with the full report.
"""
from __future__ import annotations

import argparse
import sys
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager, Iterable

import numpy as np
import torch
import torch.nn.functional as F

from fastpipe.report import class_names, write_class_report, write_predictions  # noqa: F401 - public API


@dataclass
class EvalResult:
    """Accuracies are fractions in [0, 1]; `top5` is top-`topk` when there are fewer than 5 classes.
    targets/preds/confidences are per sample, in loader order."""

    loss: float
    top1: float
    top5: float
    targets: np.ndarray
    preds: np.ndarray
    confidences: np.ndarray  # softmax probability of the predicted class
    count: int
    topk: int
    num_classes: int
    classes: list[str] | None = None

    def metrics(self) -> dict[str, float]:
        return {"val_loss": self.loss, "val_top1": self.top1, "val_top5": self.top5}


def evaluate(model: torch.nn.Module, loader: Iterable, *, criterion: Callable | None = None,
             autocast: Callable[[], ContextManager] = nullcontext, flip_tta: bool = False,
             classes: list[str] | None = None) -> EvalResult:
    """Run `model` in eval mode over `loader` ((images NCHW, labels) batches) without gradients.

    `criterion` returns the batch-mean loss (default: plain cross-entropy); `autocast()` wraps the
    forward passes; `flip_tta` averages the logits of each batch and its left-right mirror. The train/
    eval mode of every submodule is restored afterwards. Works on CPU and CUDA.
    """
    criterion = criterion or F.cross_entropy
    modes = {module: module.training for module in model.modules()}
    model.eval()
    loss_sum, correct1, correctk, count = 0.0, 0, 0, 0
    targets, preds, confidences = [], [], []
    topk = num_classes = None
    try:
        with torch.no_grad():
            for images, labels in loader:
                with autocast():
                    logits = model(images)
                    mirrored = model(images.flip(-1)) if flip_tta else None
                logits = logits.float()
                if mirrored is not None:
                    logits = (logits + mirrored.float()) / 2
                if num_classes is None:
                    num_classes = logits.shape[1]
                    topk = min(5, num_classes)
                    class_names(classes, num_classes)  # fail before the whole pass if they disagree
                labels = labels.to(logits.device)
                loss_sum += criterion(logits, labels).detach() * len(labels)
                hits = logits.topk(topk, dim=1).indices == labels[:, None]
                correct1 += hits[:, 0].sum()
                correctk += hits.any(dim=1).sum()
                confidence, predicted = logits.softmax(dim=1).max(dim=1)
                targets.append(labels)
                preds.append(predicted)
                confidences.append(confidence)
                count += len(labels)
    finally:
        for module, training in modes.items():
            module.training = training
    if count == 0:
        raise ValueError("Evaluation got no batches: the val loader is empty (check data.path, the val "
                         "split in the manifest, and that drop_last is off for evaluation).")
    return EvalResult(loss=float(loss_sum) / count, top1=int(correct1) / count, top5=int(correctk) / count,
                      targets=torch.cat(targets).cpu().numpy(), preds=torch.cat(preds).cpu().numpy(),
                      confidences=torch.cat(confidences).float().cpu().numpy(), count=count, topk=topk,
                      num_classes=num_classes, classes=list(classes) if classes else None)


def manifest_sample_ids(manifest: dict, split: str, targets: np.ndarray) -> list[str] | None:
    """Sample paths for predictions.csv, or None when the loader's order is not the manifest's
    (checked by comparing labels, so a shuffled or sharded loader falls back to indices)."""
    samples = manifest.get("splits", {}).get(split, {}).get("samples") or []
    if len(samples) != len(targets):
        return None
    labels = np.fromiter((label for _, label in samples), dtype=np.int64, count=len(samples))
    return [path for path, _ in samples] if np.array_equal(labels, targets) else None
