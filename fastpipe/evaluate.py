"""Evaluation: loss, top-1/top-5 and per-sample predictions of a model over a loader (optionally with flip
TTA), and `python -m fastpipe.evaluate RUN_DIR` to re-evaluate a saved checkpoint with the full report.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fastpipe.config import ConfigError, argument_parser
from fastpipe.data.beton import BetonError, write_json_atomic
from fastpipe.data.sample_table import SampleTable
from fastpipe.report.classes import (  # noqa: F401 - write_predictions: public API
    REPORT_FILES,
    class_names,
    eval_summary,
    write_class_report,
    write_predictions,
)
from fastpipe.report.run import environment
from fastpipe.train.assemble import loader_for
from fastpipe.train.checkpoint import CheckpointError
from fastpipe.train.distributed import cleanup, gather_shards
from fastpipe.trained import load_trained


@dataclass
class EvalResult:
    """Accuracies are fractions in [0, 1]; `top5` is top-`topk` when there are fewer than 5 classes.
    targets/preds/confidences are per sample, in loader order; `sample_ids` names the samples' paths (the
    split's SampleTable) when the loader is one of ours reading its split unshuffled and whole (else None:
    rows are indices)."""
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
    sample_ids: list[str] | SampleTable | None = None
    shards: list[int] | None = None   # samples each rank evaluated (one entry: one process)

    def metrics(self) -> dict[str, float]:
        return {"val_loss": self.loss, "val_top1": self.top1, "val_top5": self.top5}


def evaluate(model: torch.nn.Module, loader: Iterable, *,
             autocast: Callable[[], AbstractContextManager] = nullcontext, flip_tta: bool = False,
             classes: list[str] | None = None) -> EvalResult:
    """Run `model` in eval mode over `loader` ((images NCHW, labels) batches) in inference mode.

    Cross-entropy per sample; `autocast()` wraps the forward passes; `flip_tta` averages the logits of each
    batch and its left-right mirror. A loader sharded over torchrun's ranks (one of ours built with
    distributed=True) evaluates its shard on each rank; the per-sample rows are then gathered, in the
    order of the whole split, onto every rank, so every rank gets the same result. The train/eval mode of
    every submodule is restored afterwards. Works on CPU and CUDA.
    """
    modes = {module: module.training for module in model.modules()}
    model.eval()
    rows, topk, num_classes = [], None, None
    try:
        with torch.inference_mode():
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
                hit_k = (logits.topk(topk, dim=1).indices == labels[:, None]).any(dim=1)
                confidence, predicted = logits.softmax(dim=1).max(dim=1)
                # one float64 row per sample (exact for the integers): what the ranks gather
                rows.append(torch.stack([F.cross_entropy(logits, labels, reduction="none").double(),
                                         labels.double(), predicted.double(), confidence.double(),
                                         hit_k.double()], dim=1))
            local = torch.cat(rows) if rows else torch.zeros((0, 5), dtype=torch.float64)
            world = int(getattr(loader, "world_size", 1))
            total = int(getattr(loader, "num_samples", len(local))) if world > 1 else len(local)
            # after the last batch: the pass's only reads from the device (and, sharded, its collectives)
            whole, shards = gather_shards(local, total, world)
            whole = whole.cpu().numpy()
    finally:
        for module, training in modes.items():
            module.training = training
    count = len(whole)
    if count == 0:
        raise ValueError("Evaluation got no batches: the val loader is empty (check data.path, the val "
                         "split in the manifest, and that drop_last is off for evaluation).")
    losses, targets, preds, confidences, hits_k = whole.T
    targets, preds = targets.astype(np.int64), preds.astype(np.int64)
    sample_ids = None
    if getattr(loader, "shuffle", True) is False and hasattr(loader, "manifest"):
        sample_ids = manifest_sample_ids(loader.manifest, getattr(loader, "split", "val"), targets,
                                         getattr(loader, "data_dir", ""))
    return EvalResult(loss=float(losses.mean()), top1=float((preds == targets).mean()), top5=float(hits_k.mean()),
                      targets=targets, preds=preds, confidences=confidences.astype(np.float32), count=count,
                      topk=topk, num_classes=num_classes, classes=list(classes) if classes else None,
                      sample_ids=sample_ids, shards=shards)


def manifest_sample_ids(manifest: dict, split: str, targets: np.ndarray, data_dir="") -> SampleTable | None:
    """The split's sample table, whose names are predictions.csv's paths (streamed when it is written), or
    None when the loader's order is not the manifest's (checked by comparing labels, so a shuffled or
    sharded loader falls back to indices)."""
    try:
        table = SampleTable(data_dir, manifest, split)
    except (BetonError, KeyError):
        return None
    if len(table) != len(targets) or not np.array_equal(table.labels, targets):
        return None
    return table


def evaluate_run(run_dir: Path, checkpoint: str = "best", overrides: list[str] = (),
                 out_dir: Path | None = None) -> dict:
    """Re-evaluate RUN_DIR/<checkpoint>.pt on the val split with RUN_DIR/config.toml (plus overrides) and
    write the end-of-training report (predictions, per-class, confusions, eval.json) to RUN_DIR/eval-<name>/."""
    trained = load_trained(run_dir, checkpoint, overrides, distributed=True)   # under torchrun: a shard each
    config, model, classes, runtime, path, state = (trained.config, trained.model, trained.classes, trained.runtime,
                                                    trained.checkpoint, trained.state)
    data, precision = config.data, runtime.precision
    loader = loader_for(config, "val", runtime)
    if list(loader.classes) != classes:
        raise CheckpointError(f"{path} was trained on other classes than {data.path} holds; point "
                              f"--data.path at the data set the run used.")
    flip_tta = config.eval.flip_tta   # one pass, not every epoch: the test-time flip is worth it here
    result = evaluate(model, loader, autocast=precision.autocast, flip_tta=flip_tta, classes=classes)
    out_dir = out_dir or run_dir / f"eval-{path.stem}"
    summary = {"checkpoint": str(path), "epoch": int(state["epoch"]) + 1, **eval_summary(result, classes),
               "weights": state.get("eval_weights", "raw"), "backend": data.backend,
               "resolution": config.resolution.val, "flip_tta": flip_tta, "precision": precision.name,
               "ranks": runtime.dist.world_size, "samples_per_rank": result.shards,
               "files": {name: str(out_dir / file) for name, file in REPORT_FILES.items()}}
    if runtime.dist.is_main:
        write_class_report(out_dir, result, classes)
        write_json_atomic(out_dir / "eval.json", {**summary, "environment": environment()})
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
    finally:
        cleanup()
    if summary["ranks"] > 1 and os.environ.get("RANK", "0") != "0":
        return 0   # rank 0 reports
    print(f"{summary['checkpoint']} (epoch {summary['epoch']}): val loss {summary['loss']:.4f}, "
          f"top-1 {summary['top1']:.2%}, top-{summary['topk']} {summary['top5']:.2%} on {summary['count']} images")
    print(f"Report: {Path(summary['files']['predictions']).parent} (predictions.csv, per_class.csv, "
          f"top_confusions.csv, confusion_matrix.png, eval.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
