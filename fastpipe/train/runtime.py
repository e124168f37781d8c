"""Where and how a run computes (`Runtime`, `build_runtime`): device choice, process group, one precision path (autocast + GradScaler), seeding and
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

from fastpipe.config import Config
from fastpipe.data.device import resolve_device
from fastpipe.train import distributed as dist_utils


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
    # set either way: these are process-wide, and a run built after a deterministic one in the same process
    # (tests, benchmarks) would otherwise stay deterministic (and miss compiled graphs cached without it)
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.backends.cudnn.deterministic = deterministic


def configure_backends(device_type: str, deterministic: bool) -> None:
    if device_type == "cuda":
        torch.set_float32_matmul_precision("high")   # TF32 matmuls
        torch.backends.cudnn.allow_tf32 = True          # TF32 convolutions
        torch.backends.cudnn.benchmark = not deterministic


@dataclass(frozen=True)
class Runtime:
    """Where and how a run computes."""
    device: torch.device
    precision: Precision
    dist: dist_utils.DistInfo

    @property
    def device_type(self) -> str:
        return self.device.type


def build_runtime(config: Config, *, distributed: bool = False, device: str | None = None) -> Runtime:
    """Device (joining torchrun's process group when `distributed`), backend flags, seeds and precision.
    `device` overrides train.device (the benchmarks' --device flag)."""
    try:
        device_type = resolve_device(device or config.train.device,
                                     "--device" if device else "train.device").type
    except (RuntimeError, ValueError) as err:
        raise TrainingError(str(err)) from None
    info = dist_utils.init(device_type) if distributed else dist_utils.DistInfo()
    configure_backends(device_type, config.train.deterministic)
    seed_everything(config.train.seed + info.rank, config.train.deterministic)
    return Runtime(dist_utils.device_for(info, device_type), resolve_precision(config.train.amp, device_type), info)
