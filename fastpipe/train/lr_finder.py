"""Learning-rate range test: an exponential LR sweep whose loss curve suggests OneCycleLR's `max_lr`.

The sweep trains the real model for a few dozen steps, so everything it touches (weights, buffers,
gradients, optimizer and scaler state, RNG streams, train/eval mode) is put back bit for bit afterwards.
Suggestions are read from a centred (zero-lag) smoothing of the loss: a running average, as used to stop
the sweep, trails the curve by ~1/(1 - smoothing) steps and moves every feature to lower LRs.
"""
from __future__ import annotations

import copy
import math
import random
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from fastpipe.train.assemble import build_criterion, build_step

SKIP_END = 5  # the last few points of a sweep are the blow-up, not the slope we want
RULES = ("edge", "steepest", "min_loss_div10", "valley", "min_loss", "min_loss_div2")
SUGGESTION_RULE = "edge"   # chosen by `python -m benchmarks lr-sweep`: see README, "Small images"
# "edge": where the loss has climbed back this share of its drop. Larger shares (0.3-0.5) would put
# fashion-small's peak on its plateau (README, "Small images") but take a momentum-0.9 MLP past the cliff
# where it diverges (tests/test_lr_finder.py: 26x the best loss at 0.4); 0.1 stays on the safe side.
EDGE_RISE = 0.1


@dataclass
class LRFinderResult:
    """Outcome of `find_lr`. Suggestions are None when the curve was too short to read."""
    lrs: list[float]
    losses: list[float]
    smoothed: list[float]  # centred smoothing of `losses`
    steepest: float | None  # steepest descent of the smoothed curve
    min_loss_div10: float | None  # LR at the smoothed minimum, divided by 10
    valley: float | None  # fastai's "valley": inside the longest descending stretch
    stopped_early: bool
    reason: str
    rule: str = SUGGESTION_RULE  # which rule's LR is `suggestion`
    min_loss: float | None = None  # LR at the smoothed minimum
    edge: float | None = None  # where the smoothed loss, past its minimum, turns back up (EDGE_RISE of its drop)
    csv_path: Path | None = None
    png_path: Path | None = None
    indices: dict[str, int] = field(default_factory=dict)  # where each suggestion sits in `lrs`

    @property
    def suggestion(self) -> float | None:
        """The recommended peak LR (OneCycleLR's max_lr): the suggestion of `rule`."""
        return self.suggestions()[self.rule]

    def suggestions(self) -> dict[str, float | None]:
        return {"edge": self.edge, "steepest": self.steepest, "min_loss_div10": self.min_loss_div10, "valley": self.valley,
                "min_loss": self.min_loss, "min_loss_div2": None if self.min_loss is None else self.min_loss / 2}


def find_lr(model: torch.nn.Module, optimizer: torch.optim.Optimizer, criterion: Callable,
            batches: Iterable, *, start_lr: float = 1e-5, end_lr: float = 10.0, steps: int = 100,
            autocast: Callable[[], AbstractContextManager] = nullcontext, scaler: torch.amp.GradScaler | None = None,
            smoothing: float = 0.9, diverge_factor: float = 4.0, rule: str = SUGGESTION_RULE,
            out_dir: str | Path | None = None, step: Callable[[torch.Tensor, torch.Tensor], float] | None = None
            ) -> LRFinderResult:
    """Sweep the LR exponentially from `start_lr` to `end_lr` over `steps` optimizer steps.

    `batches` yields (images, labels) already on the model's device; it is restarted with `iter()`
    when exhausted, so a loader with fewer than `steps` batches is fine. Each step runs under
    `autocast()` and, when given, `scaler` (the same AMP setup as training). The sweep stops when a
    bias-corrected running average of the loss (`smoothing`) exceeds `diverge_factor` times its minimum or
    a loss is NaN/Inf. Suggestions come from the loss smoothed with a centred Gaussian window instead
    (`centred_smooth`, losses capped at the starting level), which does not shift the curve. Every parameter
    group gets the swept LR. Under DDP the loss is averaged over ranks first, so all ranks stop together and
    get the same suggestions. `step(images, labels)` runs one update and returns the batch's mean loss over
    ranks (non-finite when it was); by default a plain forward, backward and update with `criterion`,
    `autocast` and `scaler`; `sweep` passes the trainer's own step.

    Afterwards model weights/buffers/grads, train mode, optimizer and scaler state and the python,
    numpy, torch CPU and CUDA RNG states are exactly as before. With `out_dir`, writes
    `lr_finder.csv` and `lr_finder.png` there.
    """
    if not 0 < start_lr < end_lr:
        raise ValueError(f"LR finder needs 0 < start_lr < end_lr, got start_lr={start_lr}, end_lr={end_lr}. "
                         f"Set [lr_finder] start_lr/end_lr accordingly.")
    if steps < 2:
        raise ValueError(f"LR finder needs at least 2 steps, got steps={steps}.")
    if not 0 <= smoothing < 1:
        raise ValueError(f"LR finder smoothing must be in [0, 1), got {smoothing}.")
    if rule not in RULES:
        raise ValueError(f"Unknown LR finder rule '{rule}'; choose one of {', '.join(RULES)}.")

    saved = _snapshot(model, optimizer, scaler)
    try:
        model.train()
        lrs, losses, stopped_early, reason = _sweep(
            step or plain_step(model, optimizer, criterion, autocast, scaler), optimizer, batches, start_lr, end_lr,
            steps, smoothing, diverge_factor)
    finally:
        _restore(saved, model, optimizer, scaler)

    result = read_curve(lrs, losses, steps=steps, stopped_early=stopped_early, reason=reason, rule=rule)
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        result.csv_path = write_csv(result, out_dir / "lr_finder.csv")
        result.png_path = plot(result, out_dir / "lr_finder.png")
    return result


def sweep(config, runtime, training, loader, plan, out_dir: Path | None) -> LRFinderResult:
    """The range test on a built run (`fastpipe.train.assemble.Training`) at `plan`'s resolution and batch size,
    through the step the trainer runs (its criterion, mixing, precision and fused update), without a
    schedule or weight average."""
    loader.set_resolution(plan.resolution)
    loader.set_batch_size(plan.batch_size)
    finder, scaler = config.lr_finder, runtime.precision.scaler
    # total_steps=0: the step never advances a schedule; the sweep sets the LR itself
    train_step = build_step(config, runtime, training.train_model, training.optimizer, None, len(loader.classes),
                            total_steps=0)
    return find_lr(training.train_model, training.optimizer, build_criterion(config), loader,
                   start_lr=finder.start_lr, end_lr=finder.end_lr, steps=finder.steps,
                   autocast=runtime.precision.autocast, scaler=scaler if scaler.is_enabled() else None,
                   out_dir=out_dir, step=StepLoss(train_step))


class StepLoss:
    """A TrainStep as the sweep's `step`: one update, then the batch's mean loss from the step's counters
    (one host read per step, summed over ranks; NaN once a step was non-finite, whose update was skipped)."""

    def __init__(self, train_step):
        self.train_step, self.loss_sum, self.samples = train_step, 0.0, 0.0

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        self.train_step(images, labels)
        totals = self.train_step.read()
        if totals.nonfinite:
            return math.nan
        loss = (totals.loss_sum - self.loss_sum) / max(totals.samples - self.samples, 1)
        self.loss_sum, self.samples = totals.loss_sum, totals.samples
        return loss


def plain_step(model, optimizer, criterion, autocast, scaler) -> Callable[[torch.Tensor, torch.Tensor], float]:
    """Forward, backward and update; a non-finite loss returns before the update."""
    def step(images: torch.Tensor, labels: torch.Tensor) -> float:
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            loss = criterion(model(images), labels)
        value = _mean_over_ranks(loss)
        if not math.isfinite(value):
            return value
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        return value

    return step


def read_curve(lrs: list[float], losses: list[float], *, steps: int, stopped_early: bool = False, reason: str = "",
               rule: str = SUGGESTION_RULE) -> LRFinderResult:
    """The suggestions for a sweep's (LR, loss) points; `steps` is the sweep's planned length, which sets the
    smoothing window (1/40 of it, at least one step) and the noisy start that is skipped (1/10).

    Losses above the starting level (the mean of that noisy start) count as that level when smoothed: past it
    a loss only says "no longer training", and the blown-up point that ends a sweep (10-100x the start) would
    otherwise leak several steps back through the window and move the edge up to 2x lower."""
    skip_start = max(1, steps // 10)
    ceiling = float(np.mean(losses[:skip_start])) if len(losses) else 0.0
    smoothed = centred_smooth(np.minimum(losses, ceiling), sigma=max(1.0, steps / 40)).tolist()
    result = LRFinderResult(list(lrs), list(losses), smoothed, None, None, None, stopped_early, reason, rule)
    _suggest(result, skip_start=skip_start)
    return result


def _sweep(step, optimizer, batches, start_lr, end_lr, steps, smoothing, diverge_factor):
    lrs, losses = [], []
    ratio = end_lr / start_lr
    average, best = 0.0, math.inf
    stream = _cycle(batches)
    for index in range(steps):
        lr = start_lr * ratio ** (index / (steps - 1))
        for group in optimizer.param_groups:
            group["lr"] = lr
        value = step(*next(stream))
        if not math.isfinite(value):
            return lrs, losses, True, f"loss became {value} at lr={lr:.3g} (step {index})"
        average = smoothing * average + (1 - smoothing) * value
        current = average / (1 - smoothing ** (index + 1))  # bias correction, as in Adam
        lrs.append(lr)
        losses.append(value)
        best = min(best, current)
        if index > 0 and current > diverge_factor * best:
            reason = (f"smoothed loss {current:.4g} exceeded {diverge_factor:g}x its minimum {best:.4g} "
                      f"at lr={lr:.3g} (step {index})")
            return lrs, losses, True, reason
    return lrs, losses, False, f"completed {steps} steps up to lr={end_lr:.3g}"


def centred_smooth(values, sigma: float) -> np.ndarray:
    """Gaussian-weighted average over neighbours on both sides (`sigma` in steps): no lag, unlike a running
    average. Near the ends the window holds what there is, renormalised."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        return values
    half = min(int(3 * sigma), (len(values) - 1) // 2)   # np.convolve "same" keeps len(values) only if the kernel is no longer
    offsets = np.arange(-half, half + 1)
    kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
    total = np.convolve(values, kernel, mode="same")
    weight = np.convolve(np.ones_like(values), kernel, mode="same")
    return total / weight


def _mean_over_ranks(loss: torch.Tensor) -> float:
    """The loss averaged over DDP ranks, so every rank sees one curve and stops at the same step
    (a rank leaving the sweep early would leave the others hanging in backward's all-reduce)."""
    value = loss.detach().float()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        value = value.clone()
        torch.distributed.all_reduce(value)
        value = value / torch.distributed.get_world_size()
    return float(value)


def _cycle(batches: Iterable):
    """Yield batches forever, calling iter() again at each exhaustion (a new loader epoch)."""
    while True:
        empty = True
        for batch in batches:
            empty = False
            yield batch
        if empty:
            raise ValueError("LR finder got no batches: the loader is empty (check batch size vs data size "
                             "and drop_last) or a one-shot iterator was already consumed.")


def _snapshot(model, optimizer, scaler) -> dict:
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return {
        "model": {name: tensor.detach().clone() for name, tensor in model.state_dict(keep_vars=True).items()},
        "grads": [None if p.grad is None else p.grad.detach().clone() for p in model.parameters()],
        "training": {module: module.training for module in model.modules()},
        "optimizer": copy.deepcopy(optimizer.state_dict()),
        "scaler": copy.deepcopy(scaler.state_dict()) if scaler is not None else None,
        "rng": rng,
    }


def _restore(saved: dict, model, optimizer, scaler) -> None:
    with torch.no_grad():
        current = model.state_dict(keep_vars=True)
        for name, tensor in saved["model"].items():
            current[name].copy_(tensor)
    for param, grad in zip(model.parameters(), saved["grads"]):
        param.grad = grad
    for module, training in saved["training"].items():
        module.training = training
    optimizer.load_state_dict(saved["optimizer"])
    if scaler is not None:
        scaler.load_state_dict(saved["scaler"])
    rng = saved["rng"]
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng:
        torch.cuda.set_rng_state_all(rng["cuda"])


def _suggest(result: LRFinderResult, skip_start: int) -> None:
    """Fill the suggestions from the smoothed curve, trimmed of its noisy start and blow-up end."""
    smoothed = np.asarray(result.smoothed, dtype=np.float64)
    lrs = np.asarray(result.lrs, dtype=np.float64)
    if len(smoothed) < 3:
        return
    start, end = skip_start, len(smoothed) - SKIP_END
    if end - start < 3:  # a short, early-stopped sweep: read what there is
        start, end = 0, len(smoothed)
    window, window_lrs = smoothed[start:end], lrs[start:end]

    lowest = int(np.argmin(window))
    # the descent into the minimum: a recovery after a spike past it is steep too, but not a usable LR
    descent = window[:lowest + 1] if lowest >= 2 else window
    steepest = int(np.argmin(np.gradient(descent, np.log10(window_lrs[:len(descent)]))))
    valley = _valley_index(window)
    result.steepest = float(window_lrs[steepest])
    result.min_loss = float(window_lrs[lowest])
    result.min_loss_div10 = float(window_lrs[lowest] / 10)
    result.valley = float(window_lrs[valley])
    edge = _edge_index(smoothed, skip_start)
    edge = start + lowest if edge is None else edge
    result.edge = float(lrs[edge])
    result.indices = {"steepest": start + steepest, "min_loss": start + lowest, "valley": start + valley, "edge": edge}


def _edge_index(smoothed: np.ndarray, skip_start: int) -> int | None:
    """The first point where the smoothed loss, after falling by at least 5% from its start, climbs back
    EDGE_RISE of the way from its lowest point so far toward that start: the largest LR the short sweep
    still trains at. None when it never turns up. One-cycle training warms up to its peak, so its best
    peak LR lies near this edge of the valley floor rather than on the descent before it."""
    begin = max(1, skip_start)
    start_level, lowest = float(np.mean(smoothed[:begin])), np.inf
    for index in range(begin, len(smoothed)):
        lowest = min(lowest, smoothed[index])
        drop = start_level - lowest
        if drop > 0.05 * abs(start_level) and smoothed[index] > lowest + EDGE_RISE * drop:
            return index
    return None


def _valley_index(losses: np.ndarray) -> int:
    """fastai's valley rule, hand-written (no library offers it): take the longest strictly decreasing
    subsequence of the loss curve and return the point half-way between its 1/3 and 2/3 marks."""
    n = len(losses)
    length = np.ones(n, dtype=np.int64)  # longest decreasing subsequence ending at i
    for i in range(1, n):
        earlier = losses[:i] > losses[i]
        if earlier.any():
            length[i] = length[:i][earlier].max() + 1
    end = int(np.argmax(length))
    start = end - int(length[end])
    third = (end - start) / 3
    return min(n - 1, max(0, start + int(third) + int(third / 2)))


def write_csv(result: LRFinderResult, path: Path) -> Path:
    frame = pd.DataFrame({"step": range(len(result.lrs)), "lr": result.lrs, "loss": result.losses,
                          "smoothed_loss": result.smoothed})
    frame.to_csv(path, index=False)
    return path


def plot(result: LRFinderResult, path: Path) -> Path:
    """Loss vs LR on a log axis, with the three suggestions marked and the blow-up clipped."""
    from matplotlib.figure import Figure  # object API: no pyplot global state, no display backend

    fig = Figure(figsize=(8, 5), dpi=110, layout="constrained")
    ax = fig.add_subplot()
    lrs, smoothed = np.asarray(result.lrs), np.asarray(result.smoothed)
    if len(lrs):
        ax.plot(lrs, result.losses, color="0.75", linewidth=0.8, label="loss")
        ax.plot(lrs, smoothed, color="tab:blue", linewidth=2, label="smoothed loss")
        markers = [("edge", result.edge, "tab:blue", "P", "edge"),
                   ("steepest", result.steepest, "tab:red", "o", "steepest"),
                   ("min_loss_div10", result.min_loss_div10, "tab:green", "s", "min loss / 10"),
                   ("valley", result.valley, "tab:orange", "^", "valley"),
                   ("min_loss", result.min_loss, "tab:purple", "D", "min loss"),
                   ("min_loss_div2", result.suggestions()["min_loss_div2"], "tab:brown", "v", "min loss / 2")]
        for key, lr, color, marker, label in markers:
            if lr is None:
                continue
            chosen = key == result.rule
            y = float(np.interp(np.log(lr), np.log(lrs), smoothed))
            ax.axvline(lr, color=color, linestyle="--", linewidth=1, alpha=0.7)
            ax.plot([lr], [y], marker=marker, color=color, markersize=10 if chosen else 7, linestyle="none",
                    label=f"{label}{' (suggestion)' if chosen else ''}: {lr:.2e}")
        low = float(min(np.min(smoothed), np.min(result.losses)))
        high = float(smoothed[0]) if len(smoothed) else low
        span = max(high - low, 0.05 * abs(low), 1e-8)
        ax.set_ylim(low - 0.1 * span, high + 0.3 * span)  # keep the descent readable, clip the blow-up
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel("training loss")
    ax.set_title(f"LR range test - {result.reason}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower left", fontsize=9)
    fig.savefig(path)
    return path
