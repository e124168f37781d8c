"""Run reports: console + train.log, metrics.csv, TensorBoard, log.md, PNG plots, summary.json (the class
report itself lives in fastpipe.report.classes).

Accuracies are fractions in [0, 1] everywhere (files, TensorBoard); the console and Markdown show percent.
Only rank 0 should write: pass `enabled=False` elsewhere and every method does nothing.
"""
from __future__ import annotations

import csv
import datetime as dt
import math
import os
import platform
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from rich.console import Console

from fastpipe.data.beton import atomic_write, write_json_atomic
from fastpipe.report.classes import eval_summary, write_class_report
from fastpipe.report.plots import PLOTS, BackgroundPlots, draw_plots  # noqa: F401 - PLOTS: public API
from fastpipe.versions import cpu_model, package_versions

METRIC_KEYS = ("epoch", "train_loss", "train_top1", "val_loss", "val_top1", "val_top5", "lr", "momentum",
               "resolution", "batch_size", "images_per_second", "epoch_time_s", "data_wait_pct")
TENSORBOARD_TAGS = {"train_loss": "loss/train", "val_loss": "loss/val", "train_top1": "accuracy/train_top1",
                    "val_top1": "accuracy/val_top1", "val_top5": "accuracy/val_top5"}
MARKDOWN_COLUMNS = [("epoch", "epoch", "{:.0f}"), ("train_loss", "train loss", "{:.4f}"),
                    ("train_top1", "train top-1", "{:.2%}"), ("val_loss", "val loss", "{:.4f}"),
                    ("val_top1", "val top-1", "{:.2%}"), ("val_top5", "val top-5", "{:.2%}"),
                    ("lr", "lr", "{:.4g}"), ("momentum", "momentum", "{:.3f}"), ("resolution", "res", "{:.0f}"),
                    ("batch_size", "batch", "{:.0f}"), ("images_per_second", "img/s", "{:,.0f}"),
                    ("epoch_time_s", "time (s)", "{:.1f}"), ("data_wait_pct", "data wait", "{:.1f}%")]


class RunReport:
    """Everything a run writes for people to read, under `run_dir`.

    `log(msg)` prints via rich and appends to train.log; `step(...)` records per-step scalars (for the LR
    and momentum curves); `epoch(metrics)` appends to metrics.csv, TensorBoard and log.md and redraws
    plots/dashboard.png (loss, accuracy, LR, momentum, throughput + data wait, resolution + batch size);
    `finish(summary, eval_result)` writes summary.json, plots/<panel>.png and the class report. With
    `resume=True` the earlier metrics.csv/steps.csv rows are kept (a re-run epoch replaces its row).
    Use `report.console` for rich progress bars so they share one console with the log.
    """
    def __init__(self, run_dir: str | Path, classes: list[str] | None = None, *, tensorboard: bool = True,
                 enabled: bool = True, resume: bool = False, plots: bool = True,
                 console: Console | None = None):
        self.run_dir, self.classes, self.enabled, self.plots = Path(run_dir), list(classes or []), enabled, plots
        self.console = console or Console()
        self.history = pd.DataFrame()
        self.steps: list[dict] = []
        self.writer = None
        self.background = None   # the dashboard's drawing process, started at the first epoch
        if not enabled:
            return
        (self.run_dir / "plots").mkdir(parents=True, exist_ok=True)
        if resume and (self.run_dir / "metrics.csv").is_file():
            self.history = pd.read_csv(self.run_dir / "metrics.csv")
        if resume and (self.run_dir / "steps.csv").is_file():
            self.steps = pd.read_csv(self.run_dir / "steps.csv").to_dict("records")
        elif (self.run_dir / "steps.csv").is_file():
            (self.run_dir / "steps.csv").unlink()
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: only when used

            self.writer = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))

    def log(self, message: str, *, style: str | None = None) -> None:
        """Print `message` (no rich markup parsing, so '[data]' stays literal) and append it to train.log."""
        if not self.enabled:
            return
        self.console.print(message, style=style, markup=False, soft_wrap=True)
        stamp = dt.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
        with open(self.run_dir / "train.log", "a") as handle:
            handle.write(f"{stamp} {message}\n")

    def step(self, step: int, *, epoch: float, **scalars: float) -> None:
        """Per-step scalars (lr, momentum, loss, ...) at fractional `epoch`; call every few steps."""
        if not self.enabled:
            return
        row = {"step": step, "epoch": epoch, **{k: float(v) for k, v in scalars.items()}}
        path = self.run_dir / "steps.csv"
        if self.steps and step <= self.steps[-1]["step"]:  # resumed from an earlier checkpoint: drop the rest
            self.steps = [r for r in self.steps if r["step"] < step]
            pd.DataFrame(self.steps, columns=list(row)).to_csv(path, index=False)
        new = not path.is_file()
        with open(path, "a", newline="") as handle:  # one row per call: pandas would rewrite the file
            writer = csv.DictWriter(handle, fieldnames=list(row))
            if new:
                writer.writeheader()
            writer.writerow(row)
        self.steps.append(row)
        if self.writer is not None:
            for key, value in scalars.items():
                self.writer.add_scalar(f"step/{key}", value, step)

    def epoch(self, metrics: dict, *, echo: bool = True, plots: bool = True) -> None:
        """Record one epoch (keys: METRIC_KEYS; missing ones are blank, extra ones are kept in the CSV); with
        `plots`, ask for the dashboard's redraw (`plot_later`)."""
        if not self.enabled:
            return
        if "epoch" not in metrics:
            raise ValueError(f"epoch metrics need an 'epoch' key; got {sorted(metrics)}")
        row = {key: _number(value) for key, value in metrics.items()}
        if not self.history.empty and "epoch" in self.history:
            self.history = self.history[self.history["epoch"] != row["epoch"]]
        self.history = pd.concat([self.history, pd.DataFrame([row])], ignore_index=True)
        self.history = self.history.sort_values("epoch", ignore_index=True)
        columns = [k for k in METRIC_KEYS if k in self.history] + \
                  [k for k in self.history if k not in METRIC_KEYS]
        self.history = self.history[columns]
        _replace_atomic(self.run_dir / "metrics.csv", self.history.to_csv(index=False))
        _replace_atomic(self.run_dir / "log.md", self._markdown())
        if self.writer is not None:
            for key, value in row.items():
                if key != "epoch" and isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(TENSORBOARD_TAGS.get(key, f"epoch/{key}"), value, int(row["epoch"]))
            self.writer.flush()
        if plots and self.plots:
            self.plot_later()
        if echo:
            self.log(_epoch_line(row))

    def plot(self, *, panels: bool = False) -> dict[str, Path]:
        """Redraw plots/dashboard.png (all panels) and, with `panels`, one PNG per panel, here and now
        (after any background redraw still running)."""
        if not self.enabled or self.history.empty:
            return {}
        if self.background is not None:
            self.background.wait()
        return draw_plots(self.run_dir, self.history, pd.DataFrame(self.steps), panels=panels)

    def plot_later(self) -> None:
        """Redraw the dashboard in the background (fastpipe.report.plots.BackgroundPlots): the training
        loop goes on meanwhile."""
        if not (self.enabled and self.plots) or self.history.empty:
            return
        if self.background is None:
            self.background = BackgroundPlots()
        self.background.submit(self.run_dir, self.history.copy(), pd.DataFrame(self.steps))

    def finish(self, summary: dict | None = None, eval_result=None, *, sample_ids=None) -> dict:
        """Write summary.json (best/final accuracy, time, img/s, environment, plus `summary`), the per-panel
        plots and, with `eval_result` (an evaluate.EvalResult), the class report (`write_class_report`;
        predictions.csv rows are `sample_ids`, else eval_result.sample_ids, else indices)."""
        if not self.enabled:
            return {}

        payload = {"run_dir": str(self.run_dir.resolve()), **summarize_history(self.history)}
        if eval_result is not None:
            payload["eval"] = eval_summary(eval_result, self.classes)
            payload["files"] = {k: str(v) for k, v in
                                write_class_report(self.run_dir, eval_result, self.classes, sample_ids).items()}
        payload.update(summary or {})
        payload["environment"] = environment()
        if self.plots:
            self.plot(panels=True)  # per-panel PNGs once at the end; the dashboard has them every epoch
        payload = _jsonable(payload)
        write_json_atomic(self.run_dir / "summary.json", payload)
        self.close()
        return payload

    def _markdown(self) -> str:
        header = "| " + " | ".join(label for _, label, _ in MARKDOWN_COLUMNS) + " |"
        lines = [f"# {self.run_dir.name}", "", header, "|" + "---:|" * len(MARKDOWN_COLUMNS)]
        for row in self.history.to_dict("records"):
            cells = (_markdown_cell(row.get(key), fmt) for key, _, fmt in MARKDOWN_COLUMNS)
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"

    def close(self) -> None:
        if self.background is not None:
            self.background.close()
            self.background = None
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def summarize_history(history: pd.DataFrame) -> dict:
    """Best/final accuracy, total time and mean throughput from the per-epoch table."""
    if history.empty:
        return {"epochs": 0}
    out = {"epochs": int(history["epoch"].max())}
    val = history.dropna(subset=["val_top1"]) if "val_top1" in history else pd.DataFrame()
    if not val.empty:
        best = val.loc[val["val_top1"].idxmax()]
        out.update(best_val_top1=best["val_top1"], best_epoch=int(best["epoch"]),
                   final_val_top1=val["val_top1"].iloc[-1],
                   final_val_top5=val["val_top5"].iloc[-1] if "val_top5" in val else None,
                   final_val_loss=val["val_loss"].iloc[-1] if "val_loss" in val else None)
        if "val_top1_tta" in val and val["val_top1_tta"].notna().iloc[-1]:   # the final evaluation's flip TTA
            out["final_val_top1_tta"] = val["val_top1_tta"].iloc[-1]
    for key, name, reduce in (("epoch_time_s", "train_time_s", "sum"), ("images_per_second",
                              "mean_images_per_second", "mean"), ("data_wait_pct", "mean_data_wait_pct", "mean")):
        if key in history:
            out[name] = getattr(history[key], reduce)()
    return out


def _epoch_line(row: dict) -> str:
    """One compact console line per epoch; missing values are left out."""
    def fmt(key, pattern):
        value = row.get(key)
        return pattern.format(value) if isinstance(value, (int, float)) and math.isfinite(value) else None

    parts = [f"epoch {row['epoch']:.0f}",
             " ".join(filter(None, ["train", fmt("train_loss", "loss {:.4f}"), fmt("train_top1", "top-1 {:.1%}")])),
             " ".join(filter(None, ["val", fmt("val_loss", "loss {:.4f}"), fmt("val_top1", "top-1 {:.1%}"),
                                    fmt("val_top5", "top-5 {:.1%}")])),
             " ".join(filter(None, ["weights", fmt("raw_val_top1", "raw {:.1%}"), fmt("ema_val_top1", "ema {:.1%}")])),
             fmt("lr", "lr {:.3g}"), fmt("momentum", "mom {:.3f}"), fmt("resolution", "{:.0f}px"),
             fmt("batch_size", "batch {:.0f}"), fmt("images_per_second", "{:,.0f} img/s"),
             fmt("epoch_time_s", "{:.1f} s"), fmt("data_wait_pct", "data wait {:.1f}%")]
    return " | ".join(p for p in parts if p and p not in ("train", "val", "weights"))


def _markdown_cell(value, fmt: str) -> str:
    return fmt.format(value) if isinstance(value, (int, float)) and math.isfinite(value) else ""


def environment() -> dict:
    """Versions and hardware, for summary.json and benchmark reports."""
    versions = package_versions({"torchvision": "torchvision", "ffcv": "ffcv", "dali": "nvidia-dali-cuda130"})
    cuda = torch.cuda.is_available()
    info = {"python": versions["python"], "torch": torch.__version__, "torchvision": versions["torchvision"],
            "ffcv": versions["ffcv"], "dali": versions["dali"], "numpy": np.__version__,
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if cuda else None,
            "device": torch.cuda.get_device_name(0) if cuda else "cpu",
            "gpu_count": torch.cuda.device_count() if cuda else 0,
            "cpu": cpu_model(), "cpu_count": os.cpu_count(), "platform": platform.platform()}
    try:
        import psutil  # optional on other installs: the field is left out without it

        info["memory_gib"] = round(psutil.virtual_memory().total / 2 ** 30, 1)
    except ImportError:
        pass
    return info


def _number(value):
    """Tensors and NumPy scalars to plain numbers (so CSV, JSON and TensorBoard all take them)."""
    if hasattr(value, "item"):
        value = value.item()
    if value is None:
        return math.nan
    return float(value) if isinstance(value, float) else value


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None  # strict JSON has no NaN
    return value


def _replace_atomic(path: Path, text: str) -> None:
    with atomic_write(path) as handle:
        handle.write(text)
