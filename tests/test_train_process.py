"""The trainer as a process: SIGTERM handling and two-process DDP on CPU (torchrun, gloo).

These use the torch backend (original JPEGs via DataLoader workers): a fresh process then starts in
seconds, where FFCV would first JIT-compile its pipeline.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from fastpipe.config import load_config
from fastpipe.train import Trainer
from fastpipe.train.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parent.parent
TINY = ["--data.backend=torch", "--data.workers=1", "--data.batch_size=8", "--resolution.start=32",
        "--resolution.end=32", "--resolution.val=32", "--optim.lr=0.05", "--eval.flip_tta=false"]


def command(betons, run_dir, *extra) -> list[str]:
    return ["-m", "fastpipe.train", "--config", "cpu-smoke.toml", f"--data.path={betons}",
            f"--run.dir={run_dir}", *TINY, *extra]


def child_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def wait_for(condition, proc, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"trainer exited ({proc.returncode}) before {what}:\n{proc.stdout.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no {what} after {timeout_s} s:\n{proc.stdout.read()}")
        time.sleep(0.2)


def test_sigterm_saves_last_checkpoint_prints_the_resume_command_and_exits_zero(betons, tmp_path):
    run_dir = tmp_path / "run"
    log = run_dir / "train.log"
    proc = subprocess.Popen([sys.executable, *command(betons, run_dir, "--schedule.epochs=100", "--train.log_every=1")],
                            cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for(lambda: log.is_file() and " step " in log.read_text(), proc, 120, "a training step")
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output
    assert f"Resume with: python -m fastpipe.train --resume {run_dir}" in log.read_text()

    state = load_checkpoint(run_dir / "last.pt")
    assert not state["completed"] and state["step"] >= 1
    resumed = Trainer(load_config(run_dir / "config.toml"), run_dir, resume=True)
    assert (resumed.run.start_epoch, resumed.run.skip_batches) == (state["epoch"], state["step"])
    assert resumed.global_step == state["global_step"]


@pytest.mark.slow
def test_two_process_ddp_on_cpu_trains_with_rank_zero_writing(betons, tmp_path):
    run_dir = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             *command(betons, run_dir, "--schedule.epochs=1")],
                            check=False, cwd=REPO, env=child_env(), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    history = pd.read_csv(run_dir / "metrics.csv")
    assert len(history) == 1 and history["val_top1"].notna().all()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert (run_dir / "train.log").read_text().count("| resnet18 on cpu") == 1   # logged by rank 0 only
    assert load_checkpoint(run_dir / "last.pt")["completed"]


def test_auto_workers_share_the_cores_among_the_ranks_on_a_node(monkeypatch):
    from fastpipe.train import assemble

    monkeypatch.setattr(assemble, "usable_cores", lambda: 16)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert assemble.auto_workers() == (7, "16 usable cores / 2 rank(s) on this node, less 1 for the main thread")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert assemble.auto_workers()[0] == 2            # two cores each: both go to the loader
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert assemble.auto_workers()[0] == 15
    # under torchrun each rank sees LOCAL_WORLD_SIZE and says what it chose and why
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "-m", "fastpipe.train", "--config", "cpu-smoke.toml", "--data.workers=auto",
                             "--print-config"], check=False, cwd=REPO, env=child_env(), capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("rank(s) on this node") == 2 and "/ 2 rank(s)" in result.stdout
