"""Per-class evaluation report: confusion matrix, precision/recall/F1 per class, the most confused pairs,
predictions.csv and the confusion-matrix image (only the most confused classes when there are many)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure  # object API: thread-safe, no pyplot state, no display needed

FULL_MATRIX_MAX_CLASSES = 30  # above this the confusion image shows only the most confused classes
TOP_CONFUSED_CLASSES = 20


def confusion_matrix(targets, preds, num_classes: int) -> np.ndarray:
    """Counts with true classes as rows and predicted classes as columns."""
    targets, preds = np.asarray(targets, dtype=np.int64), np.asarray(preds, dtype=np.int64)
    return np.bincount(targets * num_classes + preds, minlength=num_classes ** 2).reshape(num_classes, -1)


def per_class_table(matrix: np.ndarray, classes: list[str]) -> pd.DataFrame:
    """Precision, recall, f1 and support per class (0 where a ratio has nothing to divide by)."""
    correct = np.diag(matrix).astype(np.float64)
    support, predicted = matrix.sum(axis=1), matrix.sum(axis=0)
    precision = np.divide(correct, predicted, out=np.zeros_like(correct), where=predicted > 0)
    recall = np.divide(correct, support, out=np.zeros_like(correct), where=support > 0)
    total = precision + recall
    f1 = np.divide(2 * precision * recall, total, out=np.zeros_like(correct), where=total > 0)
    return pd.DataFrame({"class_index": np.arange(len(matrix)), "class": classes, "precision": precision,
                         "recall": recall, "f1": f1, "support": support})


def top_confusions(matrix: np.ndarray, classes: list[str], limit: int = 100) -> pd.DataFrame:
    """The most frequent (true, predicted) mistakes, largest first."""
    errors = matrix.copy()
    np.fill_diagonal(errors, 0)
    order = np.argsort(errors, axis=None, kind="stable")[::-1][:limit]
    true, pred = np.unravel_index(order, errors.shape)
    keep = errors[true, pred] > 0
    true, pred = true[keep], pred[keep]
    support = matrix.sum(axis=1)[true]
    return pd.DataFrame({"true": [classes[i] for i in true], "predicted": [classes[i] for i in pred],
                         "count": errors[true, pred], "share_of_true": errors[true, pred] / np.maximum(support, 1)})


def class_names(classes, num_classes: int) -> list[str]:
    if classes and len(classes) != num_classes:
        raise ValueError(f"{len(classes)} class names for {num_classes} model outputs: the checkpoint and the "
                         f"data set disagree (check data.path and the manifest's classes).")
    return list(classes) if classes else [str(i) for i in range(num_classes)]


def eval_summary(result, classes=None) -> dict:
    names = class_names(classes or getattr(result, "classes", None), result.num_classes)
    table = per_class_table(confusion_matrix(result.targets, result.preds, result.num_classes), names)
    return {"loss": result.loss, "top1": result.top1, "top5": result.top5, "topk": result.topk,
            "count": result.count, "macro_precision": table["precision"].mean(),
            "macro_recall": table["recall"].mean(), "macro_f1": table["f1"].mean()}


ROWS_PER_WRITE = 65536   # predictions.csv is written this many rows at a time: no per-sample objects for all


def id_chunks(sample_ids, count: int, chunk: int):
    """The rows' first column, `chunk` at a time: indices, a sequence of paths, or a SampleTable's names
    (streamed from its names file)."""
    if sample_ids is not None and hasattr(sample_ids, "iter_names"):
        yield from sample_ids.iter_names(chunk)
        return
    for start in range(0, count, chunk):
        stop = min(start + chunk, count)
        yield np.arange(start, stop) if sample_ids is None else list(sample_ids[start:stop])


def printable(name):
    """A name UTF-8 can hold: the bytes of a non-UTF-8 file name as \\xNN escapes."""
    return name.encode(errors="surrogateescape").decode(errors="backslashreplace") if isinstance(name, str) else name


def write_predictions(result, path: str | Path, sample_ids=None, classes=None) -> Path:
    """predictions.csv: one row per sample with path (or index), true, predicted (class names when known)
    and confidence (softmax probability of the prediction). `sample_ids` (a sequence of paths or a
    SampleTable) defaults to result.sample_ids. Written ROWS_PER_WRITE rows at a time."""
    names = np.asarray(class_names(classes or getattr(result, "classes", None), result.num_classes), dtype=object)
    if sample_ids is None:
        sample_ids = getattr(result, "sample_ids", None)
    if sample_ids is not None and len(sample_ids) != result.count:
        raise ValueError(f"{len(sample_ids)} sample ids for {result.count} predictions: ids must follow the "
                         f"loader's order (unshuffled, drop_last=False, one process).")
    first = "index" if sample_ids is None else "path"
    start = 0
    with open(path, "w", newline="") as handle:
        for ids in id_chunks(sample_ids, result.count, ROWS_PER_WRITE):
            stop = start + len(ids)
            columns = {"true": names[result.targets[start:stop]], "predicted": names[result.preds[start:stop]],
                       "confidence": result.confidences[start:stop]}
            try:
                frame = pd.DataFrame({first: ids, **columns})
            except UnicodeEncodeError:   # a file name that is not UTF-8 (kept surrogate-escaped): \xNN escapes
                frame = pd.DataFrame({first: [printable(name) for name in ids], **columns})
            frame.to_csv(handle, header=start == 0, index=False, float_format="%.6f")
            start = stop
        if start == 0:
            pd.DataFrame(columns=[first, "true", "predicted", "confidence"]).to_csv(handle, index=False)
    return Path(path)


REPORT_FILES = {"predictions": "predictions.csv", "per_class": "per_class.csv",
                "top_confusions": "top_confusions.csv", "confusion_matrix": "confusion_matrix.png"}


def write_class_report(out_dir: str | Path, result, classes=None, sample_ids=None) -> dict[str, Path]:
    """predictions.csv, per_class.csv, top_confusions.csv and confusion_matrix.png in `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = class_names(classes or getattr(result, "classes", None), result.num_classes)
    matrix = confusion_matrix(result.targets, result.preds, result.num_classes)
    paths = {name: out_dir / file for name, file in REPORT_FILES.items()}
    write_predictions(result, paths["predictions"], sample_ids, names)
    per_class_table(matrix, names).to_csv(paths["per_class"], index=False, float_format="%.6f")
    top_confusions(matrix, names).to_csv(paths["top_confusions"], index=False, float_format="%.6f")
    plot_confusion(matrix, names, paths["confusion_matrix"])
    return paths


def confused_subset(matrix: np.ndarray, limit: int = TOP_CONFUSED_CLASSES) -> np.ndarray:
    """Indices of up to `limit` classes taking part in the largest off-diagonal counts."""
    errors = matrix.copy()
    np.fill_diagonal(errors, 0)
    chosen: list[int] = []
    for flat in np.argsort(errors, axis=None, kind="stable")[::-1]:
        true, pred = divmod(int(flat), len(matrix))
        if errors[true, pred] == 0 or len(chosen) >= limit:
            break
        chosen += [c for c in (true, pred) if c not in chosen][: limit - len(chosen)]
    return np.array(sorted(chosen) or range(min(limit, len(matrix))), dtype=np.int64)


def plot_confusion(matrix: np.ndarray, classes: list[str], path: Path) -> Path:
    """Row-normalised confusion matrix; with many classes only the most confused ones are shown."""
    total = len(matrix)
    subset = np.arange(total) if total <= FULL_MATRIX_MAX_CLASSES else confused_subset(matrix)
    counts = matrix[np.ix_(subset, subset)]
    rows = np.maximum(matrix[subset].sum(axis=1, keepdims=True), 1)  # share of all samples of that class
    size = min(4 + 0.45 * len(subset), 18)
    fig = Figure(figsize=(size + 1.5, size), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(counts / rows, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, shrink=0.8, label="share of the true class")
    labels = [classes[i] for i in subset]
    font = 9 if len(subset) <= 20 else 7
    ax.set_xticks(range(len(subset)), labels, rotation=90, fontsize=font)
    ax.set_yticks(range(len(subset)), labels, fontsize=font)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if len(subset) <= 20:
        for (i, j), count in np.ndenumerate(counts):
            if count:
                share = count / rows[i, 0]
                ax.text(j, i, str(count), ha="center", va="center", fontsize=font - 1,
                        color="white" if share > 0.5 else "black")
    accuracy = np.trace(matrix) / max(matrix.sum(), 1)
    title = "Confusion matrix" if len(subset) == total else \
        f"Top {len(subset)} most confused classes (of {total})"
    ax.set_title(f"{title} - top-1 {accuracy:.1%} on {matrix.sum()} images", fontsize=11)
    fig.savefig(path)
    return path
