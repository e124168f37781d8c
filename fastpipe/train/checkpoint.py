"""Checkpoints that load with `torch.load(weights_only=True)`: tensors, plain containers and numbers only.

Writes are atomic (temporary file, fsync, rename) so a crash never leaves a half-written best.pt/last.pt.
RNG states are stored as plain data so a resumed run continues the same random streams.
"""
from __future__ import annotations

import os
import pickle
import random
import shutil
import threading
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

from fastpipe.data.beton import atomic_write, fsync_dir

COMPILE_PREFIX = "_orig_mod."
DDP_PREFIX = "module."
REQUIRED_KEYS = ("model", "epoch")
CHECKPOINT_FORMAT = 1


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated or not one of ours; the message says which file."""


def clean_state_dict(state: dict) -> dict:
    """Model weights without the prefixes torch.compile and DDP add, so any wrapper can load them."""
    cleaned = dict(state)
    for prefix in (COMPILE_PREFIX, DDP_PREFIX):
        consume_prefix_in_state_dict_if_present(cleaned, prefix)
    return cleaned


def training_state(*, model, optimizer, scheduler, scaler, epoch: int, completed: bool, step: int,
                   global_step: int, config: dict, classes: list[str], peak_lr: float, lr_scale: float,
                   best_top1: float, epochs_since_best: int, **extra) -> dict:
    """The schema of last.pt/best.pt: everything `restore_training` needs to continue a run exactly
    (`step`: optimizer steps already taken in `epoch` when it is not `completed`)."""
    return {"format": CHECKPOINT_FORMAT, "epoch": epoch, "completed": completed, "step": step,
            "global_step": global_step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "rng": capture_rng_state(),
            "config": config, "classes": classes, "peak_lr": peak_lr, "lr_scale": lr_scale,
            "best_top1": best_top1, "epochs_since_best": epochs_since_best, **extra}


def evaluation_weights_kind(state: dict) -> str:
    """"ema" when the EMA of the weights scored better at the checkpoint's evaluation (model.ema_decay > 0),
    else "trained"."""
    return "ema" if state.get("eval_weights") == "ema" and "ema" in state else "trained"


def evaluation_weights(state: dict) -> dict:
    """The weights to evaluate or fine-tune from (evaluation_weights_kind)."""
    return state["ema"] if evaluation_weights_kind(state) == "ema" else state["model"]


def restore_training(state: dict, *, model, optimizer, scheduler, scaler, schedule: bool = True) -> None:
    """Load weights, optimizer, scaler and RNG streams from `training_state` output, and the schedule's
    position unless `schedule` is False (a run continued for another length keeps its new schedule)."""
    model.load_state_dict(state["model"])
    # how the optimizer runs (fused, foreach) is this build's choice, not the checkpoint's: the step
    # depends on fused kernels taking found_inf
    implementation = [{key: group[key] for key in ("fused", "foreach") if key in group}
                      for group in optimizer.param_groups]
    optimizer.load_state_dict(state["optimizer"])
    for group, flags in zip(optimizer.param_groups, implementation):
        group.update(flags)
    if schedule:
        scheduler.load_state_dict(state["scheduler"])
    if state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    restore_rng_state(state["rng"])


def capture_rng_state(generator: np.random.Generator | None = None) -> dict:
    """Python, NumPy (legacy global and an optional Generator), torch CPU and CUDA states as plain data."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy_global": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                         "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    if generator is not None:
        state["numpy_generator"] = generator.bit_generator.state   # a dict of str and int
    return state


def restore_rng_state(state: dict, generator: np.random.Generator | None = None) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    glob = state["numpy_global"]
    np.random.set_state((glob["kind"], glob["keys"].numpy().astype(np.uint32), glob["pos"],
                         glob["has_gauss"], glob["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if generator is not None and "numpy_generator" in state:
        generator.bit_generator.state = state["numpy_generator"]


def save_checkpoint(path: str | os.PathLike, state: dict) -> Path:
    """torch.save to a temporary file next to `path`, fsync it, then os.replace it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if "model" in state:
        state = {**state, "model": clean_state_dict(state["model"])}
    with atomic_write(path, "wb") as handle:
        torch.save(state, handle)
    return path


def host_copy(value):
    """`value` with every tensor copied to host memory and every container rebuilt: what later steps change
    in place (weights, optimizer moments, on any device) no longer reaches it."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return type(value)((key, host_copy(item)) for key, item in value.items())
    if type(value) in (list, tuple):
        return type(value)(host_copy(item) for item in value)
    return value


class CheckpointWriter:
    """Checkpoint writes, one at a time. `save(..., background=True)` copies the state to host memory (the only
    part the caller waits for) and serialises, fsyncs and renames it in a thread while training goes on;
    every later save, and `wait()`, first lets the write in flight finish (and raises its error)."""

    def __init__(self):
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def save(self, path: str | os.PathLike, state: dict, *, copies=(), background: bool = False) -> None:
        """`path` gets `state`; each of `copies` then gets the same bytes (`duplicate_checkpoint`)."""
        self.wait()
        if not background:
            _write(path, state, copies)
            return
        state = host_copy(state)

        def write():
            try:
                _write(path, state, copies)
            except BaseException as err:  # noqa: BLE001 - raised in the training thread by the next wait()
                self.error = err

        self.thread = threading.Thread(target=write, name="checkpoint-writer", daemon=True)
        self.thread.start()

    def wait(self) -> None:
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.error is not None:
            error, self.error = self.error, None
            raise error


def _write(path, state: dict, copies) -> None:
    save_checkpoint(path, state)
    for copy in copies:
        duplicate_checkpoint(path, copy)


def duplicate_checkpoint(source: str | os.PathLike, path: str | os.PathLike) -> Path:
    """`path` with `source`'s bytes, without serialising the state again (best.pt beside last.pt): a hard
    link where the filesystem allows it, else a copy; put in place by one rename. A later atomic rewrite of
    `source` makes a new file and leaves `path` as it was."""
    source, path = Path(source), Path(path)
    temporary = path.with_name(f".{path.name}.link.tmp")
    temporary.unlink(missing_ok=True)
    try:
        os.link(source, temporary)
    except OSError:
        with open(source, "rb") as reader, atomic_write(temporary, "wb") as writer:
            shutil.copyfileobj(reader, writer)
    os.replace(temporary, path)
    fsync_dir(path.parent)
    return path


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Load with weights_only=True; a missing, truncated or foreign file gives a CheckpointError."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder; pass a checkpoint file such as {path / 'last.pt'}.")
    if not path.is_file():
        raise CheckpointError(f"Checkpoint {path} does not exist.")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, RuntimeError, ValueError, OSError) as err:
        # torch's own message goes on to suggest weights_only=False: never right for a file we cannot parse
        first_line = str(err).strip().splitlines()[0].split(". ")[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"Checkpoint {path} is corrupt or incomplete and cannot be loaded ({first_line}). "
            f"Use the other checkpoint in that run (best.pt or last.pt) or start a new run.") from err
    if not isinstance(state, dict) or any(key not in state for key in REQUIRED_KEYS):
        raise CheckpointError(f"{path} is not a fastpipe checkpoint (expected a dict with keys "
                              f"{', '.join(REQUIRED_KEYS)}).")
    state["model"] = clean_state_dict(state["model"])
    return state
