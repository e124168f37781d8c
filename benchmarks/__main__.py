"""Command line: `python -m benchmarks COMMAND ...`, COMMAND one of SUBCOMMANDS below (`--help` lists them).

Each subcommand lives in its own module with `add_arguments(parser)` and `run(args) -> exit code`. Only the
chosen subcommand's module is imported (they import torch, ~2 s), so `python -m benchmarks --help` is instant.
"""
from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    # throughput of the data path and the step
    "loaders": ("benchmarks.loaders", "img/s of each loader backend x resolution x workers"),
    "paired": ("benchmarks.paired", "one backend on several data folders, epochs alternating: paired img/s ratios"),
    "autotune": ("benchmarks.autotune", "tune loader workers and batch size for a config in a time budget"),
    "compare": ("benchmarks.compare", "compare two results JSON files row by row"),
    "train-step": ("benchmarks.train_step", "model img/s on synthetic batches vs with each real loader"),
    "ddp": ("benchmarks.ddp", "step time under torchrun for each DDP broadcast_buffers/gradient_as_bucket_view"),
    "gpu": ("benchmarks.gpu", "the GPU run in one command: preflight, gpu tests, loaders, training, graphs"),
    "restart-intervals": ("benchmarks.restart_intervals", "crop-decoder time and bytes for each restart-interval length"),
    "scale": ("benchmarks.scale", "manifest size, first-batch time and loader RSS against the data set's size"),
    "convert": ("benchmarks.converter", "converter throughput, storage-mode table and peak memory"),
    # quality experiments on the small-image sets
    "lr-sweep": ("benchmarks.quality.lr_sweep", "lr=auto against a sweep of fixed peak LRs on the small-image sets"),
    "quality": ("benchmarks.quality.recipes", "val top-1 and wall time of the recipes on the small-image sets"),
}
DESCRIPTION = "Measure fastpipe's data path: loader throughput, tuning, reports, training-step stalls."


def overview() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=text)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in SUBCOMMANDS:
        overview().parse_args(argv)   # prints help, or the error naming the subcommands
        return 2
    name, (module_name, text) = argv[0], SUBCOMMANDS[argv[0]]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks {name}", description=text)
    module.add_arguments(parser)
    args, extra = parser.parse_known_args(argv[1:])
    # Config-driven subcommands take the trainer's `--section.key=value` overrides after their options.
    if extra and not getattr(module, "ACCEPTS_CONFIG_OVERRIDES", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = extra
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
