"""`python -m fastpipe.predict RUN IMAGES...`: a trained run's top-k classes for new images.

Files, folders (searched recursively) and globs; any format the converter reads, EXIF orientation applied;
the run's val preprocessing (centre crop, resolution.val) and flip TTA when the run's eval.flip_tta says so;
batched on the run's device. A file that cannot be read gets a row with its error, never a silent gap.
"""
from __future__ import annotations

import argparse
import csv
import glob
import sys
from pathlib import Path

import torch

from fastpipe.config import ConfigError
from fastpipe.data.beton import BetonError, atomic_write
from fastpipe.data.images import IMAGE_EXTENSIONS, BadImage, decode_rgb
from fastpipe.train.checkpoint import CheckpointError
from fastpipe.train.runtime import TrainingError
from fastpipe.trained import load_trained, to_batch, val_crop


def find_images(arguments: list[str]) -> list[Path]:
    """Each argument a file, a folder (its images, recursively, sorted) or a glob; every file once, however
    its arguments spell it (the first spelling kept)."""
    found: dict[Path, Path] = {}   # resolved path -> as first given, in order
    for argument in arguments:
        path = Path(argument).expanduser()
        if path.is_dir():
            matches = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        elif glob.has_magic(argument):
            matches = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        elif path.is_file():
            matches = [path]
        else:
            raise FileNotFoundError(f"{argument}: no such file or folder.")
        if not matches:
            raise FileNotFoundError(f"{argument}: no images found (extensions: {', '.join(sorted(IMAGE_EXTENSIONS))}).")
        for match in matches:
            found.setdefault(match.resolve(), match)
    return list(found.values())


def predict(run_dir: Path, images: list[str], *, checkpoint: str = "best", top_k: int = 5, batch_size: int = 64,
            overrides: list[str] = ()) -> list[dict]:
    """One row per image: path, then class and probability for ranks 1..k (or `error`)."""
    trained = load_trained(run_dir, checkpoint, overrides)
    config, model, classes, runtime = trained.config, trained.model, trained.classes, trained.runtime
    top_k = max(1, min(top_k, len(classes)))
    resolution, flip = config.resolution.val, config.eval.flip_tta
    rows, pending = [], []

    def run_batch() -> None:
        batch = to_batch([crop for _, crop in pending], runtime.device, runtime.precision.dtype)
        with torch.inference_mode(), runtime.precision.autocast():
            logits = model(batch).float()
            if flip:
                logits = (logits + model(batch.flip(-1)).float()) / 2
        probabilities, indices = logits.softmax(dim=1).topk(top_k, dim=1)
        for (path, _), probs, ranks in zip(pending, probabilities.tolist(), indices.tolist()):
            row = {"path": str(path)}
            for rank, (probability, index) in enumerate(zip(probs, ranks), start=1):
                row[f"class_{rank}"], row[f"prob_{rank}"] = classes[index], round(probability, 6)
            rows.append(row)
        pending.clear()

    paths = find_images(images)
    for path in paths:
        try:
            pending.append((path, val_crop(decode_rgb(path), resolution)))
        except BadImage as err:
            rows.append({"path": str(path), "error": str(err)})
        if len(pending) == batch_size:
            run_batch()
    if pending:
        run_batch()
    order = {str(path): index for index, path in enumerate(paths)}
    return sorted(rows, key=lambda row: order[row["path"]])   # unreadable files were listed as they came


def write_csv(rows: list[dict], path: Path) -> None:
    top_k = max((int(key.split("_")[1]) for row in rows for key in row if key.startswith("class_")), default=1)
    columns = ["path"] + [f"{kind}_{rank}" for rank in range(1, top_k + 1) for kind in ("class", "prob")] + ["error"]
    with atomic_write(path) as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastpipe.predict", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a run directory written by `python -m fastpipe.train`")
    parser.add_argument("images", nargs="+", help="image files, folders or globs")
    parser.add_argument("--checkpoint", default="best", help="best, last, or a .pt file (default: best)")
    parser.add_argument("--top-k", type=positive, default=5,
                        help="classes per image, at most the run's class count (default: %(default)s)")
    parser.add_argument("--batch-size", type=positive, default=64, help="(default: %(default)s)")
    parser.add_argument("--out", type=Path, help="write the predictions to this CSV file")
    args, overrides = parser.parse_known_args(argv)
    try:
        rows = predict(args.run_dir, args.images, checkpoint=args.checkpoint, top_k=args.top_k,
                       batch_size=args.batch_size, overrides=overrides)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    except (FileNotFoundError, CheckpointError, BetonError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except TrainingError as err:   # e.g. the run trained on a GPU that this machine lacks
        print(f"error: {err} (the run's settings can be overridden: --train.device=cpu)", file=sys.stderr)
        return 1
    if args.out:
        write_csv(rows, args.out)
        print(f"{len(rows)} prediction(s) in {args.out}")
    for row in rows if not args.out else rows[:10]:
        shown = row.get("error") or ", ".join(f"{row[f'class_{k}']} {row[f'prob_{k}']:.1%}"
                                               for k in range(1, 4) if f"class_{k}" in row)
        print(f"{row['path']}: {shown}")
    failed = sum("error" in row for row in rows)
    if failed:
        print(f"{failed} image(s) could not be read (see the error column)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
