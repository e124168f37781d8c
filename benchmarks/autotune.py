"""`python -m benchmarks autotune --config r50.toml`: loader workers and batch size for a config.

For each resolution the config's schedule uses: the loader setting with the best loader img/s, and
the batch size with the best training img/s that fits (GPU memory, or --memory-limit-gb on CPU).
Successive halving inside a wall-clock budget; writes a TOML the trainer takes with --tune.
"""
from __future__ import annotations

import gc
import json
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import tomli_w
import torch

from benchmarks.loaders import unavailable_backends
from benchmarks.machine import describe, machine_info
from benchmarks.measure import device_type_or_exit, measure_batches
from benchmarks.report import make_console, print_table
from benchmarks.resources import ResourceSampler
from benchmarks.search import Budget, SearchResult, Trial, successive_halving
from benchmarks.train_step import build_train_step, synthetic_rate
from fastpipe.config import ConfigError, load_config
from fastpipe.data.beton import BetonError, atomic_write, read_manifest
from fastpipe.train.assemble import loader_for, usable_cores
from fastpipe.train.runtime import build_runtime

# DALI settings tried on a GPU besides the thread count (build_loader keyword arguments).
DALI_GPU_OPTIONS = {"prefetch": (2, 3), "hw_decoder_load": (0.0, 0.5, 0.75)}
LOADER_WARMUP_BATCHES = 4
LOADER_MIN_BATCHES = 16   # first-rung measurement length; later rungs double it
TRIAL_COLUMNS = {"phase": "phase", "res": "res", "setting": "setting", "rung": "rung", "units": "units",
                 "img_per_s": "img/s", "seconds": "s", "note": "note"}


class MemoryLimitExceeded(RuntimeError):
    """A CPU training step's peak RSS went over --memory-limit-gb: the batch size "does not fit"."""


@dataclass
class PhaseResult:
    phase: str                 # "warm-up", "loader" or "batch"
    res: int
    search: SearchResult
    probes: list[Trial] = field(default_factory=list)   # unscored trials before the search
    offset_s: float = 0.0      # when the phase's budget started, relative to the whole run


def worker_counts(cores: int) -> list[int]:
    """1, 2, 4, ... up to the core count, and the core count itself."""
    counts, count = [], 1
    while count < cores:
        counts.append(count)
        count *= 2
    return [*counts, cores]


def spread(items: list) -> list:
    """`items` reordered so that every prefix samples the whole range: the last, the first, then the
    midpoints of the gaps left, level by level. A search that runs out of budget part-way through its
    first rung has then still tried few and many workers alike, not just the first few counts."""
    if len(items) <= 2:
        return items[::-1]
    order, gaps = [len(items) - 1, 0], [(0, len(items) - 1)]
    while gaps:
        next_gaps = []
        for low, high in gaps:
            if high - low > 1:
                middle = (low + high) // 2
                order.append(middle)
                next_gaps += [(low, middle), (middle, high)]
        gaps = next_gaps
    return [items[index] for index in order]


def loader_candidates(backend: str, device: str, cores: int) -> list[tuple]:
    """Hashable settings: tuples of (name, value) pairs passed on to build_loader, in `spread` order.
    With DALI on a GPU, the prefetch depth and the hardware decoder's share of JPEGs are tuned too."""
    workers = [(("workers", count),) for count in worker_counts(cores)]
    if backend != "dali" or device != "cuda":
        return spread(workers)
    return spread([(*base, ("prefetch", prefetch), ("hw_decoder_load", load))
                   for base in workers for prefetch in DALI_GPU_OPTIONS["prefetch"]
                   for load in DALI_GPU_OPTIONS["hw_decoder_load"]])


MIN_STEPS_PER_EPOCH = 8


def batch_sizes(smallest: int, largest: int) -> list[int]:
    sizes, size = [], smallest
    while size <= largest:
        sizes.append(size)
        size *= 2
    return sizes


def loader_images_per_second(config, res: int, setting: tuple, batches: int, runtime) -> float:

    # the trainer's loader (augmentation included) with the trial's setting over it
    loader = loader_for(config, "train", runtime, batch_size=config.data.batch_size, resolution=res,
                          **dict(setting))
    try:
        # Loaders prefetch a few batches while the first ones are consumed; untimed warm-up batches
        # empty that head start so it does not inflate a short measurement.
        return measure_batches(loader, runtime.device_type, batches, warmup_batches=LOADER_WARMUP_BATCHES)
    finally:
        del loader
        gc.collect()


def train_rate(step, res: int, batch_size: int, steps: int, num_classes: int, memory_limit: float) -> float:
    """Training img/s on synthetic batches; raises when the batch does not fit."""


    try:
        with ResourceSampler() as usage:
            rate = synthetic_rate(step, batch_size, res, num_classes, steps, warmup=1)
    except torch.OutOfMemoryError:
        step.optimizer.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
        raise
    if step.device == "cpu" and usage.peak_rss_bytes > memory_limit:
        raise MemoryLimitExceeded(f"peak RSS {usage.peak_rss_mb / 1024:.1f} GiB over the "
                                  f"{memory_limit / 2**30:.1f} GiB limit")
    return rate


def warm_up_loader(config, res: int, setting: tuple, runtime, budget: Budget) -> Trial:
    """One untimed batch first: imports and JIT compiles (FFCV's numba pipeline) are paid once here."""
    start = budget.clock()
    note = "untimed: imports + JIT"
    try:
        loader_images_per_second(config, res, setting, 1, runtime)
    except Exception as exc:  # noqa: BLE001 - the search itself reports a broken setting
        note = f"warm-up failed: {type(exc).__name__}: {str(exc)[:120]}"
    return Trial(setting, -1, 1, None, budget.clock() - start, note, start - budget.start)


def tune_batch(step, res: int, sizes: list[int], budget: Budget, num_classes: int, memory_limit: float,
               keep: int = 3) -> PhaseResult:
    """Probe growing batch sizes (1 step each) until one does not fit, then search the largest few."""
    probes: list[Trial] = []
    fitting: list[int] = []
    estimate = 0.0
    stopped = ""
    for size in sizes:
        if not budget.allows(estimate):
            stopped = f"time budget stopped the fit probes before batch size {size}"
            break
        start = budget.clock()
        try:
            score, note = train_rate(step, res, size, 1, num_classes, memory_limit), ""
        except (RuntimeError, MemoryError) as exc:   # torch.OutOfMemoryError is a RuntimeError
            score, note = None, f"does not fit: {type(exc).__name__}: {str(exc)[:120]}"
        seconds = budget.clock() - start
        probes.append(Trial(size, -1, 1, score, seconds, note, start - budget.start))
        if score is None:
            break
        fitting.append(size)
        estimate = 2.5 * seconds   # the next size is twice as large
    if not fitting:
        empty = SearchResult(None, None, complete=False, reason="no batch size fitted within the budget")
        return PhaseResult("batch", res, empty, probes)
    search = successive_halving(fitting[-keep:], lambda size, units: train_rate(
        step, res, size, units, num_classes, memory_limit), budget, min_units=2, prefer=lambda size: size)
    if stopped:
        search.complete = False
        search.reason = "; ".join(filter(None, [stopped, search.reason]))
    return PhaseResult("batch", res, search, probes)


def resolution_epochs(config) -> dict[int, int]:
    """Epochs spent at each resolution the schedule uses, in order of first use."""
    schedule = config.schedule_for_resolution()
    counts: dict[int, int] = {}
    for epoch in range(config.schedule.epochs):
        res = schedule.resolution_at(epoch)
        counts[res] = counts.get(res, 0) + 1
    return counts


def tuned_values(config, phases: list[PhaseResult]) -> dict:
    """The [data] (and [resolution] stages) values to write, falling back to the config's own."""
    epochs = resolution_epochs(config)
    main_res = max(epochs, key=lambda res: (epochs[res], res))   # the resolution most epochs train at
    loader = {p.res: p.search.best for p in phases if p.phase == "loader" and p.search.best is not None}
    batch = {p.res: p.search.best for p in phases if p.phase == "batch" and p.search.best is not None}
    setting = dict(loader.get(main_res) or next(iter(loader.values()), None) or ())
    data = {"workers": setting.pop("workers", config.data.workers)}
    if setting:   # the tuned backend's options, over the ones the config gave it
        data[config.data.backend] = {**config.data.options_for(config.data.backend), **setting}
    # One batch size for every epoch: the one tuned at the largest resolution fits at all smaller ones.
    data["batch_size"] = batch[max(batch)] if batch else config.data.batch_size
    values = {"data": data}
    lr = lr_for_batch(config, data["batch_size"])
    if lr is not None:
        values["optim"] = {"lr": lr}
    if config.resolution.stages:
        values["resolution"] = {"stages": [
            {"epochs": stage.epochs, "resolution": stage.resolution,
             "batch_size": batch.get(stage.resolution, stage.batch_size or data["batch_size"])}
            for stage in config.resolution.stages]}
    return values


def lr_for_batch(config, batch_size: int) -> float | None:
    """optim.lr is the peak LR for data.batch_size, so a new batch size brings its LR with it, scaled
    linearly as the trainer scales stage batch sizes (Goyal et al., 2017). None: nothing to write
    (same batch size, or lr = "auto", which the LR finder sets at whatever batch size is used)."""
    if config.optim.lr == "auto" or batch_size == config.data.batch_size:
        return None
    return float(config.optim.lr) * batch_size / config.data.batch_size


def lr_note(config, values: dict) -> str:
    batch = values["data"]["batch_size"]
    if "optim" in values:
        return (f"optim.lr {config.optim.lr:g} at batch {config.data.batch_size} -> {values['optim']['lr']:.4g} at "
                f"batch {batch}: scaled linearly with data.batch_size, as stage batch sizes are")
    if config.optim.lr == "auto":
        return "optim.lr = auto: the LR finder picks the LR at the tuned batch size"
    return f"optim.lr {config.optim.lr:g} kept: the batch size did not change"


def write_tune_file(path: Path, values: dict, header: list[str]) -> None:
    text = "".join(f"# {line}\n" for line in header) + "\n" + tomli_w.dumps(values)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as handle:
        handle.write(text)


def trial_rows(phases: list[PhaseResult]) -> list[dict]:
    rows = []
    for phase in phases:
        for trial in [*phase.probes, *phase.search.trials]:
            setting = (", ".join(f"{k}={v}" for k, v in trial.candidate) if isinstance(trial.candidate, tuple)
                       else f"batch_size={trial.candidate}")
            unscored = "fit probe" if phase.phase == "batch" else phase.phase
            rows.append({"phase": phase.phase if trial.rung >= 0 else unscored, "res": phase.res,
                         "setting": setting, "rung": trial.rung if trial.rung >= 0 else None,
                         "units": trial.units, "img_per_s": trial.score, "seconds": round(trial.seconds, 2),
                         "started_s": round(trial.started_s + phase.offset_s, 2),
                         "note": trial.note})
    return rows


def summary_rows(phases: list[PhaseResult], config) -> list[dict]:
    """Per resolution: the winning loader setting and batch size with their img/s."""
    rows: dict[int, dict] = {}
    for phase in phases:
        if phase.phase not in ("loader", "batch"):
            continue
        row = rows.setdefault(phase.res, {"backend": config.data.backend, "split": "train", "res": phase.res,
                                          "workers": None, "batch_size": None})
        best = phase.search.best
        if phase.phase == "loader":
            setting = dict(best or ())
            row["workers"] = setting.pop("workers", None)
            row["options"] = setting
            row["img_per_s"] = phase.search.best_score
        else:
            row["batch_size"] = best
            row["train_img_per_s"] = phase.search.best_score
    return list(rows.values())


SUMMARY_COLUMNS = {"res": "res", "backend": "backend", "workers": "workers", "options": "options",
                   "img_per_s": "loader img/s", "batch_size": "batch", "train_img_per_s": "train img/s"}


ACCEPTS_CONFIG_OVERRIDES = True   # `--data.path=...` style arguments go to load_config


def add_arguments(parser) -> None:
    parser.add_argument("--config", required=True, help="trainer config (TOML)")
    parser.add_argument("--budget-s", type=float, default=300.0, help="wall-clock budget in seconds")
    parser.add_argument("--out", default="autotune.toml", help="TOML to write (trainer: --tune FILE)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--memory-limit-gb", type=float,
                        help="CPU: peak RSS allowed while training (default: half the machine's memory)")
    parser.add_argument("--min-batch-size", type=int, default=16)
    parser.add_argument("--max-batch-size", type=int, default=1024)
    parser.add_argument("--max-workers", type=int, help="largest worker count tried (default: usable cores)")
    parser.add_argument("--skip-batch", action="store_true", help="tune the loader only")


def run(args) -> int:
    budget = Budget(args.budget_s)
    if args.budget_s <= 0 or not 1 <= args.min_batch_size <= args.max_batch_size:
        raise SystemExit("error: --budget-s must be > 0 and 1 <= --min-batch-size <= --max-batch-size")
    try:
        config = load_config(args.config, overrides=getattr(args, "overrides", []))
        manifest = read_manifest(config.data.path)
        num_classes, train_samples = len(manifest["classes"]), manifest["splits"]["train"]["written"]
    except (ConfigError, BetonError) as exc:
        raise SystemExit(f"error: {exc}") from None
    if reason := unavailable_backends([config.data.backend]).get(config.data.backend):
        raise SystemExit(f"error: data.backend of {args.config}: {reason}")
    console = make_console()
    device = device_type_or_exit(args.device)
    cores = args.max_workers or usable_cores()
    memory_limit = (args.memory_limit_gb or psutil.virtual_memory().total / 2**30 / 2) * 2**30
    # A batch that leaves fewer than MIN_STEPS_PER_EPOCH steps per epoch trains badly however fast it is.
    largest_batch = min(args.max_batch_size, max(args.min_batch_size, train_samples // MIN_STEPS_PER_EPOCH))
    if largest_batch < args.max_batch_size:
        console.print(f"batch sizes capped at {largest_batch}, so that {train_samples} train images give at "
                      f"least {MIN_STEPS_PER_EPOCH} steps per epoch")
    resolutions = list(resolution_epochs(config))
    pending = len(resolutions) * (1 if args.skip_batch else 2)
    phases: list[PhaseResult] = []
    step = None
    candidates = loader_candidates(config.data.backend, device, cores)
    # Paid once before the budget is shared out, so the first phase is not starved by it.
    runtime = build_runtime(config, device=device)   # once: every loader trial shares it
    warmup = warm_up_loader(config, resolutions[0], candidates[0], runtime, budget)
    phases.append(PhaseResult("warm-up", resolutions[0], SearchResult(None, None), [warmup]))
    for res in resolutions:
        console.print(f"[bold]{res}px[/bold]: loader settings ({config.data.backend}) ...")
        share = budget.share(pending)
        # Trials at the last resolution tell what a first trial at this one costs.
        earlier = [trial.seconds for phase in phases if phase.phase == "loader" for trial in phase.search.trials
                   if trial.rung == 0]
        search = successive_halving(
            candidates,
            lambda setting, units, res=res: loader_images_per_second(config, res, setting, units, runtime), share,
            min_units=LOADER_MIN_BATCHES, first_estimate=min(earlier, default=0.0))
        phases.append(PhaseResult("loader", res, search, offset_s=share.start - budget.start))
        pending -= 1
        if args.skip_batch:
            continue
        console.print(f"[bold]{res}px[/bold]: batch size ({config.model.arch}) ...")
        step = step or build_train_step(config, num_classes, device)
        share = budget.share(pending)
        phase = tune_batch(step, res, batch_sizes(args.min_batch_size, largest_batch), share,
                           num_classes, memory_limit)
        phase.offset_s = share.start - budget.start
        phases.append(phase)
        pending -= 1
    values = tuned_values(config, phases)
    incomplete = [f"{p.phase}@{p.res}px: {p.search.reason}" for p in phases if not p.search.complete]
    header = [f"python -m benchmarks autotune --config {args.config} --budget-s {args.budget_s:g} "
              + " ".join(getattr(args, "overrides", [])),
              f"on {describe(machine_info())}, device {device}, {budget.elapsed:.0f} s used",
              lr_note(config, values),
              *(f"partial: {line}" for line in incomplete)]
    out = Path(args.out)
    write_tune_file(out, values, header)
    rows, summary = trial_rows(phases), summary_rows(phases, config)
    out.with_suffix(".json").write_text(json.dumps(
        {"benchmark": "autotune", "machine": machine_info(), "settings": vars(args) | {"device": device},
         "elapsed_s": round(budget.elapsed, 2), "tuned": values, "trials": rows,
         "results": summary, "notes": incomplete}, indent=2, default=str) + "\n")
    print_table(rows, TRIAL_COLUMNS, title=f"autotune trials ({budget.elapsed:.1f} s of {args.budget_s:g} s)",
                console=console)
    print_table(summary, SUMMARY_COLUMNS, title="best per resolution", console=console)
    for line in incomplete:
        console.print(f"[yellow]partial: {line}[/yellow]")
    console.print(f"tuned: {json.dumps(values)}")
    console.print(f"wrote {out} (train with --tune {out}) and {out.with_suffix('.json')}")
    return 0

