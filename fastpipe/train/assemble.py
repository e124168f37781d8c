"""Every piece a run needs, built from a `Config` in one place: device and precision, loader arguments,
the model (channels-last, BlurPool, freeze, torch.compile), optimizer and schedule, and the step.

`fastpipe.train`, `fastpipe.lr_find`, `fastpipe.evaluate`, `benchmarks train-step` and `benchmarks autotune`
build through these functions and nowhere else, so a benchmark times exactly what training runs.
"""
from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torchvision.transforms import v2

from fastpipe.config import SMALL_IMAGE_MAX_RESOLUTION, Config
from fastpipe.data import build_loader as build
from fastpipe.model import apply_freeze, build_resnet, compile_model, load_weights, stem_of
from fastpipe.train.checkpoint import CheckpointError, evaluation_weights, load_checkpoint
from fastpipe.train.ema import WeightAverage
from fastpipe.train.optim import build_optimizer, build_scheduler
from fastpipe.train.runtime import Runtime
from fastpipe.train.step import TrainStep


# ------------------------------------------------------------------------------------------- loaders
def usable_cores() -> int:
    """Cores this process may run on (a container's or taskset's share, not the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def auto_workers() -> tuple[int, str]:
    """data.workers = "auto": (workers, why). This rank's share of the usable cores (torchrun's
    LOCAL_WORLD_SIZE ranks on this node share them), less one for the main thread, which launches the
    step, when the share is over two; on one or two cores per rank the workers keep all of them (the
    loader tables here were measured at 2 workers on 2 cores)."""
    cores, ranks = usable_cores(), max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    share = max(1, cores // ranks)
    workers = share - 1 if share > 2 else share
    why = f"{cores} usable cores / {ranks} rank(s) on this node" + (", less 1 for the main thread" if share > 2 else "")
    return workers, why


def data_workers(config: Config) -> int:
    """Loader workers (DALI: threads; torch: worker processes) for each rank."""
    return auto_workers()[0] if config.data.workers == "auto" else config.data.workers


def loader_args(config: Config, split: str, runtime: Runtime, **overrides) -> dict:
    """`fastpipe.data.build_loader` keyword arguments for `split`: the train split gets the first epoch's
    resolution and batch size and every augment key; val gets resolution.val, unshuffled (sharded over
    torchrun's ranks). `overrides` (a benchmark's backend, resolution, workers, backend options ...) replace single entries; the options of
    [data.<backend>] are those of the backend that runs."""
    data, augment = config.data, config.augment
    backend = overrides.get("backend", data.backend)
    args = dict(backend=backend, data=data.path, split=split, workers=data_workers(config), device=str(runtime.device),
                dtype=runtime.precision.dtype, seed=config.train.seed, **data.options_for(backend))
    if split == "train":
        schedule = config.schedule_for_resolution()
        args.update(batch_size=schedule.batch_size_at(0), resolution=schedule.resolution_at(0), shuffle=True,
                    drop_last=True, distributed=runtime.dist.enabled, min_scale=augment.min_scale,
                    max_scale=augment.max_scale, ratio=augment.ratio, flip=augment.flip)
    else:
        # under torchrun every rank reads its shard; evaluate() gathers the rows in the split's order
        args.update(batch_size=data.val_batch_size or data.batch_size, resolution=config.resolution.val,
                    shuffle=False, drop_last=False, distributed=runtime.dist.enabled)
    args.update(overrides)
    return args


def loader_for(config: Config, split: str, runtime: Runtime, **overrides):
    return build(**loader_args(config, split, runtime, **overrides))


# --------------------------------------------------------------------------------------------- model
def resolve_stem(config: Config) -> tuple[str, str]:
    """(stem, why): model.stem, with "auto" decided by the largest training resolution."""
    if config.model.stem != "auto":
        return config.model.stem, "set by model.stem"
    resolution = config.max_train_resolution()
    if resolution <= SMALL_IMAGE_MAX_RESOLUTION:
        return "small", f"auto: training resolution up to {resolution} px <= {SMALL_IMAGE_MAX_RESOLUTION}"
    return "imagenet", f"auto: training resolution up to {resolution} px > {SMALL_IMAGE_MAX_RESOLUTION}"


def build_model(config: Config, num_classes: int, runtime: Runtime, *, init_from: str | Path | None = None,
                stem: str | None = None, log=print) -> nn.Module:
    """The plain module (used for evaluation and checkpoints) on the run's device and memory format:
    torchvision ResNet with the config's stem and width, BlurPool, optional fine-tune initialisation,
    freezing. `stem` (a checkpoint's) replaces the one the config resolves to."""
    stem = stem or resolve_stem(config)[0]
    model = build_resnet(config.model.arch, num_classes, stem=stem, width=config.model.width,
                         blurpool=config.model.blurpool, zero_init_residual=config.model.zero_init_residual)
    if init_from:
        source = Path(init_from) / "best.pt" if Path(init_from).is_dir() else Path(init_from)
        state = load_checkpoint(source)
        if stem_of(state) != stem:
            raise CheckpointError(
                f"{source} was trained with model.stem=\"{stem_of(state)}\", but this run builds the \"{stem}\" "
                f"stem ({resolve_stem(config)[1]}); their first layers differ, so its weights cannot start this "
                f"model. Set --model.stem={stem_of(state)} to fine-tune from it, or train without --init-from.")
        reset = load_weights(model, evaluation_weights(state))
        log(f"initialised from {init_from}; freshly initialised: {', '.join(reset) or 'none'}")
    apply_freeze(model, config.model.freeze)
    memory_format = torch.channels_last if config.model.channels_last else torch.contiguous_format
    return model.to(runtime.device, memory_format=memory_format)


def uses_compile(config: Config, runtime: Runtime) -> bool:
    return config.model.compile if config.model.compile != "auto" else runtime.device_type == "cuda"


def compile_cache(setting: str) -> Path:
    """model.compile_cache -> the folder inductor (and Triton, on a GPU) keep compiled graphs in, set for this
    process and the compile workers it starts. A later run (or a resumed one, or another rank on this node)
    with the same shapes loads its graphs from there instead of compiling them again."""
    if setting == "auto":
        home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        folder = Path(os.environ.get("TORCHINDUCTOR_CACHE_DIR") or home / "fastpipe" / "inductor")
    else:
        folder = Path(setting).expanduser()
    folder = folder.resolve()
    import torch._functorch.config  # local: compile's configuration, loaded only when compiling
    import torch._inductor.config
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
    os.environ.setdefault("TRITON_CACHE_DIR", str(folder / "triton"))
    torch._inductor.config.fx_graph_cache = True          # on by default in recent torch: said, not assumed
    torch._functorch.config.enable_autograd_cache = True   # the backward graph too
    return folder


def wrap_for_training(model: nn.Module, config: Config, runtime: Runtime):
    """The same weights behind DDP (under torchrun) and torch.compile (static shapes: one graph per
    resolution and batch size). Returns (module to train, CompileCounter or None)."""
    train_model = model
    if runtime.dist.enabled:
        ids = [runtime.device.index] if runtime.device_type == "cuda" else None
        # measured choices (`python -m benchmarks ddp`): no buffer broadcast per forward (the trainer sends
        # rank 0's statistics before evaluating), gradients reduced in place in the buckets
        ddp = nn.parallel.DistributedDataParallel
        # torch 2.14 renamed broadcast_buffers (the box's 2.11 knows only the old name)
        sync = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(ddp).parameters else \
            "broadcast_buffers"
        train_model = ddp(model, device_ids=ids, gradient_as_bucket_view=config.train.ddp_bucket_view,
                          **{sync: config.train.ddp_broadcast_buffers})
    if not uses_compile(config, runtime):
        return train_model, None
    compile_cache(config.model.compile_cache)
    return compile_model(train_model, config.model.compile_backend)


# ----------------------------------------------------------------------------------- optimizer, step
def build_criterion(config: Config) -> nn.Module:
    return nn.CrossEntropyLoss(label_smoothing=config.optim.label_smoothing)


def build_mix(config: Config, num_classes: int):
    """torchvision v2 MixUp and/or CutMix (one picked per batch), or None when both are off."""
    choices = [cls(alpha=alpha, num_classes=num_classes) for cls, alpha in
               ((v2.MixUp, config.augment.mixup), (v2.CutMix, config.augment.cutmix)) if alpha > 0]
    if not choices:
        return None
    return choices[0] if len(choices) == 1 else v2.RandomChoice(choices)


def build_step(config: Config, runtime: Runtime, train_model: nn.Module, optimizer: torch.optim.Optimizer,
               scheduler, num_classes: int, total_steps: int, ema=None) -> TrainStep:
    """The training step the trainer runs (and the benchmarks time)."""
    return TrainStep(train_model, optimizer, scheduler, build_criterion(config), runtime.precision,
                     mix=build_mix(config, num_classes), total_steps=total_steps,
                     distributed=runtime.dist.enabled, ema=ema)


@dataclass
class Training:
    """A model ready to train: the plain module, its training wrapper, optimizer, schedule and step."""
    model: nn.Module
    train_model: nn.Module
    compile_counter: object
    optimizer: torch.optim.Optimizer
    ema: object = None                  # fastpipe.train.ema.WeightAverage when model.ema_decay > 0
    scheduler: object = None
    step: TrainStep | None = None


def build_training(config: Config, num_classes: int, runtime: Runtime, *, init_from=None, stem: str | None = None,
                   log=print) -> Training:
    """Model, training wrapper and optimizer. The schedule and step follow with `schedule_training`
    once the peak LR is known (optim.lr = "auto" runs the LR finder on this model first)."""
    model = build_model(config, num_classes, runtime, init_from=init_from, stem=stem, log=log)
    train_model, counter = wrap_for_training(model, config, runtime)
    ema = None
    if config.model.ema_decay > 0:
        ema = WeightAverage(model, config.model.ema_decay)
    return Training(model, train_model, counter, build_optimizer(model, config), ema)


def schedule_training(training: Training, config: Config, runtime: Runtime, num_classes: int, peak_lr: float,
                      total_steps: int) -> Training:
    training.scheduler = build_scheduler(training.optimizer, config, peak_lr, total_steps)
    training.step = build_step(config, runtime, training.train_model, training.optimizer, training.scheduler,
                               num_classes, total_steps, training.ema)
    return training


def build_benchmark_training(config: Config, num_classes: int, runtime: Runtime, steps: int = 10**6) -> Training:
    """The trainer's model and step for timing: a numeric optim.lr as the peak (0.1 for "auto": the LR
    does not change a step's cost) over `steps` steps."""
    peak_lr = 0.1 if config.optim.lr == "auto" else float(config.optim.lr)
    training = build_training(config, num_classes, runtime, log=lambda message: None)
    training.model.train()
    return schedule_training(training, config, runtime, num_classes, peak_lr, steps)
