"""The live progress bar of one epoch: steps done, ETA, img/s, loss, LR and GPU memory. Shown on rank 0 in a
terminal only; elsewhere the trainer logs a line per log point instead."""
from __future__ import annotations

import time

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


class EpochProgress:
    """`with EpochProgress(...) as progress:` then `advance()` every step and `show(...)` at log points."""

    def __init__(self, console, *, enabled: bool, title: str, steps: int, done: int, images_per_step: int,
                 device: torch.device):
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeRemainingColumn(), TextColumn("{task.fields[info]}"), console=console,
                            disable=not (enabled and console.is_terminal), transient=True)
        self.title, self.steps, self.done_at_start = title, steps, done
        self.images_per_step, self.device = images_per_step, device
        self.started = time.perf_counter()
        self.task = None

    def __enter__(self):
        self.bar.__enter__()
        self.task = self.bar.add_task(self.title, total=self.steps, completed=self.done_at_start, info="")
        return self

    def __exit__(self, *exc) -> None:
        self.bar.__exit__(*exc)

    def advance(self) -> None:
        self.bar.update(self.task, advance=1)

    def show(self, done: int, loss: float, lr: float) -> None:
        """`done`: batches of this epoch done so far (those before a resume included)."""
        seconds = max(time.perf_counter() - self.started, 1e-9)
        info = f"{(done - self.done_at_start) * self.images_per_step / seconds:,.0f} img/s  loss {loss:.3f}  lr {lr:.3g}"
        if self.device.type == "cuda":
            info += f"  mem {torch.cuda.max_memory_allocated(self.device) / 2**30:.1f} GiB"
        self.bar.update(self.task, info=info)
