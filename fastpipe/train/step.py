"""The training step: forward, backward, optimizer and schedule, with no read from the device.

Loss sum, correct count and non-finite steps accumulate in device tensors; `read()` fetches them in one
transfer, which the trainer does once per `train.log_every` steps and at epoch end. A non-finite loss
turns every later update into a no-op on the device (the optimizer's `found_inf` input, or NaN gradients
for the fp16 GradScaler, which then skips the step itself), so the weights stay as they were before the
first bad step until the host notices and stops the run (BatchNorm statistics, which the forward pass
updates before the loss is known, and the fp16 loss scale go back to their copy from the last healthy log
point).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class StepTotals:
    """Host copy of the step counters since the last `reset()`."""
    loss_sum: float       # sum of per-sample losses over finite steps
    correct: float        # top-1 hits (against the hard label; mixed targets: the dominant one)
    samples: float        # samples in finite steps
    nonfinite: int        # steps whose loss was NaN/Inf
    first_nonfinite: int  # global step index (from 0) of the first such step; -1: none


class TrainStep:
    """`step(images, labels)` runs one optimizer step; `read()` returns the counters (one host read)."""

    def __init__(self, train_model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler, criterion,
                 precision, *, mix=None, total_steps: int, distributed: bool = False, ema=None):
        self.train_model, self.optimizer, self.scheduler = train_model, optimizer, scheduler
        self.ema = ema   # fastpipe.train.ema.WeightAverage, updated after every optimizer step
        self.criterion, self.precision, self.mix = criterion, precision, mix
        self.scaler = precision.scaler
        self.total_steps, self.distributed = total_steps, distributed
        self.global_step = 0   # optimizer steps taken so far, skipped ones included: the LR follows it
        device = next(train_model.parameters()).device
        # [loss_sum, correct, samples, nonfinite steps, first nonfinite global step]
        self.totals = torch.zeros(5, dtype=torch.float64, device=device)
        self.healthy = torch.ones((), dtype=torch.bool, device=device)
        # BatchNorm statistics change in the forward pass, before the loss is known: `read()` keeps a copy
        # from the last healthy log point for `restore_healthy_state` (once per interval: a few hundred KB)
        self.buffers = [b for b in train_model.buffers() if b.numel()]
        self.buffer_copy = [b.detach().clone() for b in self.buffers]
        # fp16: every skipped step halves the loss scale; keep the scale of the last healthy log point too
        self.scaler_copy = self.scaler.state_dict() if self.scaler.is_enabled() else None
        self.reset()

    def reset(self) -> None:
        """Zero the counters (new epoch) and forget an earlier non-finite step (a resumed run)."""
        self.totals.zero_()
        self.totals[4] = -1
        self.healthy.fill_(True)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        targets = labels
        if self.mix is not None:
            images, targets = self.mix(images, labels)
        with self.precision.autocast():
            logits = self.train_model(images)
            loss = self.criterion(logits, targets)
        finite = torch.isfinite(loss.detach())
        # one rank's NaN reaches every rank through the gradient all-reduce, so the ranks agree on the flag;
        # the reduction runs while backward does (waited on before the update), except for fp16 below
        agree = self.agree_async(finite) if self.distributed else None
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler.is_enabled():
            finite = agree() if agree else finite   # the poisoned loss needs the flag before backward
            first = self.healthy & ~finite
            self.healthy &= finite   # stays False: no update after the first bad step
            # NaN gradients make the scaler skip the update on the device (and lower its scale)
            poisoned = loss + torch.where(self.healthy, 0.0, float("nan"))
            self.scaler.scale(poisoned).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            finite = agree() if agree else finite
            first = self.healthy & ~finite
            self.healthy &= finite
            # fused SGD/AdamW read `found_inf` on the device and leave parameters and state untouched at 1.0
            self.optimizer.found_inf = (~self.healthy).float()
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.found_inf
        if self.ema is not None:
            self.ema.update()
        self.global_step += 1
        if self.global_step < self.total_steps:
            self.scheduler.step()
        hard = targets.argmax(dim=1) if targets.ndim == 2 else targets
        count = labels.shape[0]
        loss64 = loss.detach().double()
        update = torch.stack([
            torch.where(finite, loss64 * count, 0.0),
            (logits.detach().argmax(dim=1) == hard).sum().double(),
            finite.double() * count,
            (~finite).double(),
            torch.where(first, self.global_step - 1 - self.totals[4], 0.0),   # -1 becomes this step's index
        ])
        self.totals += update

    @staticmethod
    def agree_async(finite: torch.Tensor):
        """Start the ranks' AND of the finite flag; the returned function waits for it and gives the result."""
        flag = finite.to(torch.int32)
        work = dist.all_reduce(flag, op=dist.ReduceOp.MIN, async_op=True)

        def agreed() -> torch.Tensor:
            work.wait()
            return flag.bool()

        return agreed

    def read(self) -> StepTotals:
        """The counters on the host: the only device read of a training epoch (summed over ranks)."""
        totals = self.totals.clone()
        if self.distributed:
            # sums of the per-rank counts; the non-finite flags are shared by all ranks (agreed every step)
            flags = totals[3:].clone()
            dist.all_reduce(totals)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            totals[3:] = flags
        loss_sum, correct, samples, nonfinite, first_bad = totals.tolist()
        if not nonfinite:
            if self.buffers:
                torch._foreach_copy_(self.buffer_copy, self.buffers)
            if self.scaler_copy is not None:   # the stream is drained by the read above: no extra stall
                self.scaler_copy = self.scaler.state_dict()
        return StepTotals(loss_sum, correct, samples, int(nonfinite), int(first_bad))

    def restore_healthy_state(self) -> None:
        """BatchNorm statistics and the fp16 loss scale as of the last healthy `read()`, from before the
        first non-finite step."""
        if self.buffers:
            torch._foreach_copy_(self.buffers, self.buffer_copy)
        if self.scaler_copy is not None:
            self.scaler.load_state_dict(self.scaler_copy)
