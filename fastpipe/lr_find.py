"""`python -m fastpipe.lr_find --config r50.toml [--section.key=value ...]`: the LR range test on the
model, optimizer, AMP setup and first-epoch loader a training run with that config would use.
"""
from __future__ import annotations

import json
import sys
from datetime import datetime
from pathlib import Path

from fastpipe.config import ConfigError, argument_parser, load_config
from fastpipe.data.beton import BetonError
from fastpipe.train.assemble import build_training, loader_for
from fastpipe.train.checkpoint import CheckpointError
from fastpipe.train.lr_finder import LRFinderResult, sweep
from fastpipe.train.optim import plan_epochs
from fastpipe.train.runtime import build_runtime


def build_and_sweep(config, out_dir: Path) -> tuple[LRFinderResult, float]:
    """Build as `fastpipe.train` does (one process) and sweep. Returns the result and the first epoch's
    LR scale, which converts the suggestion (at the first epoch's batch size) into `optim.lr`."""
    runtime = build_runtime(config)
    loader = loader_for(config, "train", runtime)
    first_epoch = plan_epochs(config, loader.num_samples)[0]
    training = build_training(config, len(loader.classes), runtime, log=lambda message: None)
    return sweep(config, runtime, training, loader, first_epoch, out_dir), first_epoch.lr_scale


def parse_args(argv: list[str] | None):
    parser = argument_parser("python -m fastpipe.lr_find", "LR range test for a training config "
                             "([lr_finder] start_lr, end_lr, steps control the sweep).",
                             "python -m fastpipe.lr_find --config r18.toml --lr_finder.steps=200")
    parser.add_argument("--config", required=True, help="TOML file, or a name in configs/")
    parser.add_argument("--tune", help="TOML with the same sections merged over the config (from autotune)")
    parser.add_argument("--out", help="output folder (default: runs/lr_find-<config name>-<time>)")
    return parser.parse_known_args(argv)


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(argv)
    try:
        config = load_config(args.config, overrides, tune=args.tune)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    out_dir = Path(args.out or f"runs/lr_find-{config.run.name}-{datetime.now():%Y%m%d-%H%M%S}")
    try:
        result, lr_scale = build_and_sweep(config, out_dir)
    except (BetonError, CheckpointError, ConfigError, ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1

    suggestions = result.suggestions()
    payload = {"reason": result.reason, "stopped_early": result.stopped_early, "steps_run": len(result.lrs),
               **suggestions, "rule": result.rule, "first_epoch_lr_scale": lr_scale,
               "optim_lr": None if result.suggestion is None else result.suggestion / lr_scale}
    (out_dir / "lr_finder.json").write_text(json.dumps(payload, indent=2) + "\n")
    print(f"LR range test: {result.reason}")
    for name, label in (("edge", "edge of the valley"), ("steepest", "steepest descent"), ("min_loss_div10", "min loss / 10"), ("valley", "valley"),
                        ("min_loss", "min loss"), ("min_loss_div2", "min loss / 2")):
        value = suggestions[name]
        label += " (suggestion)" if name == result.rule else ""
        print(f"  {label:<30} {'-' if value is None else f'{value:.3g}'}")
    if result.suggestion is None:
        print("No suggestion: the sweep was too short to read. Lower [lr_finder] start_lr or raise steps.")
    else:
        kept = [item for item in overrides if not item.startswith(("--optim.lr=", "--lr_finder."))]
        tune = [f"--tune {args.tune}"] if args.tune else []
        command = " ".join(["python -m fastpipe.train --config", args.config, *tune, *kept,
                            f"--optim.lr={payload['optim_lr']:.3g}"])
        print(f"Train with it: {command}"
              + (f"  (suggestion / first-epoch LR scale {lr_scale:g})" if lr_scale != 1 else ""))
    print(f"Outputs: {result.png_path}  {result.csv_path}  {out_dir / 'lr_finder.json'}")
    return 0 if result.suggestion is not None else 1


if __name__ == "__main__":
    sys.exit(main())
