"""`python -m benchmarks train-step`: training img/s on synthetic batches already on the device (the
ceiling) and with each real loader feeding the model. Loader rate / ceiling is the data-stall figure:
1.0 means the data path keeps up, 0.5 means the model waits for data half the time.
"""
from __future__ import annotations

import gc
import itertools
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.loaders import unavailable_backends
from benchmarks.machine import machine_info
from benchmarks.measure import device_name, device_type_or_exit
from benchmarks.report import make_console, print_table, write_report
from benchmarks.resources import ResourceSampler
from fastpipe.config import ConfigError, load_config
from fastpipe.data.beton import BetonError, read_manifest
from fastpipe.train.assemble import build_benchmark_training, data_workers, loader_for
from fastpipe.train.runtime import build_runtime

COLUMNS = {"backend": "feed", "res": "res", "workers": "workers", "batch_size": "batch",
           "img_per_s": "img/s", "ratio_to_synthetic": "x synthetic", "peak_rss_mb": "peak RSS MB",
           "device": "device"}


@dataclass
class BenchStep:
    """The trainer's own step (`fastpipe.train.assemble.build_step`) on the trainer's model, with a device sync
    for the ends of timed spans."""
    training: object
    device: str
    dtype: object   # what the trainer's loaders hand over (bf16 on a GPU with AMP)

    def __call__(self, images, labels) -> None:
        self.training.step(images, labels)

    @property
    def optimizer(self):
        return self.training.optimizer

    @property
    def graphs(self) -> int | None:
        counter = self.training.compile_counter
        return None if counter is None else counter.graphs

    def sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()


def build_train_step(config, num_classes: int, device: str, distributed: bool = False) -> BenchStep:
    """Model, compile settings, channels-last, precision, optimizer, schedule and step exactly as
    `fastpipe.train` builds them (`fastpipe.train.assemble`), on `device` (under torchrun with `distributed`)."""
    runtime = build_runtime(config, device=device, distributed=distributed)
    return BenchStep(build_benchmark_training(config, num_classes, runtime), runtime.device_type,
                     runtime.precision.dtype)


def synthetic_batch(batch_size: int, resolution: int, num_classes: int, device: str, dtype=None):
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch_size, 3, resolution, resolution, generator=generator).to(device, dtype)
    labels = torch.randint(0, num_classes, (batch_size,), generator=generator).to(device)
    return images.contiguous(memory_format=torch.channels_last), labels


def time_steps(step: BenchStep, batches, steps: int, warmup: int = 1) -> float:
    """img/s over `steps` steps after `warmup` untimed ones; `batches` is an endless iterator."""
    for _ in range(warmup):
        step(*next(batches))
    step.sync()
    images = 0
    start = time.perf_counter()
    for _ in range(steps):
        batch_images, labels = next(batches)
        step(batch_images, labels)
        images += int(labels.shape[0])
    step.sync()
    return images / (time.perf_counter() - start)


def repeat(batch):
    while True:
        yield batch


def synthetic_rate(step: BenchStep, batch_size: int, resolution: int, num_classes: int, steps: int,
                   warmup: int = 1) -> float:
    return time_steps(step, repeat(synthetic_batch(batch_size, resolution, num_classes, step.device, step.dtype)),
                      steps, warmup)


def fed_rate(step: BenchStep, loader, steps: int, warmup: int = 1) -> float:
    """img/s of the step fed by `loader` inside one epoch (an epoch's start is not steady state): `warmup`
    untimed steps, then up to `steps` timed ones, fewer when the epoch ends first."""
    batches = iter(loader)
    try:
        for _ in range(warmup):
            step(*next(batches))
        step.sync()
        images, start = 0, time.perf_counter()
        for batch_images, labels in itertools.islice(batches, steps):
            step(batch_images, labels)
            images += int(labels.shape[0])
        step.sync()
        if not images:
            raise RuntimeError(f"the loader's epoch ended within the {warmup} warm-up steps: use more data "
                               f"or a smaller batch")
        return images / (time.perf_counter() - start)
    finally:
        getattr(batches, "close", lambda: None)()


STEP_NOTE = ("the trainer's own step (fastpipe.train.assemble.build_step): same compile settings (static shapes, one "
             "graph per shape), channels-last, precision, fused optimizer and schedule")
ACCEPTS_CONFIG_OVERRIDES = True   # `--data.path=...` style arguments go to load_config


def add_arguments(parser) -> None:
    parser.add_argument("--config", required=True, help="trainer config (TOML), e.g. configs/cpu-smoke.toml")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per feed (after 2 warm-up steps)")
    parser.add_argument("--backends", default="ffcv,dali,torch", help="loaders to feed the model with")
    parser.add_argument("--res", type=int, help="resolution (default: the schedule's first)")
    parser.add_argument("--batch-size", type=int, help="default: data.batch_size of the config")
    parser.add_argument("--workers", type=int, help="default: data.workers of the config")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--tune", help="autotune TOML merged over the config")
    parser.add_argument("--out", default="runs/bench-train-step", help="report folder")


def run(args) -> int:
    try:
        config = load_config(args.config, overrides=getattr(args, "overrides", []), tune=args.tune)
    except ConfigError as exc:
        raise SystemExit(f"error: {exc}") from None
    if args.steps < 1:
        raise SystemExit("error: --steps must be at least 1")
    console = make_console()
    device = device_type_or_exit(args.device)
    resolution = args.res or config.schedule_for_resolution().resolution_at(0)
    batch_size = args.batch_size or config.data.batch_size
    workers = args.workers or data_workers(config)
    notes: list[str] = []
    try:
        num_classes = len(read_manifest(config.data.path)["classes"])
    except BetonError as exc:
        num_classes, backends = 1000, []
        notes.append(f"loaders skipped: {exc}")
    else:
        backends = [name.strip() for name in args.backends.split(",") if name.strip()]
    common = {"split": "train", "res": resolution, "workers": workers, "batch_size": batch_size,
              "device": device_name(device)}
    step = build_train_step(config, num_classes, device)
    with ResourceSampler() as usage:
        ceiling = synthetic_rate(step, batch_size, resolution, num_classes, args.steps, warmup=2)
    rows = [dict(common, backend="synthetic", workers=0, img_per_s=ceiling, ratio_to_synthetic=1.0,
                 peak_rss_mb=round(usage.peak_rss_mb, 1))]
    skipped = unavailable_backends(backends)
    for backend, reason in skipped.items():
        notes.append(f"{backend}: skipped, {reason}")
    loader_runtime = build_runtime(config, device=device)
    for backend in (name for name in backends if name not in skipped):
        console.print(f"training step fed by {backend} ...")
        try:
            with ResourceSampler() as usage:
                loader = loader_for(config, "train", loader_runtime, backend=backend, batch_size=batch_size,
                                      resolution=resolution, workers=workers, distributed=False)
                rate = fed_rate(step, loader, args.steps, warmup=2)
                del loader
                gc.collect()
        except Exception as exc:  # noqa: BLE001 - one broken backend must not lose the other figures
            notes.append(f"{backend}: failed: {type(exc).__name__}: {exc}")
            continue
        rows.append(dict(common, backend=backend, img_per_s=rate, ratio_to_synthetic=round(rate / ceiling, 3),
                         peak_rss_mb=round(usage.peak_rss_mb, 1)))
    payload = {"benchmark": "train-step", "machine": machine_info(),
               "settings": {"config": str(args.config), "arch": config.model.arch, "steps": args.steps,
                            "amp": config.train.amp, "device": device, "step": STEP_NOTE,
                            "precision": loader_runtime.precision.name,
                            "channels_last": config.model.channels_last,
                            "compiled": step.graphs is not None, "graphs_compiled": step.graphs},
               "results": rows, "notes": notes}
    written = write_report(args.out, payload, f"Training step: {config.model.arch}", plots=False,
                           columns=COLUMNS)
    print_table(rows, COLUMNS, title=f"{config.model.arch} train img/s at {resolution}px, batch {batch_size}",
                console=console)
    console.print(f"step: {STEP_NOTE}; precision {loader_runtime.precision.name}, graphs compiled: "
                  f"{step.graphs if step.graphs is not None else 'not compiled'}")
    for note in notes:
        console.print(f"note: {note}")
    console.print(f"report: {', '.join(str(Path(path)) for path in written)}")
    return 0
