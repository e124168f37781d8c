"""The run folder's fixed files, written by rank 0 before training: config.toml (the resolved config, which
`--resume` reads back) and model_summary.txt (layers, parameters and FLOPs at the first resolution)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from fastpipe.config import Config, to_toml
from fastpipe.model import model_summary


def write_config(run_dir: Path, config: Config) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    resolved = dataclasses.replace(config, run=dataclasses.replace(config.run, dir=str(run_dir)))
    (run_dir / "config.toml").write_text(to_toml(resolved))


def write_model_summary(run_dir: Path, config: Config, model: nn.Module, *, stem: str, classes: int,
                        resolution: int, device: torch.device) -> int:
    """Writes model_summary.txt; returns the forward FLOPs per image at `resolution`."""
    text, flops = model_summary(model, resolution, device=device)
    (run_dir / "model_summary.txt").write_text(f"{config.model.arch} (width {config.model.width}, {stem} stem), "
                                               f"{classes} classes\n\n{text}\n")
    return flops
