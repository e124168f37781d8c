"""Typed training configuration: frozen dataclasses per TOML section, command-line overrides, tuning files.

`load_config("r50.toml", ["--optim.lr=0.4"], tune="autotune.toml")` reads defaults <- file <- tune file <-
overrides, checks every key and type, and returns a `Config`; `to_toml(config)` writes it back out.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import inspect
import json
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Union

try:
    import tomllib
except ModuleNotFoundError:   # Python 3.10: the same parser, as a package
    import tomli as tomllib

import tomli_w

from fastpipe.train.resolution import ResolutionSchedule, Stage

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key and what to do."""


# Each field's trailing comment is its one line of help: `python -m fastpipe.train --help` prints it.
@dataclass(frozen=True)
class DataConfig:
    path: str = "data/betons/imagenet-mini"   # folder of betons + manifest.json (from `python -m convert`)
    backend: Literal["ffcv", "dali", "torch"] = "ffcv"   # loader: FFCV, NVIDIA DALI or the torchvision baseline
    workers: int | Literal["auto"] = "auto"   # loader worker processes (DALI: threads); auto: the usable cores
    batch_size: int = 256                # per process; optim.lr is the peak LR for this batch size
    val_batch_size: int = 0              # 0: same as batch_size
    options: dict = field(default_factory=dict)   # backend keyword arguments, e.g. {order = "quasi_random"}


@dataclass(frozen=True)
class ResolutionConfig:
    start: int = 160                     # training resolution (px) before the ramp
    end: int = 192                       # training resolution (px) after the ramp
    ramp_start: int = 11                 # epoch where the resolution starts to grow
    ramp_end: int = 13                   # epoch where it reaches `end`
    val: int = 256                       # evaluation resolution (px)
    multiple: int = 32                   # ramp resolutions are rounded to a multiple of this
    stages: tuple = ()                   # [{epochs, resolution, batch_size?}, ...]; overrides the ramp


@dataclass(frozen=True)
class AugmentConfig:
    min_scale: float = 0.08              # smallest random crop, as a share of the image area
    max_scale: float = 1.0               # largest random crop, as a share of the image area
    ratio: tuple[float, float] = (3 / 4, 4 / 3)   # aspect-ratio range of the random crops
    flip: bool = True                    # random horizontal flips
    mixup: float = 0.0                   # Beta(alpha, alpha) of v2.MixUp; 0 turns it off
    cutmix: float = 0.0                  # Beta(alpha, alpha) of v2.CutMix; 0 turns it off


@dataclass(frozen=True)
class ModelConfig:
    arch: Literal["resnet18", "resnet34", "resnet50"] = "resnet50"   # torchvision ResNet
    stem: Literal["auto", "imagenet", "small"] = "auto"   # small: 3x3 conv, no max-pool; auto: small at <= 64 px training
    width: int = 64                      # channels of the first stage (torchvision: 64); 32 or 16 for small images on a CPU
    compile: bool | Literal["auto"] = "auto"    # torch.compile; auto: on for CUDA, off for CPU
    compile_backend: str = "inductor"           # torch.compile backend ("aot_eager" to debug)
    channels_last: bool = True           # NHWC memory format (faster convolutions on tensor cores)
    blurpool: bool = True                # anti-aliased strided convolutions
    freeze: Literal["none", "bn", "backbone"] = "none"   # bn: BatchNorm fixed; backbone: only the head trains
    zero_init_residual: bool = True      # each residual block starts as the identity
    ema_decay: float = 0.0               # EMA of weights and BatchNorm statistics, evaluated beside them; 0 turns it off


@dataclass(frozen=True)
class OptimConfig:
    name: Literal["sgd", "adamw"] = "sgd"   # optimizer (SGD with nesterov, or AdamW)
    lr: float | Literal["auto"] = 0.5    # peak LR for data.batch_size (scaled linearly with stage batch sizes and processes); "auto" runs the LR finder
    momentum: float = 0.9                # also the peak of momentum cycling (minimum: 0.85x)
    weight_decay: float = 5e-5           # never applied to BatchNorm or bias parameters
    label_smoothing: float = 0.1         # cross-entropy label smoothing
    nesterov: bool = True                # nesterov momentum (SGD)


@dataclass(frozen=True)
class ScheduleConfig:
    epochs: int = 16                     # length of the run
    pct_start: float = 0.125             # share of the run before the LR peak (2 of 16 epochs, as in FFCV's recipes)
    div_factor: float = 25.0             # starting LR = peak / div_factor
    final_div_factor: float = 1e4        # final LR = starting LR / final_div_factor
    anneal: Literal["linear", "cos"] = "linear"   # shape of the one-cycle ramps
    cycle_momentum: bool = True          # momentum low while the LR is high


@dataclass(frozen=True)
class TrainConfig:
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"   # auto: bf16 or fp16 on CUDA, off on CPU
    device: Literal["auto", "cuda", "cpu"] = "auto"        # auto: CUDA when torch sees a GPU
    seed: int = 0                        # seeds weights, sample order and augmentation
    deterministic: bool = False          # deterministic kernels (slower), for bitwise-repeatable runs
    early_stop_patience: int = 0         # evaluations without val top-1 improvement; 0 turns it off
    log_every: int = 50                  # steps between log lines and reads of the loss from the device


@dataclass(frozen=True)
class EvalConfig:
    flip_tta: bool = True                # average the logits of each image and its mirror
    every: int = 1                       # evaluate every N epochs (and always after the last)


@dataclass(frozen=True)
class LRFinderConfig:
    start_lr: float = 1e-5               # first LR of the range test
    end_lr: float = 10.0                 # last LR of the range test
    steps: int = 100                     # steps of the range test


@dataclass(frozen=True)
class RunConfig:
    dir: str = ""                        # the run directory; empty: runs/<name>-<time>
    name: str = ""                       # empty: the config file's stem


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
        stages = tuple(Stage(int(s["epochs"]), int(s["resolution"]), s.get("batch_size")) for s in res.stages)
        return ResolutionSchedule(start=res.start, end=res.end, ramp_start=res.ramp_start,
                                  ramp_end=res.ramp_end, multiple=res.multiple, stages=stages,
                                  batch_size=self.data.batch_size)

    def to_dict(self) -> dict:
        return {name: _plain(dataclasses.asdict(getattr(self, name))) for name in _SECTION_CLASSES}


_SECTION_FIELDS = [f for f in dataclasses.fields(Config) if f.metadata.get("section", True)]
SECTIONS = {f.name: f.type for f in _SECTION_FIELDS}
_SECTION_CLASSES = {f.name: f.default_factory for f in _SECTION_FIELDS}

# At or below this training resolution (px) the defaults below, which assume ImageNet-size photos, give way
# to small-image values, and model.stem = "auto" picks the small stem. min_scale 0.6 beat 0.35 and 0.08 on
# both the hard synthetic set and the digits (README, "Small images"); a key the user sets is never replaced.
SMALL_IMAGE_MAX_RESOLUTION = 64
SMALL_IMAGE_DEFAULTS = {("augment", "min_scale"): 0.6}
_STAGE_KEYS = {"epochs": int, "resolution": int, "batch_size": int}


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _field_types(section: str) -> dict[str, object]:
    cls = _SECTION_CLASSES[section]
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def valid_keys() -> list[str]:
    return [f"{section}.{key}" for section in _SECTION_CLASSES for key in _field_types(section)]


def _unknown(name: str, candidates: list[str]) -> ConfigError:
    close = difflib.get_close_matches(name, candidates, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return ConfigError(f"Unknown config key '{name}'.{hint} (run with --print-config to see all keys)")


def _describe(kind) -> str:
    if typing.get_origin(kind) is Literal:
        return " or ".join(repr(a) for a in typing.get_args(kind))
    if typing.get_origin(kind) is tuple:
        return f"a list of {len(typing.get_args(kind))} numbers"
    if typing.get_origin(kind) in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(kind))
    return {tuple: "a list", dict: "a table"}.get(kind, getattr(kind, "__name__", str(kind)))


def _coerce(name: str, value, kind):
    """Check `value` against the annotation `kind`; ints are accepted for floats."""
    origin = typing.get_origin(kind)
    if origin in (Union, types.UnionType):
        for option in typing.get_args(kind):
            try:
                return _coerce(name, value, option)
            except ConfigError:
                pass
    elif origin is Literal:
        if value in typing.get_args(kind) and type(value) is type(typing.get_args(kind)[0]):
            return value
    elif kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif kind is str:
        if isinstance(value, str):
            return value
    elif kind is dict:
        if isinstance(value, dict):
            return dict(value)
    elif origin is tuple:
        args = typing.get_args(kind)
        if isinstance(value, (list, tuple)) and len(value) == len(args):
            return tuple(_coerce(f"{name}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args)))
    elif kind is tuple and isinstance(value, (list, tuple)):
        return tuple(_coerce_stage(f"{name}[{i}]", s) for i, s in enumerate(value))
    raise ConfigError(f"Config key '{name}' expects {_describe(kind)}, got {type(value).__name__} {value!r}.")


def _coerce_stage(name: str, stage) -> dict:
    if not isinstance(stage, dict):
        raise ConfigError(f"'{name}' must be a table like {{epochs = 4, resolution = 160, batch_size = 512}}.")
    for key, value in stage.items():
        if key not in _STAGE_KEYS:
            raise _unknown(f"{name}.{key}", [f"{name}.{k}" for k in _STAGE_KEYS])
        _coerce(f"{name}.{key}", value, _STAGE_KEYS[key])
    if "epochs" not in stage or "resolution" not in stage:
        raise ConfigError(f"'{name}' needs both 'epochs' and 'resolution'.")
    return dict(stage)


# Keys earlier releases wrote into run directories' config.toml: still read (and ignored, with a note) so
# that those runs resume and evaluate.
REMOVED_KEYS = {"train.max_nonfinite_steps": "a non-finite loss now always stops the run within one log interval"}


def _merge(base: dict, layer: dict, origin: str) -> None:
    """Merge one parsed TOML layer into `base` (section -> key -> value), checking keys and types."""
    for section, values in layer.items():
        if section not in _SECTION_CLASSES:
            raise _unknown(section, list(_SECTION_CLASSES))
        if not isinstance(values, dict):
            raise ConfigError(f"'{section}' in {origin} must be a [{section}] table, not a value.")
        types_ = _field_types(section)
        for key, value in values.items():
            if f"{section}.{key}" in REMOVED_KEYS:
                print(f"note: {section}.{key} in {origin} is no longer used: {REMOVED_KEYS[f'{section}.{key}']}",
                      file=sys.stderr)
                continue
            if key not in types_:
                raise _unknown(f"{section}.{key}", valid_keys())
            base[section][key] = _coerce(f"{section}.{key}", value, types_[key])


def parse_value(text: str):
    """A command-line value as a TOML literal (0.4, true, [1, 2], {a = 1}), else as a plain string."""
    try:
        return tomllib.loads(f"value = {text}")["value"]
    except tomllib.TOMLDecodeError:
        return text


def parse_overrides(args: list[str]) -> dict:
    """['--optim.lr=0.4', '--data.backend', 'dali'] -> {'optim': {'lr': 0.4}, 'data': {'backend': 'dali'}}."""
    layer: dict = {}
    args = list(args)
    while args:
        arg = args.pop(0)
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise ConfigError(f"Cannot read argument '{arg}': overrides look like --section.key=value.")
        name, sep, text = arg[2:].partition("=")
        if not sep:
            if not args:
                raise ConfigError(f"Override '{arg}' has no value: write --{name}=VALUE.")
            text = args.pop(0)
        section, _, key = name.partition(".")
        if "." in key:   # --data.options.order=random: a key inside a table-valued field
            key, _, inner = key.partition(".")
            layer.setdefault(section, {}).setdefault(key, {})[inner] = parse_value(text)
        else:
            layer.setdefault(section, {})[key] = parse_value(text)
    return layer


def find_config(path: str | Path) -> Path:
    """The path as given, else configs/<name> (with .toml added when missing)."""
    path = Path(path)
    candidates = [path, CONFIG_DIR / path.name, Path("configs") / path.name]
    if path.suffix != ".toml":
        candidates += [c.with_name(c.name + ".toml") for c in candidates]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    known = sorted(p.name for p in CONFIG_DIR.glob("*.toml"))
    raise ConfigError(f"Config file '{path}' not found (also looked in {CONFIG_DIR}). "
                      f"Available: {', '.join(known) or 'none'}.")


def _read_toml(path: Path) -> dict:
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path} is not valid TOML: {err}") from err


def load_config(path: str | Path | None = None, overrides: list[str] | dict = (),
                tune: str | Path | None = None) -> Config:
    """Defaults <- config file <- tune file <- overrides, validated into a frozen `Config`."""
    merged: dict = {section: {} for section in _SECTION_CLASSES}
    stem = "default"
    if path is not None:
        found = find_config(path)
        stem = found.stem
        _merge(merged, _read_toml(found), str(found))
    if tune is not None:
        tune = Path(tune)
        if not tune.is_file():
            raise ConfigError(f"Tuning file '{tune}' not found. Create one with `python -m benchmarks autotune`.")
        _merge(merged, _read_toml(tune), str(tune))
    layer = overrides if isinstance(overrides, dict) else parse_overrides(list(overrides))
    options = layer.get("data", {}).get("options")
    if isinstance(options, dict):   # option overrides add to the file's table rather than replace it
        layer["data"]["options"] = {**merged["data"].get("options", {}), **options}
    _merge(merged, layer, "the command line")
    if not merged["run"].get("name"):
        merged["run"]["name"] = stem
    config = Config(**{section: _SECTION_CLASSES[section](**values) for section, values in merged.items()})
    validate(config)
    return small_image_defaults(config, merged)


def small_image_defaults(config: Config, given: dict) -> Config:
    """`config` with SMALL_IMAGE_DEFAULTS in place of the defaults for keys absent from `given` (section ->
    the keys the files and command line set) when no training epoch exceeds SMALL_IMAGE_MAX_RESOLUTION."""
    resolution = config.max_train_resolution()
    if resolution > SMALL_IMAGE_MAX_RESOLUTION:
        return config
    changes: dict = {}
    chosen = []
    for (section, key), value in SMALL_IMAGE_DEFAULTS.items():
        if key in given.get(section, {}):
            continue
        changes.setdefault(section, {})[key] = value
        default = getattr(_SECTION_CLASSES[section](), key)
        why = f"training resolution up to {resolution} px <= {SMALL_IMAGE_MAX_RESOLUTION}; default for larger images {default}"
        chosen.append((f"{section}.{key}", value, why))
    if "min_scale" in changes.get("augment", {}):   # never above an explicit max_scale
        changes["augment"]["min_scale"] = min(changes["augment"]["min_scale"], config.augment.max_scale)
    sections = {section: dataclasses.replace(getattr(config, section), **values) for section, values in changes.items()}
    return dataclasses.replace(config, **sections, size_defaults=tuple(chosen))


def validate(config: Config) -> None:
    """Range checks the type system cannot express."""
    checks = [
        (config.data.batch_size >= 1, "data.batch_size must be at least 1"),
        (config.data.workers == "auto" or config.data.workers >= 1, "data.workers must be at least 1 or \"auto\""),
        (config.schedule.epochs >= 1, "schedule.epochs must be at least 1"),
        (0 < config.schedule.pct_start < 1, "schedule.pct_start must be between 0 and 1"),
        (0 < config.augment.min_scale <= config.augment.max_scale <= 1,
         "augment needs 0 < min_scale <= max_scale <= 1"),
        (0 < config.augment.ratio[0] <= config.augment.ratio[1], "augment.ratio needs 0 < low <= high"),
        (0 <= config.optim.label_smoothing < 1, "optim.label_smoothing must be in [0, 1)"),
        (config.optim.lr == "auto" or config.optim.lr > 0, "optim.lr must be positive or \"auto\""),
        (config.eval.every >= 1, "eval.every must be at least 1"),
        (config.model.width >= 8 and config.model.width % 8 == 0, "model.width must be a multiple of 8"),
        (0 <= config.model.ema_decay < 1, "model.ema_decay must be in [0, 1); 0 turns the average off"),
        (config.train.log_every >= 1, "train.log_every must be at least 1"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    try:
        config.schedule_for_resolution()
    except ValueError as err:
        raise ConfigError(f"[resolution]: {err}") from err


def to_toml(config: Config) -> str:
    """The resolved config as TOML; `load_config` of the result gives back an equal Config."""
    return tomli_w.dumps(config.to_dict())


def key_help() -> list[tuple[str, str, str, str]]:
    """(key, type, default, meaning) of every config key, from the dataclasses and their comments."""
    rows = []
    for section, cls in _SECTION_CLASSES.items():
        comments = dict(re.findall(r"^\s+(\w+):[^#\n]*#\s*(.+)$", inspect.getsource(cls), re.MULTILINE))
        defaults = dataclasses.asdict(cls())
        for key, kind in _field_types(section).items():
            default = json.dumps(_plain(defaults[key])).replace(": ", " = ")   # TOML for these values
            rows.append((f"{section}.{key}", _describe(kind), default, comments.get(key, "")))
    return rows


def help_text() -> str:
    """Every key as `--section.key=VALUE`, for --help."""
    lines = ["config keys (set any as --section.key=VALUE; defaults before config files):"]
    for key, kind, default, meaning in key_help():
        lines.append(f"  {key:<28} {kind:<36} default {default}")
        if meaning:
            lines.append(f"  {'':<28} {meaning}")
    return "\n".join(lines)


def argument_parser(prog: str, description: str, example: str):
    """An argparse parser whose --help ends with every config key (all entry points take overrides)."""
    return argparse.ArgumentParser(prog=prog, description=f"{description} Any config key can be set as "
                                   f"--section.key=value.", formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog=f"{help_text()}\n\nexample: {example}")


def from_dict(payload: dict) -> Config:
    """Rebuild a Config from `Config.to_dict()` output (as stored in checkpoints)."""
    return load_config(None, overrides={s: dict(v) for s, v in payload.items()})
