"""A trained run's model, ready to use: RUN_DIR/config.toml (plus overrides) and a checkpoint's weights on the
model they were trained in (its stem, width, BlurPool). `fastpipe.evaluate`, `fastpipe.predict` and
`fastpipe.export` start from here.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from fastpipe.config import Config, ConfigError, load_config
from fastpipe.data.base import center_crop_windows
from fastpipe.data.device import Normalizer
from fastpipe.data.images import BadImage
from fastpipe.model import stem_of
from fastpipe.train.assemble import build_model
from fastpipe.train.checkpoint import CheckpointError, evaluation_weights, load_checkpoint
from fastpipe.train.runtime import Runtime, build_runtime


@dataclass
class Trained:
    config: Config
    model: torch.nn.Module     # eval mode, on runtime.device
    classes: list[str]
    checkpoint: Path
    state: dict
    runtime: Runtime


def load_trained(run_dir: Path, checkpoint: str = "best", overrides: list[str] = (), *,
                 distributed: bool = False) -> Trained:
    """RUN_DIR's model with the weights of `checkpoint` (best, last, or a .pt path), in eval mode."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.toml").is_file():
        raise ConfigError(f"{run_dir} has no config.toml: pass a run directory written by `python -m fastpipe.train`.")
    config = load_config(run_dir / "config.toml", list(overrides))
    path = run_dir / f"{checkpoint}.pt" if checkpoint in ("best", "last") else Path(checkpoint)
    state = load_checkpoint(path)
    classes = list(state.get("classes") or [])
    if not classes:
        raise CheckpointError(f"{path} holds no class names; it was not written by fastpipe.train.")
    runtime = build_runtime(config, distributed=distributed)
    model = build_model(config, len(classes), runtime, stem=stem_of(state))   # the stem the weights were trained with
    try:
        model.load_state_dict(evaluation_weights(state))
    except RuntimeError as err:
        raise CheckpointError(f"{path} does not fit model.arch={config.model.arch} with model.width="
                              f"{config.model.width}, model.blurpool={config.model.blurpool}: "
                              f"{str(err).splitlines()[0]}") from err
    return Trained(config, model.eval(), classes, path, state, runtime)


def val_crop(pixels: np.ndarray, resolution: int) -> np.ndarray:
    """The val preprocessing of the loaders, on one HxWx3 uint8 image: their centre crop window
    (`center_crop_windows`), resized to `resolution` with area interpolation. BadImage when the window is
    empty (an image under 2 px on its shorter side)."""
    left, top, side, _ = center_crop_windows(np.array([pixels.shape[1]]), np.array([pixels.shape[0]]))[0].astype(int)
    if side < 1:
        raise BadImage(f"{pixels.shape[1]}x{pixels.shape[0]} px: too small for the centre crop")
    return cv2.resize(pixels[top:top + side, left:left + side], (resolution, resolution), interpolation=cv2.INTER_AREA)


def to_batch(images: list[np.ndarray], device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 HxWx3 crops -> the normalised NCHW channels-last batch the model was trained on (the loaders'
    Normalizer)."""
    batch = torch.from_numpy(np.stack(images)).to(device).permute(0, 3, 1, 2)
    return Normalizer(device, dtype)(batch)
