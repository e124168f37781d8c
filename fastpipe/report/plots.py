"""The run's plots: the dashboard (six panels) and one PNG per panel, drawn by `draw_plots`, and
`BackgroundPlots`, which redraws the dashboard in a separate process while training goes on.

This module imports only pandas, matplotlib and fastpipe.data.beton (numpy), so the drawing process starts
in about a second.
"""
from __future__ import annotations

import signal
import threading
from concurrent.futures import Future, ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure  # object API: no pyplot state, no display needed
from matplotlib.ticker import MaxNLocator

from fastpipe.data.beton import atomic_write

PLOTS = ("loss", "accuracy", "lr", "momentum", "throughput", "resolution")


def draw_plots(run_dir: Path, history: pd.DataFrame, steps: pd.DataFrame, *, panels: bool = False) -> dict[str, Path]:
    """plots/dashboard.png (all panels) and, with `panels`, plots/<panel>.png for each."""
    paths = {}
    # Fixed margins rather than constrained layout: the same look at a third of the drawing time.
    fig = Figure(figsize=(15, 8.5), dpi=90)
    fig.subplots_adjust(left=0.05, right=0.95, bottom=0.07, top=0.91, wspace=0.38, hspace=0.32)
    for ax, name in zip(fig.subplots(2, 3).flat, PLOTS):
        _draw(name, ax, history, steps)
    fig.suptitle(f"{run_dir.name}: epoch {int(history['epoch'].iloc[-1])}")
    paths["dashboard"] = run_dir / "plots" / "dashboard.png"
    _save(fig, paths["dashboard"])
    for name in PLOTS if panels else ():
        fig = Figure(figsize=(7, 4.5), dpi=90)
        fig.subplots_adjust(left=0.12, right=0.88, bottom=0.12, top=0.9)
        _draw(name, fig.add_subplot(), history, steps)
        paths[name] = run_dir / "plots" / f"{name}.png"
        _save(fig, paths[name])
    return paths


def _save(fig: Figure, path: Path) -> None:
    """Written beside and renamed into place: a viewer reloading the file never sees half a PNG."""
    with atomic_write(path, "wb") as handle:
        fig.savefig(handle, format="png")


def _ignore_interrupts() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C is the trainer's to handle (it saves, then closes us)


class BackgroundPlots:
    """Redraws the dashboard in one spawned process. A redraw takes 0.3-1 s of matplotlib; in the trainer's
    process, even in a thread, it would hold the interpreter lock that the thread launching the steps needs.
    At most one redraw runs; a request made meanwhile waits, and a newer one replaces it."""

    def __init__(self, draw=draw_plots):
        self.draw = draw   # a module-level function (the process receives it by name)
        self.pool = ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn"), initializer=_ignore_interrupts)
        self.lock = threading.Lock()   # the pool's thread starts the waiting request when a redraw ends
        self.running: Future | None = None
        self.waiting: tuple | None = None

    def submit(self, run_dir: Path, history: pd.DataFrame, steps: pd.DataFrame) -> None:
        with self.lock:
            self.waiting = (run_dir, history, steps)
        self._start_waiting()

    def _start_waiting(self, finished: Future | None = None) -> None:
        with self.lock:
            if self.waiting is None or (self.running is not None and not self.running.done()):
                return
            try:
                future = self.running = self.pool.submit(self.draw, *self.waiting)
            except RuntimeError:   # the pool was shut down meanwhile: nothing more to draw
                return
            self.waiting = None
        future.add_done_callback(self._start_waiting)

    def wait(self) -> None:
        """Every request drawn (a failed redraw raises here)."""
        while True:
            with self.lock:
                running, waiting = self.running, self.waiting
            if running is not None:
                running.result()
            if waiting is None:
                with self.lock:
                    if self.running is running and self.waiting is None:
                        return
                continue
            self._start_waiting()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.pool.shutdown(wait=True)


def _draw(name: str, ax, history: pd.DataFrame, steps: pd.DataFrame) -> None:
    """One dashboard panel. Per-step LR/momentum curves are used when recorded, else per-epoch points."""
    def series(key, label, scale=1.0, axis=ax, **style):
        if key in history and history[key].notna().any():
            data = history[["epoch", key]].dropna()
            axis.plot(data["epoch"], data[key] * scale, marker="o", markersize=3, label=label, **style)

    if name == "loss":
        series("train_loss", "train")
        series("val_loss", "val")
        ax.set_ylabel("loss")
    elif name == "accuracy":
        series("train_top1", "train top-1", 100)
        series("val_top1", "val top-1", 100)
        series("val_top5", "val top-5", 100, linestyle="--")
        ax.set_ylabel("accuracy (%)")
    elif name in ("lr", "momentum"):
        if name in steps and steps[name].notna().any():
            ax.plot(steps["epoch"], steps[name], label=f"{name} (per step)")
        else:
            series(name, f"{name} (end of epoch)")
        ax.set_ylabel("learning rate" if name == "lr" else "momentum")
    elif name == "throughput":
        series("images_per_second", "images/s", color="tab:blue")
        ax.set_ylabel("images per second")
        ax.set_ylim(0, max(ax.get_ylim()[1], 1) * 1.15)
        twin = ax.twinx()
        series("data_wait_pct", "data wait %", axis=twin, color="tab:red", linestyle="--")
        twin.set_ylabel("data wait (% of epoch)")
        twin.set_ylim(0, 100)
        _joint_legend(ax, twin)
    elif name == "resolution":
        series("resolution", "resolution (px)", color="tab:purple")
        ax.set_ylabel("train resolution (px)")
        low, high = ax.get_ylim()
        ax.set_ylim(low - 32, high + 32)
        twin = ax.twinx()
        series("batch_size", "batch size", axis=twin, color="tab:gray", linestyle="--")
        twin.set_ylabel("batch size")
        twin.set_ylim(0, max(twin.get_ylim()[1], 1) * 1.25)
        _joint_legend(ax, twin)
    ax.set_title(name if name != "lr" else "learning rate")
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    if not ax.get_legend_handles_labels()[0] and not ax.get_legend():
        ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", color="0.5")
    elif name not in ("throughput", "resolution"):
        ax.legend(fontsize=8)


def _joint_legend(ax, twin) -> None:
    """One legend for two y axes, drawn on the upper one so lines never hide it."""
    handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    if handles:
        twin.legend(handles=handles, fontsize=8, loc="center left")
