"""Evaluation: loss, top-1/top-5 and per-sample predictions of a model over a loader (optionally with flip
TTA), and `python -m fastpipe.evaluate RUN_DIR` to re-evaluate a saved checkpoint with the full report.
"""
from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fastpipe.config import ConfigError, argument_parser, load_config
from fastpipe.data.beton import BetonError, write_json_atomic
from fastpipe.model import stem_of
from fastpipe.report.classes import class_names, eval_summary, write_class_report, write_predictions  # noqa: F401 - public API
from fastpipe.report.run import environment
from fastpipe.train.assemble import build_model, loader_for
from fastpipe.train.checkpoint import CheckpointError, evaluation_weights, load_checkpoint
from fastpipe.train.runtime import build_runtime


@dataclass
class EvalResult:
    """Accuracies are fractions in [0, 1]; `top5` is top-`topk` when there are fewer than 5 classes.
    targets/preds/confidences are per sample, in loader order; `sample_ids` are the samples' paths when
    the loader is one of ours reading its split unshuffled and whole (else None: rows are indices)."""
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
    sample_ids: list[str] | None = None

    def metrics(self) -> dict[str, float]:
        return {"val_loss": self.loss, "val_top1": self.top1, "val_top5": self.top5}


def evaluate(model: torch.nn.Module, loader: Iterable, *, criterion: Callable | None = None,
             autocast: Callable[[], AbstractContextManager] = nullcontext, flip_tta: bool = False,
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
                # our own copy: FFCV hands out the same label buffer again a few batches later
                labels = labels.to(logits.device, copy=True)
                loss_sum += criterion(logits, labels).detach() * len(labels)
                hits = logits.topk(topk, dim=1).indices == labels[:, None]
                correct1 += hits[:, 0].sum()
                correctk += hits.any(dim=1).sum()
                confidence, predicted = logits.softmax(dim=1).max(dim=1)
                targets.append(labels)
                preds.append(predicted)
                confidences.append(confidence)
                count += len(labels)
            if count == 0:
                raise ValueError("Evaluation got no batches: the val loader is empty (check data.path, the val "
                                 "split in the manifest, and that drop_last is off for evaluation).")
            # the pass's reads from the device, all after the last batch
            loss_sum, correct1, correctk = torch.stack([loss_sum.double(), correct1.double(),
                                                        correctk.double()]).tolist()
            targets, preds = torch.cat(targets).cpu().numpy(), torch.cat(preds).cpu().numpy()
            confidences = torch.cat(confidences).float().cpu().numpy()
    finally:
        for module, training in modes.items():
            module.training = training
    sample_ids = None
    if getattr(loader, "shuffle", True) is False and hasattr(loader, "manifest"):
        sample_ids = manifest_sample_ids(loader.manifest, getattr(loader, "split", "val"), targets)
    return EvalResult(loss=loss_sum / count, top1=correct1 / count, top5=correctk / count, targets=targets,
                      preds=preds, confidences=confidences, count=count, topk=topk, num_classes=num_classes,
                      classes=list(classes) if classes else None, sample_ids=sample_ids)


def manifest_sample_ids(manifest: dict, split: str, targets: np.ndarray) -> list[str] | None:
    """Sample paths for predictions.csv, or None when the loader's order is not the manifest's
    (checked by comparing labels, so a shuffled or sharded loader falls back to indices)."""
    samples = manifest.get("splits", {}).get(split, {}).get("samples") or []
    if len(samples) != len(targets):
        return None
    labels = np.fromiter((label for _, label in samples), dtype=np.int64, count=len(samples))
    return [path for path, _ in samples] if np.array_equal(labels, targets) else None


def evaluate_run(run_dir: Path, checkpoint: str = "best", overrides: list[str] = (),
                 out_dir: Path | None = None) -> dict:
    """Re-evaluate RUN_DIR/<checkpoint>.pt on the val split with RUN_DIR/config.toml (plus overrides) and
    write the end-of-training report (predictions, per-class, confusions, eval.json) to RUN_DIR/eval-<name>/."""
    if not (run_dir / "config.toml").is_file():
        raise ConfigError(f"{run_dir} has no config.toml: pass a run directory written by `python -m fastpipe.train`.")
    config = load_config(run_dir / "config.toml", list(overrides))
    path = run_dir / f"{checkpoint}.pt" if checkpoint in ("best", "last") else Path(checkpoint)
    state = load_checkpoint(path)
    classes = list(state.get("classes") or [])
    if not classes:
        raise CheckpointError(f"{path} holds no class names; it was not written by fastpipe.train.")

    runtime = build_runtime(config)
    model = build_model(config, len(classes), runtime, stem=stem_of(state))   # the stem the weights were trained with
    try:
        model.load_state_dict(evaluation_weights(state))
    except RuntimeError as err:
        raise CheckpointError(f"{path} does not fit model.arch={config.model.arch} with model.width="
                              f"{config.model.width}, model.blurpool={config.model.blurpool}: "
                              f"{str(err).splitlines()[0]}") from err
    data, precision = config.data, runtime.precision
    loader = loader_for(config, "val", runtime)
    if list(loader.classes) != classes:
        raise CheckpointError(f"{path} was trained on other classes than {data.path} holds; point "
                              f"--data.path at the data set the run used.")
    result = evaluate(model, loader, criterion=F.cross_entropy, autocast=precision.autocast,
                      flip_tta=config.eval.flip_tta, classes=classes)
    out_dir = out_dir or run_dir / f"eval-{path.stem}"
    files = write_class_report(out_dir, result, classes)
    summary = {"checkpoint": str(path), "epoch": int(state["epoch"]) + 1, **eval_summary(result, classes),
               "weights": state.get("eval_weights", "raw"),
               "backend": data.backend, "resolution": config.resolution.val, "flip_tta": config.eval.flip_tta,
               "precision": precision.name, "files": {k: str(v) for k, v in files.items()},
               "environment": environment()}
    write_json_atomic(out_dir / "eval.json", summary)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argument_parser("python -m fastpipe.evaluate", "Re-evaluate a training run's checkpoint on the "
                             "val split and write the full report.",
                             "python -m fastpipe.evaluate runs/r18 --checkpoint last --backend torch")
    parser.add_argument("run_dir", type=Path, help="a run directory written by `python -m fastpipe.train`")
    parser.add_argument("--checkpoint", default="best", help="best, last, or a path to a .pt file (default: best)")
    parser.add_argument("--backend", help="loader backend (ffcv, dali, torch); default: the run's")
    parser.add_argument("--out", type=Path, help="output folder (default: RUN_DIR/eval-<checkpoint>)")
    args, overrides = parser.parse_known_args(argv)
    if args.backend:
        overrides.append(f"--data.backend={args.backend}")
    try:
        summary = evaluate_run(args.run_dir, args.checkpoint, overrides, args.out)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    except (BetonError, CheckpointError, ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"{summary['checkpoint']} (epoch {summary['epoch']}): val loss {summary['loss']:.4f}, "
          f"top-1 {summary['top1']:.2%}, top-{summary['topk']} {summary['top5']:.2%} on {summary['count']} images")
    print(f"Report: {Path(summary['files']['predictions']).parent} (predictions.csv, per_class.csv, "
          f"top_confusions.csv, confusion_matrix.png, eval.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
