"""An exponential moving average (EMA) of a model's weights and BatchNorm statistics (model.ema_decay).

torch's `AveragedModel` holds the averaged copy and `get_ema_multi_avg_fn` does the averaging. The update
goes straight to that function on tensor lists built once, because `AveragedModel.update_parameters` reads
its step counter on the host at every call, and the trainer's step never waits on the device.

The decay warms up as min(decay, (1 + n) / (10 + n)) after n updates (the num_updates form of TensorFlow's
and timm's EMA): with a fixed 0.999 the average still held 15% of the random initial weights after four
epochs of a 60,000-image run and scored 72% where the raw weights scored 88%. torch has no warm-up, so the
counter is kept here, on the host, and the decay of each update is handed to `get_ema_multi_avg_fn`.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


class WeightAverage:
    """`update()` after each optimizer step; `module` is the averaged model to evaluate or save."""

    def __init__(self, model: nn.Module, decay: float):
        if not 0 < decay < 1:
            raise ValueError(f"model.ema_decay must be in (0, 1) (0 turns the average off), got {decay}.")
        self.decay, self.updates = decay, 0   # updates: optimizer steps averaged so far (resume sets it)
        # the copy and nothing more: update() averages, AveragedModel.update_parameters is never called
        self.averaged = AveragedModel(model, use_buffers=True)
        pairs = list(zip([*self.averaged.module.parameters(), *self.averaged.module.buffers()],
                         [*model.parameters(), *model.buffers()]))
        self.floats = ([a for a, m in pairs if a.is_floating_point()], [m for a, m in pairs if a.is_floating_point()])
        # integer buffers (BatchNorm's num_batches_tracked) are counts, not something to average
        self.counts = ([a for a, m in pairs if not a.is_floating_point()], [m for a, m in pairs if not a.is_floating_point()])

    @property
    def module(self) -> nn.Module:
        return self.averaged.module

    def decay_at(self, updates: int) -> float:
        return min(self.decay, (1 + updates) / (10 + updates))

    @torch.no_grad()
    def update(self) -> None:
        if self.floats[0]:
            get_ema_multi_avg_fn(self.decay_at(self.updates))(*self.floats, None)
        self.updates += 1
        if self.counts[0]:
            torch._foreach_copy_(*self.counts)

    def state_dict(self) -> dict:
        """The averaged weights, under the same names as the model's (a checkpoint's "ema")."""
        return self.module.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state)
