"""Where and how a run computes: device choice, one precision path (autocast + GradScaler), seeding and
backend flags, and a signal handler that asks the training loop to stop at the next step.
"""
from __future__ import annotations

import os
import random
import signal
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch


class TrainingError(RuntimeError):
    """The run cannot continue; the message names the likely cause and the fix."""


@dataclass(frozen=True)
class Precision:
    """One precision path for every dtype: an autocast factory (a nullcontext when off) and a scaler
    that only does work for float16, whose narrow range needs loss scaling."""
    name: str
    dtype: torch.dtype
    autocast: object
    scaler: torch.amp.GradScaler


def resolve_precision(amp: str, device_type: str) -> Precision:
    if amp == "auto":
        amp = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if device_type == "cuda" else "off"
    if amp == "off":
        return Precision("off", torch.float32, nullcontext, torch.amp.GradScaler(device_type, enabled=False))
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return Precision(amp, dtype, partial(torch.autocast, device_type, dtype=dtype),
                     torch.amp.GradScaler(device_type, enabled=amp == "fp16"))


class StopRequest:
    """SIGTERM/SIGINT handler that only records the signal; the loop acts on it between steps."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame):
        self.signum = signum

    def install(self) -> StopRequest:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def __bool__(self) -> bool:
        return self.signum is not None


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True


def configure_backends(device_type: str, deterministic: bool) -> None:
    if device_type == "cuda":
        torch.set_float32_matmul_precision("high")   # TF32 matmuls
        torch.backends.cudnn.allow_tf32 = True          # TF32 convolutions
        torch.backends.cudnn.benchmark = not deterministic
