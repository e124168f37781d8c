"""Checkpoints: weights_only-loadable contents, atomic writes, RNG state round trips, clear corruption errors."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from fastpipe.model import build_resnet
from fastpipe.train.checkpoint import (
    CheckpointError,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)


def small_state():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    optimizer.step()
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 3,
            "rng": capture_rng_state(np.random.default_rng(5)), "classes": ["a", "b"], "config": {"optim": {"lr": 0.1}}}


def test_checkpoint_round_trips_under_weights_only(tmp_path):
    state = small_state()
    path = save_checkpoint(tmp_path / "last.pt", state)
    loaded = load_checkpoint(path)   # weights_only=True inside: any non-plain object would fail here
    assert loaded["epoch"] == 3 and loaded["classes"] == ["a", "b"]
    for key, tensor in state["model"].items():
        assert torch.equal(loaded["model"][key], tensor)
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]   # no temporary file left behind


def test_compiled_and_ddp_prefixes_are_stripped(tmp_path):
    model = build_resnet("resnet18", 3)
    compiled = torch.compile(model)   # lazy: nothing compiles until called
    assert any(k.startswith("_orig_mod.") for k in compiled.state_dict())
    path = save_checkpoint(tmp_path / "c.pt", {"model": compiled.state_dict(), "epoch": 0})
    keys = load_checkpoint(path)["model"].keys()
    assert set(keys) == set(model.state_dict().keys())


def test_rng_states_restore_every_stream():
    generator = np.random.default_rng(1)
    state = capture_rng_state(generator)
    first = (random.random(), np.random.rand(), torch.rand(1).item(), generator.random())
    restore_rng_state(state, generator)
    assert (random.random(), np.random.rand(), torch.rand(1).item(), generator.random()) == first


def test_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path / "last.pt", {"model": {}, "epoch": 1})

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"model": {}, "epoch": 2})
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_checkpoint_gives_a_clear_error(tmp_path, damage):
    path = save_checkpoint(tmp_path / "best.pt", small_state())
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"not a checkpoint" * 10, "empty": b""}[damage])
    with pytest.raises(CheckpointError, match="best.pt is corrupt or incomplete"):
        load_checkpoint(path)


def test_foreign_or_missing_file_is_reported(tmp_path):
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a fastpipe checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


def test_a_background_save_writes_the_state_as_it_was_when_saved(tmp_path):
    from fastpipe.train.checkpoint import CheckpointWriter

    model = torch.nn.Linear(3, 2)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    writer = CheckpointWriter()
    writer.save(tmp_path / "last.pt", {"model": model.state_dict(), "epoch": 0}, copies=[tmp_path / "best.pt"],
                background=True)
    with torch.no_grad():   # the next step changes the weights in place while the write may still run
        model.weight.add_(1.0)
    writer.wait()
    for name in ("last.pt", "best.pt"):
        saved = load_checkpoint(tmp_path / name)["model"]
        assert all(torch.equal(saved[key], value) for key, value in before.items())
    assert (tmp_path / "best.pt").read_bytes() == (tmp_path / "last.pt").read_bytes()


def test_a_failed_background_save_is_raised_at_the_next_wait(tmp_path):
    from fastpipe.train.checkpoint import CheckpointWriter

    (tmp_path / "file").write_text("not a folder")
    writer = CheckpointWriter()
    writer.save(tmp_path / "file" / "last.pt", {"model": {}, "epoch": 0}, background=True)
    with pytest.raises(OSError):
        writer.wait()
    writer.wait()   # raised once
