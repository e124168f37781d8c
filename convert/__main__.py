"""Command line: `python -m convert {imagenet,webdataset,parquet,imagenet-mini,folder,synthetic,adopt,verify,info}`.

Run `python -m convert COMMAND --help` for the options of each command.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from rich.console import Console

from convert.adopt import adopt
from convert.pipeline import convert_source
from convert.sources import ConvertError, find_samples
from convert.synthetic import make_synthetic
from convert.verify import info, verify
from convert.write import WRITE_MODES, WriteSettings
from fastpipe.data.beton import BetonError

DEFAULTS = WriteSettings()


def storage_options() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group("storage (train; val uses the same unless a --val-* option is given)")
    group.add_argument("--max-resolution", type=int, default=DEFAULTS.max_resolution,
                       help="longest side kept, in px; 0 keeps full size (default: %(default)s)")
    group.add_argument("--write-mode", choices=WRITE_MODES, default=DEFAULTS.write_mode,
                       help="how FFCV stores images: raw pixels (fastest to load, largest), jpg, 'smart' "
                            "(JPEG only images above --smart-threshold bytes) or 'proportion' (JPEG a "
                            "random --compress-probability share) (default: %(default)s)")
    group.add_argument("--jpeg-quality", type=int, default=DEFAULTS.jpeg_quality, help="(default: %(default)s)")
    group.add_argument("--compress-probability", type=float, default=DEFAULTS.compress_probability,
                       help="share of JPEG-stored images with --write-mode proportion (default: %(default)s)")
    group.add_argument("--smart-threshold", type=int, default=DEFAULTS.smart_threshold,
                       help="raw bytes above which --write-mode smart stores JPEG (default: %(default)s)")
    group.add_argument("--val-max-resolution", type=int, help="val override; val needs >= train res / 0.875 "
                                                                "for its centre crop (default: as train)")
    group.add_argument("--val-write-mode", choices=WRITE_MODES, help="val override (default: as train)")
    group.add_argument("--val-jpeg-quality", type=int, help="val override (default: as train)")
    group.add_argument("--val-compress-probability", type=float, help="val override (default: as train)")
    group.add_argument("--no-restart-intervals", dest="restart_intervals", action="store_false",
                       help="JPEG samples without restart intervals (the crop decoder then entropy-decodes every "
                            "row above the crop; default: with them)")
    group.add_argument("--min-side", type=int, default=DEFAULTS.min_side,
                       help="skip images whose shorter side is below this after capping; tiny crops "
                            "crash loaders (default: %(default)s)")
    run = parser.add_argument_group("run")
    run.add_argument("--workers", type=int, default=os.cpu_count(), help="processes (default: all cores)")
    run.add_argument("--seed", type=int, default=0, help="split and 'proportion' seed (default: %(default)s)")
    run.add_argument("--strict", action="store_true", help="stop at the first bad file instead of skipping it")
    run.add_argument("--force", action="store_true", help="rewrite even when the output is up to date")
    run.add_argument("--stall-timeout", type=float, default=300.0,
                     help="seconds without progress before the write is stopped (default: %(default)s)")
    return parser


def write_settings(args) -> tuple[WriteSettings, WriteSettings]:
    def pick(name):
        value = getattr(args, f"val_{name}")
        return getattr(args, name) if value is None else value
    common = {"smart_threshold": args.smart_threshold, "min_side": args.min_side, "seed": args.seed,
              "restart_intervals": args.restart_intervals}
    train = WriteSettings(write_mode=args.write_mode, max_resolution=args.max_resolution or None,
                          jpeg_quality=args.jpeg_quality, compress_probability=args.compress_probability, **common)
    val = WriteSettings(write_mode=pick("write_mode"), max_resolution=pick("max_resolution") or None,
                        jpeg_quality=pick("jpeg_quality"), compress_probability=pick("compress_probability"),
                        **common)
    return train, val


def run_conversion(args, root: Path, val_fraction: float = 0.1) -> None:
    convert(args, lambda: find_samples(root, val_fraction=val_fraction, seed=args.seed))


def convert(args, make_source) -> None:
    """Settings and workers checked first, then `make_source()` (a scan: seconds for big archives), then the write."""
    train, val = write_settings(args)
    if args.workers < 1:
        raise ConvertError(f"--workers must be >= 1, got {args.workers}.")
    convert_source(make_source(), args.out, train, val, workers=args.workers, strict=args.strict, force=args.force,
                   stall_timeout=args.stall_timeout)
    Console(stderr=True, soft_wrap=True).print(f"Betons and manifest in {Path(args.out).resolve()}; "
                               f"check them with `python -m convert verify {args.out}`.")


def cmd_imagenet_mini(args) -> None:
    root = Path(args.root)
    if not root.is_dir():
        raise ConvertError(f"ImageNet-mini is expected at {root.resolve()} (train/ and val/, one folder per "
                           f"synset). Put it there or pass --root. For a stand-in data set run "
                           f"`python -m convert synthetic --out data/synthetic` and then "
                           f"`python -m convert folder data/synthetic --out data/betons/synthetic`.")
    if not ((root / "train").is_dir() and (root / "val").is_dir()):
        raise ConvertError(f"{root.resolve()} must contain train/ and val/ (one folder per synset in each).")
    run_conversion(args, root)


def cmd_folder(args) -> None:
    run_conversion(args, Path(args.src), val_fraction=args.val_fraction)


def cmd_imagenet(args) -> None:
    from convert.imagenet import imagenet_source

    console = Console(stderr=True, soft_wrap=True)
    console.print(f"Scanning {args.train} and {args.val} (headers only; nothing is extracted) ...")
    convert(args, lambda: imagenet_source(Path(args.train), Path(args.val), val_labels=args.val_labels and
                                          Path(args.val_labels), devkit=args.devkit and Path(args.devkit),
                                          console=console))


def cmd_webdataset(args) -> None:
    from convert.webdataset import webdataset_source

    console = Console(stderr=True, soft_wrap=True)
    convert(args, lambda: webdataset_source(args.train, args.val, label_key=args.label_key, classes=args.classes,
                                            val_fraction=args.val_fraction, seed=args.seed, console=console))


def cmd_parquet(args) -> None:
    from convert.parquet import parquet_source

    convert(args, lambda: parquet_source(args.train, args.val, image_column=args.image_column,
                                         label_column=args.label_column, classes=args.classes,
                                         val_fraction=args.val_fraction, seed=args.seed))


def cmd_synthetic(args) -> None:
    try:
        result = make_synthetic(args.out, classes=args.classes, per_class=args.per_class, seed=args.seed,
                                val_per_class=args.val_per_class, min_side=args.min_size,
                                max_side=args.max_size, quality=args.jpeg_quality, workers=args.workers)
    except ValueError as err:
        raise ConvertError(str(err)) from err
    print(f"Wrote {result['images']} synthetic JPEGs ({result['bytes'] / 2**20:.1f} MB) to {args.out}. "
          f"Convert them with `python -m convert folder {args.out} --out DIR`.")


def cmd_adopt(args) -> None:
    adopt(args.dir, classes_file=args.classes, train=args.train, val=args.val, force=args.force)


def cmd_restart(args) -> None:
    from convert.restart import restart

    restart(args.dir, workers=args.workers)


def cmd_verify(args) -> None:
    verify(args.dir)


def cmd_info(args) -> None:
    info(args.dir)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m convert",
                                     description="ImageFolder -> FFCV .beton files (+ manifest.json).")
    commands = parser.add_subparsers(dest="command", required=True)
    storage = storage_options()

    mini = commands.add_parser("imagenet-mini", parents=[storage], help="convert ImageNet-mini (train/ and val/)")
    mini.add_argument("--root", default="data/imagenet-mini", help="(default: %(default)s)")
    mini.add_argument("--out", default="data/betons/imagenet-mini", help="(default: %(default)s)")
    mini.set_defaults(run=cmd_imagenet_mini)

    folder = commands.add_parser("folder", parents=[storage], help="convert any ImageFolder")
    folder.add_argument("src", help="SRC/train + SRC/val, or SRC/<class>/<image> (split with --val-fraction)")
    folder.add_argument("--out", required=True, help="output folder for the betons and manifest.json")
    folder.add_argument("--val-fraction", type=float, default=0.1,
                        help="share of each class put into val when SRC has no train/ and val/ (default: %(default)s)")
    folder.set_defaults(run=cmd_folder)

    imagenet = commands.add_parser("imagenet", parents=[storage],
                                    help="convert ILSVRC2012 straight from its train and val tars (no extraction)")
    imagenet.add_argument("--train", required=True, help="ILSVRC2012_img_train.tar (a tar of per-synset tars)")
    imagenet.add_argument("--val", required=True, help="ILSVRC2012_img_val.tar")
    labels = imagenet.add_mutually_exclusive_group(required=True)
    labels.add_argument("--val-labels", help="Kaggle's LOC_val_solution.csv")
    labels.add_argument("--devkit", help="ILSVRC2012_devkit_t12.tar.gz (class names get the synsets' words)")
    imagenet.add_argument("--out", required=True, help="output folder for the betons and manifest.json")
    imagenet.set_defaults(run=cmd_imagenet)

    shards = commands.add_parser("webdataset", parents=[storage], help="convert WebDataset tar shards")
    shards.add_argument("--train", required=True, help="shards: a brace pattern or glob, e.g. 'DIR/train-{000000..000127}.tar'")
    shards.add_argument("--val", help="val shards (default: --val-fraction of each class of --train)")
    shards.add_argument("--label-key", default="cls",
                        help="member holding the integer label, or json.FIELD for a field of the sample's .json "
                             "(default: %(default)s)")
    shards.add_argument("--classes", help="text file with one class name per line, in label order "
                                          "(default: the labels' numbers)")
    shards.add_argument("--val-fraction", type=float, default=0.1, help="without --val (default: %(default)s)")
    shards.add_argument("--out", required=True, help="output folder for the betons and manifest.json")
    shards.set_defaults(run=cmd_webdataset)

    parquet = commands.add_parser("parquet", parents=[storage],
                                  help="convert Hugging Face parquet shards (needs pyarrow: fastpipe[parquet])")
    parquet.add_argument("--train", required=True, help="parquet files: a brace pattern or glob, e.g. 'DIR/train-*.parquet'")
    parquet.add_argument("--val", help="val files (default: --val-fraction of each class of --train)")
    parquet.add_argument("--image-column", default="image", help="(default: %(default)s)")
    parquet.add_argument("--label-column", default="label", help="(default: %(default)s)")
    parquet.add_argument("--classes", help="one class name per line, in label order (default: the ClassLabel names "
                                           "in the files' metadata, else the labels' numbers)")
    parquet.add_argument("--val-fraction", type=float, default=0.1, help="without --val (default: %(default)s)")
    parquet.add_argument("--out", required=True, help="output folder for the betons and manifest.json")
    parquet.set_defaults(run=cmd_parquet)

    synthetic = commands.add_parser("synthetic", help="write a synthetic ImageNet-like ImageFolder of JPEGs")
    synthetic.add_argument("--out", default="data/synthetic", help="(default: %(default)s)")
    synthetic.add_argument("--classes", type=int, default=10)
    synthetic.add_argument("--per-class", type=int, default=100, help="(train) images per class")
    synthetic.add_argument("--val-per-class", type=int, default=0,
                           help="with > 0, write OUT/train and OUT/val instead of OUT/<class>")
    synthetic.add_argument("--seed", type=int, default=0)
    synthetic.add_argument("--min-size", type=int, default=200, help="shortest image side, px")
    synthetic.add_argument("--max-size", type=int, default=500, help="longest image side, px")
    synthetic.add_argument("--jpeg-quality", type=int, default=90)
    synthetic.add_argument("--workers", type=int, default=os.cpu_count())
    synthetic.set_defaults(run=cmd_synthetic)

    adopt = commands.add_parser("adopt", help="write the manifest for betons FFCV wrote itself (no re-conversion)")
    adopt.add_argument("dir", help="folder holding the betons; manifest.json is written there")
    adopt.add_argument("--classes", help="text file with one class name per line, in label order "
                                         "(default: the classes are numbered)")
    adopt.add_argument("--train", default="train.beton", help="train beton in DIR (default: %(default)s)")
    adopt.add_argument("--val", default="val.beton", help="val beton in DIR (default: %(default)s)")
    adopt.add_argument("--force", action="store_true", help="replace an existing manifest.json")
    adopt.set_defaults(run=cmd_adopt)

    rewrite = commands.add_parser("restart", help="give the JPEG samples of DIR's betons restart intervals, "
                                                   "losslessly (crop-only entropy decoding)")
    rewrite.add_argument("dir", help="folder with manifest.json and the betons (converted or adopted)")
    rewrite.add_argument("--workers", type=int, default=os.cpu_count(), help="processes (default: all cores)")
    rewrite.set_defaults(run=cmd_restart)

    for name, run, text in (("verify", cmd_verify, "decode every sample and check it against the manifest"),
                            ("info", cmd_info, "summary: classes, counts, size on disk, resolutions")):
        command = commands.add_parser(name, help=text)
        command.add_argument("dir", help="folder with manifest.json and the betons")
        command.set_defaults(run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (ConvertError, BetonError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
