"""`python -m fastpipe.train --config r50.toml [--section.key=value ...]`: train a ResNet on converted data.
Run it under `torchrun --nproc_per_node N -m fastpipe.train ...` for data-parallel training.
"""
from __future__ import annotations

import sys
from datetime import datetime
from pathlib import Path

import torch

from fastpipe.config import Config, ConfigError, argument_parser, load_config, to_toml
from fastpipe.data.beton import BetonError
from fastpipe.train import distributed as dist_utils
from fastpipe.train.assemble import auto_workers
from fastpipe.train.checkpoint import CheckpointError
from fastpipe.train.runtime import TrainingError
from fastpipe.train.trainer import Trainer


def default_run_dir(config: Config) -> Path:
    return Path(config.run.dir or f"runs/{config.run.name}-{datetime.now():%Y%m%d-%H%M%S}")


def parse_args(argv: list[str] | None):
    parser = argument_parser("python -m fastpipe.train", "Train a ResNet on converted data.",
                             "python -m fastpipe.train --config r18.toml --optim.lr=0.4 --data.backend=dali")
    parser.add_argument("--config", help="TOML file, or a name in configs/ (r50.toml, r18.toml, cpu-smoke.toml)")
    parser.add_argument("--tune", help="TOML with the same sections merged over the config (from autotune)")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue RUN_DIR/last.pt at its next epoch")
    parser.add_argument("--init-from", metavar="CKPT", help="start from these weights (fine-tuning)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return parser.parse_known_args(argv)


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(argv)
    try:
        config_path = args.config
        if args.resume and not config_path:
            config_path = Path(args.resume) / "config.toml"
            if not config_path.is_file():
                raise ConfigError(f"{args.resume} has no config.toml: is it a run directory?")
        config = load_config(config_path, overrides, tune=args.tune)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    if args.print_config:
        if config.data.workers == "auto":
            workers, why = auto_workers()
            print(f"# data.workers = \"auto\": {workers} per rank ({why})")
        print(to_toml(config), end="")
        return 0
    run_dir = Path(args.resume) if args.resume else default_run_dir(config)
    try:
        return Trainer(config, run_dir, resume=bool(args.resume), init_from=args.init_from).fit()
    except (BetonError, CheckpointError, TrainingError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except torch.OutOfMemoryError:
        print(f"error: CUDA out of memory at data.batch_size={config.data.batch_size}, resolution up to "
              f"{max(config.resolution.start, config.resolution.end, config.resolution.val)} px. Use a smaller "
              f"batch (--data.batch_size={max(1, config.data.batch_size // 2)}) or find the largest that fits "
              f"with `python -m benchmarks autotune`.", file=sys.stderr)
        return 1
    finally:
        dist_utils.cleanup()
