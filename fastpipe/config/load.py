"""Reading a config: defaults <- file <- tune file <- `--section.key=value` overrides, every key and type
checked against the tree's annotations (errors name the key and the closest valid ones), the small-image
defaults, range checks, and TOML out again.
"""
from __future__ import annotations

import dataclasses
import difflib
import sys
import types
import typing
from pathlib import Path
from typing import Literal, Union

try:
    import tomllib
except ModuleNotFoundError:   # Python 3.10: the same parser, as a package
    import tomli as tomllib

import tomli_w

from fastpipe.config.tree import (
    CONFIG_DIR,
    SMALL_IMAGE_DEFAULTS,
    SMALL_IMAGE_MAX_RESOLUTION,
    Config,
    ConfigError,
)

# Keys earlier releases wrote into run directories' config.toml: still read, with a note, so those runs
# resume and evaluate. data.options (an untyped table) became the typed record of its backend.
REMOVED_KEYS = {"train.max_nonfinite_steps": "a non-finite loss now always stops the run within one log interval"}


# The checks below walk the dataclasses' annotations: a kept library would bring a dependency the GPU box
# lacks (pydantic) or own the command line of every entry point (tyro), for about as many lines.
def _keys(cls) -> dict[str, tuple[dataclasses.Field, object]]:
    """{key: (field, annotation)} of a section or record (Config's bookkeeping fields left out)."""
    hints = typing.get_type_hints(cls)
    return {f.name: (f, hints[f.name]) for f in dataclasses.fields(cls) if f.metadata.get("section", True)}


def walk(cls=Config, prefix: str = ""):
    """(key, field, annotation) of every settable key, records opened up: data.ffcv.order, not data.ffcv."""
    for key, (f, kind) in _keys(cls).items():
        if dataclasses.is_dataclass(kind):
            yield from walk(kind, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", f, kind


def valid_keys() -> list[str]:
    return [key for key, _, _ in walk()]


def _unknown(name: str, candidates: list[str]) -> ConfigError:
    close = difflib.get_close_matches(name, candidates, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return ConfigError(f"Unknown config key '{name}'.{hint} (run with --print-config to see all keys)")


def _describe(kind) -> str:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if dataclasses.is_dataclass(kind):
        return "a table {" + ", ".join(_keys(kind)) + "}"
    if origin is Literal:
        return " or ".join(repr(a) for a in args)
    if origin is tuple:
        if args[1:] == (Ellipsis,):
            return "a list of " + _describe(args[0]).replace("a table", "tables", 1)
        return f"a list of {len(args)} numbers"
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in args if a is not type(None))   # TOML has no null
    return getattr(kind, "__name__", str(kind))


def _check(name: str, value, kind, base=None, origin: str = ""):
    """`value` as the annotation `kind` wants it, else a ConfigError naming the key: ints pass for floats, a
    table for a section or record (merged over `base`, its value so far), a list for a tuple."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if dataclasses.is_dataclass(kind) and isinstance(value, dict):
        return _record(name, value, kind, base, origin)
    if origin in (Union, types.UnionType):
        for option in args:
            try:
                return _check(name, value, option, base, origin)
            except ConfigError:
                pass
    elif origin is Literal:
        if value in args and type(value) is type(args[0]):
            return value
    elif origin is tuple and isinstance(value, (list, tuple)):
        kinds = [args[0]] * len(value) if args[1:] == (Ellipsis,) else args
        if len(value) == len(kinds):
            return tuple(_check(f"{name}[{i}]", item, each) for i, (item, each) in enumerate(zip(value, kinds)))
    elif kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    elif isinstance(kind, type) and isinstance(value, kind) and (kind is bool or not isinstance(value, bool)):
        return value
    raise ConfigError(f"Config key '{name}' expects {_describe(kind)}, got {type(value).__name__} {value!r}.")


def _record(name: str, table: dict, cls, base=None, origin: str = ""):
    """A TOML table as the dataclass `cls`, over `base` (the value so far) or from scratch, when every key
    without a default is given."""
    keys, values = _keys(cls), {}
    for key, value in table.items():
        path = f"{name}.{key}" if name else key
        if path in REMOVED_KEYS:
            print(f"note: {path} in {origin} is no longer used: {REMOVED_KEYS[path]}", file=sys.stderr)
        elif key not in keys:   # the closest sections, or the closest keys anywhere in the tree
            local = [f"{name}.{k}" if name else k for k in keys]
            raise _unknown(path, local if not name else list(dict.fromkeys(valid_keys() + local)))
        else:
            values[key] = _check(path, value, keys[key][1], getattr(base, key, None), origin)
    if base is not None:
        return dataclasses.replace(base, **values)
    missing = [key for key, (f, _) in keys.items() if key not in values and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"'{name}' needs {' and '.join(repr(key) for key in missing)}.")
    return cls(**values)


def _upgrade(layer: dict, config: Config, origin: str) -> dict:
    """An earlier release's [data] options table as the record of the backend it was for."""
    data = layer.get("data")
    if not isinstance(data, dict) or "options" not in data:
        return layer
    data = dict(data)
    options = data.pop("options")
    if not isinstance(options, dict):
        raise ConfigError(f"data.options in {origin} must be a table; backend options are now "
                          f"[data.ffcv], [data.dali] and [data.torch] keys")
    if options:
        backend = data.get("backend", config.data.backend)
        data[backend] = {**options, **data.get(backend, {})}
        print(f"note: data.options in {origin} is now [data.{backend}]", file=sys.stderr)
    return {**layer, "data": data}


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
    """Defaults <- config file <- tune file <- overrides, each layer checked and merged into a frozen `Config`
    (a table updates the keys it names: `--data.ffcv.order=...` keeps the file's other FFCV options)."""
    layers, stem = [], "default"
    if path is not None:
        found = find_config(path)
        stem = found.stem
        layers.append((_read_toml(found), str(found)))
    if tune is not None:
        tune = Path(tune)
        if not tune.is_file():
            raise ConfigError(f"Tuning file '{tune}' not found. Create one with `python -m benchmarks autotune`.")
        layers.append((_read_toml(tune), str(tune)))
    layers.append((overrides if isinstance(overrides, dict) else parse_overrides(list(overrides)), "the command line"))
    config, given = Config(), {}
    for layer, origin in layers:
        layer = _upgrade(layer, config, origin)
        config = _check("", layer, Config, config, origin)
        for section, values in layer.items():   # which keys were set: small-image defaults leave them alone
            given.setdefault(section, set()).update(values if isinstance(values, dict) else ())
    if not config.run.name:
        config = dataclasses.replace(config, run=dataclasses.replace(config.run, name=stem))
    validate(config)
    return small_image_defaults(config, given)


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
        default = getattr(getattr(Config(), section), key)
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


def from_dict(payload: dict) -> Config:
    """Rebuild a Config from `Config.to_dict()` output (as stored in checkpoints)."""
    return load_config(None, overrides={s: dict(v) for s, v in payload.items()})
