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
import torch

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


def torchrun_training(betons, run_dir, *extra) -> None:
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             *command(betons, run_dir, "--schedule.epochs=1", "--train.deterministic=true", *extra)],
                            check=False, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
def test_two_process_ddp_on_cpu_trains_with_rank_zero_writing(betons, tmp_path):
    run_dir = tmp_path / "run"
    torchrun_training(betons, run_dir)
    history = pd.read_csv(run_dir / "metrics.csv")
    assert len(history) == 1 and history["val_top1"].notna().all()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert (run_dir / "train.log").read_text().count("| resnet18 on cpu") == 1   # logged by rank 0 only
    ours = load_checkpoint(run_dir / "last.pt")
    assert ours["completed"]
    # DDP's own defaults (rank 0's BatchNorm statistics sent before every forward, gradients copied out of
    # the buckets) end in the same rank-0 state as ours (sent once before evaluating, gradients in place)
    torchrun_training(betons, tmp_path / "defaults", "--train.ddp_broadcast_buffers=true",
                      "--train.ddp_bucket_view=false")
    theirs = load_checkpoint(tmp_path / "defaults" / "last.pt")
    assert ours["model"].keys() == theirs["model"].keys()
    assert all(torch.equal(ours["model"][key], theirs["model"][key]) for key in ours["model"])
    assert pd.read_csv(tmp_path / "defaults" / "metrics.csv")["val_top1"].tolist() == history["val_top1"].tolist()


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


def predictions(folder: Path) -> pd.DataFrame:
    return pd.read_csv(folder / "predictions.csv")


@pytest.mark.slow
def test_two_process_evaluation_shares_val_and_matches_one_process(betons, tmp_path):
    """Training under torchrun evaluates on both ranks (each its half of val, gathered in order), and its final
    report is what one process and two processes of `python -m fastpipe.evaluate` say of the same weights."""
    run_dir = tmp_path / "run"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    # eval.flip_tta (the default): the final evaluation adds the flip pass, as fastpipe.evaluate does
    train = subprocess.run([*torchrun, *command(betons, run_dir, "--schedule.epochs=1", "--eval.flip_tta=true")],
                           check=False, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300)
    assert train.returncode == 0, train.stdout + train.stderr
    evaluations = {}
    for name, launcher in (("one", [sys.executable]), ("two", torchrun)):
        result = subprocess.run([*launcher, "-m", "fastpipe.evaluate", str(run_dir), "--checkpoint", "last",
                                 "--out", str(tmp_path / name)], check=False, cwd=REPO, env=child_env(),
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stdout.count("top-1") == 1   # rank 0 reports
        evaluations[name] = json.loads((tmp_path / name / "eval.json").read_text())
    one, two = evaluations["one"], evaluations["two"]
    assert (one["ranks"], one["samples_per_rank"]) == (1, [32])
    assert (two["ranks"], two["samples_per_rank"]) == (2, [16, 16])   # every sample once, half on each rank
    assert two["top1"] == one["top1"] and two["count"] == one["count"] == 32
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-4)
    trained = json.loads((run_dir / "summary.json").read_text())
    assert trained["eval"]["top1"] == one["top1"] and trained["final_val_top1_tta"] == one["top1"]
    for folder in (tmp_path / "two", run_dir):
        pd.testing.assert_frame_equal(predictions(folder).drop(columns="confidence"),
                                      predictions(tmp_path / "one").drop(columns="confidence"))
        assert predictions(folder)["confidence"].to_numpy() == pytest.approx(
            predictions(tmp_path / "one")["confidence"].to_numpy(), abs=1e-4)
        pd.testing.assert_frame_equal(pd.read_csv(folder / "per_class.csv"),
                                      pd.read_csv(tmp_path / "one" / "per_class.csv"))
    assert predictions(run_dir)["path"].str.startswith("val/").all()   # gathered in the manifest's order


def gather_on_two_ranks(rank: int, port: int, out) -> None:
    import torch
    import torch.distributed as dist

    from fastpipe.train.distributed import gather_shards

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        # 7 samples: DistributedSampler gives rank 0 positions 0 2 4 6 and rank 1 positions 1 3 5 and 7, the
        # padding repeat of sample 0; each row here is its position, so the order is visible
        positions = torch.arange(rank, 8, 2, dtype=torch.float64)
        rows = torch.stack([positions, positions * 10], dim=1)
        whole, counts = gather_shards(rows, total=7, world_size=2)
        out.put((rank, whole.tolist(), counts))
    finally:
        dist.destroy_process_group()


def test_gathered_shards_come_back_in_order_without_the_padding():
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    context = mp.get_context("spawn")
    out = context.Queue()
    processes = [context.Process(target=gather_on_two_ranks, args=(rank, port, out)) for rank in range(2)]
    for process in processes:
        process.start()
    results = sorted(out.get(timeout=120) for _ in processes)
    for process in processes:
        process.join(timeout=60)
    expected = [[float(p), 10.0 * p] for p in range(7)]
    assert results == [(0, expected, [4, 3]), (1, expected, [4, 3])]
