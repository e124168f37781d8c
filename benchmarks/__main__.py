"""Command line: `python -m benchmarks {loaders,autotune,compare,train-step,gpu,lr-sweep,quality,convert} ...`.

Each subcommand lives in its own module with `add_arguments(parser)` and `run(args) -> exit code`;
modules are imported only when their subcommand runs, so `--help` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "loaders": ("benchmarks.loaders", "img/s of each loader backend x resolution x workers"),
    "autotune": ("benchmarks.autotune", "tune loader workers and batch size for a config in a time budget"),
    "compare": ("benchmarks.compare", "compare two results JSON files row by row"),
    "train-step": ("benchmarks.train_step", "model img/s on synthetic batches vs with each real loader"),
    "gpu": ("benchmarks.gpu", "the GPU run in one command: preflight, gpu tests, loaders, training, graphs"),
    "lr-sweep": ("benchmarks.lr_sweep", "lr=auto against a sweep of fixed peak LRs on the small-image sets"),
    "quality": ("benchmarks.quality", "val top-1 and wall time of the recipes on the small-image sets"),
}
CONVERTER = "benchmarks.converter"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Measure fastpipe's data path: loader throughput, tuning, reports, training-step stalls.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, text) in SUBCOMMANDS.items():
        command = sub.add_parser(name, help=text, description=text)
        command.set_defaults(module=module)
        # The options are declared by each module; importing them here is cheap (torch loads lazily).
        importlib.import_module(module).add_arguments(command)
    sub.add_parser("convert", help="converter throughput and storage-mode table (see `convert --help`)",
                   add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "convert":
        # The converter benchmark owns its own options; hand it everything after the subcommand.
        try:
            converter = importlib.import_module(CONVERTER)
        except ModuleNotFoundError as exc:
            if exc.name != CONVERTER:
                raise
            print("error: the converter benchmark (benchmarks/converter.py) is missing from this checkout.",
                  file=sys.stderr)
            return 2
        return int(converter.main(argv[1:]) or 0)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    module = importlib.import_module(args.module)
    # Config-driven subcommands take the trainer's `--section.key=value` overrides after their options.
    if extra and not getattr(module, "ACCEPTS_CONFIG_OVERRIDES", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = extra
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
