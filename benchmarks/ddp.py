"""`python -m benchmarks ddp`: the trainer's step under DDP with each choice of `broadcast_buffers` and
`gradient_as_bucket_view` (train.ddp_broadcast_buffers, train.ddp_bucket_view), on synthetic batches.

Run as is, it starts itself under torchrun (`--nproc` processes on this machine: gloo on the CPU, nccl on
GPUs); each configuration is timed in rounds, in a rotating order, and the median of the slowest rank's
time per step is reported.
"""
from __future__ import annotations

import itertools
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.distributed as dist

from benchmarks.machine import machine_info
from benchmarks.report import print_table, write_report
from benchmarks.train_step import build_train_step, repeat, synthetic_batch
from fastpipe.config import ConfigError, load_config

ACCEPTS_CONFIG_OVERRIDES = True
CHOICES = list(itertools.product((True, False), (False, True)))   # (broadcast_buffers, bucket view)
COLUMNS = {"broadcast_buffers": "broadcast_buffers", "bucket_view": "gradient_as_bucket_view",
           "ms_per_step": "ms/step (median)", "spread_ms": "min-max ms", "vs_default": "x DDP default",
           "processes": "processes", "device": "device"}


def add_arguments(parser) -> None:
    parser.add_argument("--config", default="configs/cpu-smoke.toml", help="trainer config (TOML)")
    parser.add_argument("--nproc", type=int, default=2, help="processes (ranks) to start")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per configuration and round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over the configurations")
    parser.add_argument("--res", type=int, help="resolution (default: the schedule's first)")
    parser.add_argument("--batch-size", type=int, help="per process (default: data.batch_size)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--out", default="runs/bench-ddp", help="report folder")


def run(args) -> int:
    if "LOCAL_RANK" not in os.environ:   # start the ranks; each runs this function under torchrun
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
                   "-m", "benchmarks", "ddp", *sys.argv[2:]]
        return subprocess.run(command, check=False).returncode
    try:
        config = load_config(args.config, overrides=list(args.overrides))
    except ConfigError as err:
        raise SystemExit(f"error: {err}") from None
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else \
        ("cpu" if args.device == "auto" else args.device)
    schedule = config.schedule_for_resolution()
    resolution, batch_size = args.res or schedule.resolution_at(0), args.batch_size or schedule.batch_size_at(0)
    times = {choice: [] for choice in CHOICES}
    steps = {}
    for choice in CHOICES:   # built once each, up front: the timed rounds only step
        buffers, bucket_view = choice
        chosen = load_config(args.config, overrides=[*args.overrides, f"--train.ddp_broadcast_buffers={str(buffers).lower()}",
                                                     f"--train.ddp_bucket_view={str(bucket_view).lower()}",
                                                     f"--train.device={device}"])
        steps[choice] = build_train_step(chosen, 10, device, distributed=True)
    batch = synthetic_batch(batch_size, resolution, 10, device, steps[CHOICES[0]].dtype)
    for round_index in range(args.rounds):
        for choice in CHOICES[round_index % len(CHOICES):] + CHOICES[:round_index % len(CHOICES)]:
            times[choice].append(timed_steps(steps[choice], batch, args.steps))
    if dist.get_rank() != 0:
        dist.destroy_process_group()
        return 0
    default = statistics.median(times[(True, False)])
    rows = [{"broadcast_buffers": buffers, "bucket_view": bucket_view,
             "ms_per_step": round(1e3 * statistics.median(seconds), 2),
             "spread_ms": f"{1e3 * min(seconds):.1f}-{1e3 * max(seconds):.1f}",
             "vs_default": round(default / statistics.median(seconds), 3), "processes": dist.get_world_size(),
             "device": device} for (buffers, bucket_view), seconds in times.items()]
    title = (f"DDP options: {config.model.arch} at {resolution} px, batch {batch_size} per process, "
             f"{args.steps} steps x {args.rounds} rounds ({dist.get_backend()})")
    print_table(rows, COLUMNS, title)
    write_report(args.out, {"machine": machine_info(), "results": rows, "title": title}, title, plots=False,
                 columns=COLUMNS)
    dist.destroy_process_group()
    return 0


def timed_steps(step, batch, count: int) -> float:
    """Seconds per step on the slowest rank (one untimed step first)."""
    batches = repeat(batch)
    step(*next(batches))
    step.sync()
    dist.barrier()
    started = time.perf_counter()
    for _ in range(count):
        step(*next(batches))
    step.sync()
    elapsed = torch.tensor([time.perf_counter() - started], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        elapsed = elapsed.cuda()
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return float(elapsed) / count
