"""Optimizer, one-cycle LR schedule and the per-epoch plan (resolution, batch size, steps, LR scale).

Pure functions of the config and the data size, so the whole run's schedule is known before the first step
and a resumed run rebuilds exactly the same one.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

from fastpipe.config import Config
from fastpipe.model import parameter_groups


@dataclass(frozen=True)
class EpochPlan:
    epoch: int
    resolution: int
    batch_size: int
    steps: int
    lr_scale: float   # global batch / (data.batch_size): the linear scaling rule (Goyal et al., 2017)


def plan_epochs(config: Config, samples_per_rank: int, world_size: int = 1) -> list[EpochPlan]:
    """Resolution, batch size, optimizer steps (drop_last) and LR scale of every epoch of the run."""
    schedule = config.schedule_for_resolution()
    plans = []
    for epoch in range(config.schedule.epochs):
        batch_size = schedule.batch_size_at(epoch)
        steps = samples_per_rank // batch_size
        if steps == 0:
            raise ValueError(f"Epoch {epoch} has batch size {batch_size} but each process sees only "
                             f"{samples_per_rank} training samples: lower data.batch_size (or the stage's "
                             f"batch_size) below {samples_per_rank}.")
        plans.append(EpochPlan(epoch, schedule.resolution_at(epoch), batch_size, steps,
                               batch_size * world_size / config.data.batch_size))
    return plans


def build_optimizer(model: nn.Module, config: Config) -> torch.optim.Optimizer:
    """SGD (nesterov) or AdamW; no weight decay on normalisation layers and biases. The LR set here is
    a placeholder: OneCycleLR (or the LR finder) sets it before the first step.

    Fused implementations: one kernel per step, and they take `found_inf` on the device, which is how
    `TrainStep` skips an update after a non-finite loss without reading anything back."""
    groups = parameter_groups(model, config.optim.weight_decay)
    if config.optim.name == "adamw":
        return torch.optim.AdamW(groups, lr=1e-3, betas=(config.optim.momentum, 0.999), fused=True)
    optimizer = torch.optim.SGD(groups, lr=0.1, momentum=config.optim.momentum, nesterov=config.optim.nesterov,
                                fused=True)
    # Fused SGD creates its momentum buffers with empty_like on the first step it takes, and a step skipped
    # through found_inf leaves them uninitialised. Zeros from the start give the same numbers (dampening
    # 0: the first buffer is the gradient) and nothing undefined.
    for group in optimizer.param_groups:
        for param in group["params"]:
            optimizer.state[param]["momentum_buffer"] = torch.zeros_like(param)
    return optimizer


def build_scheduler(optimizer: torch.optim.Optimizer, config: Config, peak_lr: float, total_steps: int):
    """OneCycleLR stepped per batch over the whole run; momentum (AdamW: beta1) cycles between
    0.85x and 1x optim.momentum, low while the LR is high."""
    momentum = config.optim.momentum
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=peak_lr, total_steps=total_steps, pct_start=config.schedule.pct_start,
        anneal_strategy=config.schedule.anneal, div_factor=config.schedule.div_factor,
        final_div_factor=config.schedule.final_div_factor, cycle_momentum=config.schedule.cycle_momentum,
        base_momentum=0.85 * momentum, max_momentum=momentum)


def rescale_lr(optimizer: torch.optim.Optimizer, ratio: float) -> None:
    """Scale the rest of the one-cycle curve by `ratio` (a stage with another batch size). OneCycleLR
    recomputes each step's LR from these group entries, so scaling them scales every later step."""
    if ratio == 1.0:
        return
    for group in optimizer.param_groups:
        for key in ("lr", "initial_lr", "max_lr", "min_lr"):
            group[key] *= ratio


def continue_schedule(scheduler, step: int) -> None:
    """Move a freshly built OneCycleLR to `step` (the optimizer's groups already hold their peak and floor)
    and set that step's LR and momentum, as if it had been stepped there."""
    scheduler.last_epoch = step - 1
    with warnings.catch_warnings():   # torch warns about a scheduler step before any optimizer step
        warnings.simplefilter("ignore", UserWarning)
        scheduler.step()
