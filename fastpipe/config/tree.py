"""The typed config tree: one frozen dataclass per TOML section, records for the per-backend loader options
and the resolution stages, and `knob`, which gives each key its default and its line of `--help`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from fastpipe.train.resolution import ResolutionSchedule, Stage

CONFIG_DIR = Path(__file__).resolve().parent.parent.parent / "configs"


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key and what to do."""


def knob(default, help: str):
    """A config key: its default and its one line of `--help`."""
    return field(default=default, metadata={"help": help})


# Per-backend loader options: None keeps the backend's own default (fastpipe.data's loader classes).
@dataclass(frozen=True)
class FFCVOptions:
    order: Literal["random", "quasi_random"] | None = knob(None, "sample order (default random); quasi_random needs os_cache = false")
    os_cache: bool | None = knob(None, "read the beton through the OS page cache (default true)")
    batches_ahead: int | None = knob(None, "batches FFCV prepares ahead (default 3)")
    bound_rss: bool | None = knob(None, "give freed epoch buffers back to the OS (default true)")
    decoder: Literal["auto", "crop", "stock"] | None = knob(None, "crop: the native crop decoder; stock: FFCV's; auto (default): crop when built")


@dataclass(frozen=True)
class DALIOptions:
    hw_decoder_load: float | None = knob(None, "share of JPEGs for the GPU's hardware decoder (default 0.65)")
    prefetch: int | None = knob(None, "batches DALI prepares ahead (default 2)")


@dataclass(frozen=True)
class TorchOptions:
    prefetch_factor: int | None = knob(None, "batches each worker prepares ahead (default 2)")


@dataclass(frozen=True)
class DataConfig:
    path: str = knob("data/betons/imagenet-mini", "folder of betons + manifest.json (from `python -m convert`)")
    backend: Literal["ffcv", "dali", "torch"] = knob("ffcv", "loader: FFCV, NVIDIA DALI or the torchvision baseline")
    workers: int | Literal["auto"] = knob("auto", "loader worker processes (DALI: threads); auto: the usable cores")
    batch_size: int = knob(256, "per process; optim.lr is the peak LR for this batch size")
    val_batch_size: int = knob(0, "0: same as batch_size")
    ffcv: FFCVOptions = field(default_factory=FFCVOptions, metadata={"help": "[data.ffcv]: FFCV loader options"})
    dali: DALIOptions = field(default_factory=DALIOptions, metadata={"help": "[data.dali]: DALI loader options"})
    torch: TorchOptions = field(default_factory=TorchOptions, metadata={"help": "[data.torch]: torchvision baseline options"})

    def options_for(self, backend: str) -> dict:
        """The keyword arguments [data.<backend>] sets; keys left unset keep the backend's own defaults."""
        return {key: value for key, value in dataclasses.asdict(getattr(self, backend)).items() if value is not None}


@dataclass(frozen=True)
class ResolutionConfig:
    start: int = knob(160, "training resolution (px) before the ramp")
    end: int = knob(192, "training resolution (px) after the ramp")
    ramp_start: int = knob(11, "epoch where the resolution starts to grow")
    ramp_end: int = knob(13, "epoch where it reaches `end`")
    val: int = knob(256, "evaluation resolution (px)")
    multiple: int = knob(32, "ramp resolutions are rounded to a multiple of this")
    stages: tuple[Stage, ...] = knob((), "[{epochs, resolution, batch_size?}, ...]; overrides the ramp")


@dataclass(frozen=True)
class AugmentConfig:
    min_scale: float = knob(0.08, "smallest random crop, as a share of the image area")
    max_scale: float = knob(1.0, "largest random crop, as a share of the image area")
    ratio: tuple[float, float] = knob((3 / 4, 4 / 3), "aspect-ratio range of the random crops")
    flip: bool = knob(True, "random horizontal flips")
    mixup: float = knob(0.0, "Beta(alpha, alpha) of v2.MixUp; 0 turns it off")
    cutmix: float = knob(0.0, "Beta(alpha, alpha) of v2.CutMix; 0 turns it off")


@dataclass(frozen=True)
class ModelConfig:
    arch: Literal["resnet18", "resnet34", "resnet50"] = knob("resnet50", "torchvision ResNet")
    stem: Literal["auto", "imagenet", "small"] = knob("auto", "small: 3x3 conv, no max-pool; auto: small at <= 64 px training")
    width: int = knob(64, "channels of the first stage (torchvision: 64); 32 or 16 for small images on a CPU")
    compile: bool | Literal["auto"] = knob("auto", "torch.compile; auto: on for CUDA, off for CPU")
    compile_backend: str = knob("inductor", 'torch.compile backend ("aot_eager" to debug)')
    compile_cache: str = knob("auto", "folder of the compiled graphs, reused by later runs; auto: $TORCHINDUCTOR_CACHE_DIR, else ~/.cache/fastpipe/inductor")
    channels_last: bool = knob(True, "NHWC memory format (faster convolutions on tensor cores)")
    blurpool: bool = knob(True, "anti-aliased strided convolutions")
    freeze: Literal["none", "bn", "backbone"] = knob("none", "bn: BatchNorm fixed; backbone: only the head trains")
    zero_init_residual: bool = knob(True, "each residual block starts as the identity")
    ema_decay: float = knob(0.0, "EMA of weights and BatchNorm statistics, evaluated beside them; 0 turns it off")


@dataclass(frozen=True)
class OptimConfig:
    name: Literal["sgd", "adamw"] = knob("sgd", "optimizer (SGD with nesterov, or AdamW)")
    lr: float | Literal["auto"] = knob(0.5, 'peak LR for data.batch_size (scaled linearly with stage batch sizes and processes); "auto" runs the LR finder')
    momentum: float = knob(0.9, "also the peak of momentum cycling (minimum: 0.85x)")
    weight_decay: float = knob(5e-5, "never applied to BatchNorm or bias parameters")
    label_smoothing: float = knob(0.1, "cross-entropy label smoothing")
    nesterov: bool = knob(True, "nesterov momentum (SGD)")


@dataclass(frozen=True)
class ScheduleConfig:
    epochs: int = knob(16, "length of the run")
    pct_start: float = knob(0.125, "share of the run before the LR peak (2 of 16 epochs, as in FFCV's recipes)")
    div_factor: float = knob(25.0, "starting LR = peak / div_factor")
    final_div_factor: float = knob(1e4, "final LR = starting LR / final_div_factor")
    anneal: Literal["linear", "cos"] = knob("linear", "shape of the one-cycle ramps")
    cycle_momentum: bool = knob(True, "momentum low while the LR is high")


@dataclass(frozen=True)
class TrainConfig:
    amp: Literal["auto", "bf16", "fp16", "off"] = knob("auto", "auto: bf16 or fp16 on CUDA, off on CPU")
    device: Literal["auto", "cuda", "cpu"] = knob("auto", "auto: CUDA when torch sees a GPU")
    seed: int = knob(0, "seeds weights, sample order and augmentation")
    deterministic: bool = knob(False, "deterministic kernels (slower), for bitwise-repeatable runs")
    early_stop_patience: int = knob(0, "evaluations without val top-1 improvement; 0 turns it off")
    log_every: int = knob(50, "steps between log lines and reads of the loss from the device")
    ddp_broadcast_buffers: bool = knob(False, "DDP sends rank 0's BatchNorm statistics before every forward; off: once, before each evaluation (rank 0's, and so results, are the same)")
    ddp_bucket_view: bool = knob(True, "DDP gradients as views of its reduction buckets: no copy, less memory")


@dataclass(frozen=True)
class EvalConfig:
    flip_tta: bool = knob(True, "average the logits of each image and its mirror, at the final evaluation")
    tta_every: bool = knob(False, "flip TTA at every evaluation, not only the final one (a second forward pass each)")
    every: int = knob(1, "evaluate every N epochs (and always after the last)")


@dataclass(frozen=True)
class LRFinderConfig:
    start_lr: float = knob(1e-5, "first LR of the range test")
    end_lr: float = knob(10.0, "last LR of the range test")
    steps: int = knob(100, "steps of the range test")


@dataclass(frozen=True)
class RunConfig:
    dir: str = knob("", "the run directory; empty: runs/<name>-<time>")
    name: str = knob("", "empty: the config file's stem")


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    resolution: ResolutionConfig = field(default_factory=ResolutionConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    lr_finder: LRFinderConfig = field(default_factory=LRFinderConfig)
    run: RunConfig = field(default_factory=RunConfig)
    # not a section: (key, value, why) of each default `load_config` replaced for small images
    size_defaults: tuple = field(default=(), compare=False, repr=False, metadata={"section": False})

    def max_train_resolution(self) -> int:
        """The largest resolution any training epoch uses (a progressive run ends there)."""
        schedule = self.schedule_for_resolution()
        return max(schedule.resolution_at(epoch) for epoch in range(self.schedule.epochs))

    def schedule_for_resolution(self) -> ResolutionSchedule:
        res = self.resolution
        return ResolutionSchedule(start=res.start, end=res.end, ramp_start=res.ramp_start,
                                  ramp_end=res.ramp_end, multiple=res.multiple, stages=res.stages,
                                  batch_size=self.data.batch_size)

    def to_dict(self) -> dict:
        return {name: _plain(dataclasses.asdict(getattr(self, name))) for name in SECTIONS}


SECTIONS = {f.name: f.type for f in dataclasses.fields(Config) if f.metadata.get("section", True)}

# At or below this training resolution (px) the defaults below, which assume ImageNet-size photos, give way
# to small-image values, and model.stem = "auto" picks the small stem. min_scale 0.6 beat 0.35 and 0.08 on
# both the hard synthetic set and the digits (README, "Small images"); a key the user sets is never replaced.
SMALL_IMAGE_MAX_RESOLUTION = 64
SMALL_IMAGE_DEFAULTS = {("augment", "min_scale"): 0.6}


def _plain(value):
    """Dataclass values as TOML-ready data: tuples as lists; None (a backend's default) and records with
    nothing set left out."""
    if isinstance(value, dict):
        plain = {k: _plain(v) for k, v in value.items() if v is not None}
        return {k: v for k, v in plain.items() if v != {}}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
