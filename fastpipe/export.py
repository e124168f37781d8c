"""`python -m fastpipe.export RUN --format onnx|torchscript`: a trained run's model as a file that runs
without fastpipe, checked before it is written.

The model takes the normalised float NCHW batch the loaders give (ImageNet mean/std, resolution.val, any
batch size) and returns logits. Each export is run on a batch and compared with the PyTorch model's
outputs (ONNX through onnxruntime); a difference above the tolerance is an error and nothing is written.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

from fastpipe.config import ConfigError
from fastpipe.data.base import VAL_CROP_RATIO
from fastpipe.data.beton import FILE_MODE, fsync_dir, fsync_file, write_json_atomic
from fastpipe.data.device import IMAGENET_MEAN, IMAGENET_STD
from fastpipe.train.checkpoint import CheckpointError, evaluation_weights_kind
from fastpipe.trained import load_trained

FORMATS = {"onnx": ".onnx", "torchscript": ".pt"}
# Max logit difference, float32 on the CPU, relative to the logits' scale (at least 1): a trained ResNet-50's
# logits reach tens, where float32 rounding alone differs by more than a fixed 1e-4.
TOLERANCE = 1e-4
CHECK_BATCH = 4


def export_torchscript(model: torch.nn.Module, example: torch.Tensor, path: Path):
    traced = torch.jit.trace(model, example, check_trace=False)
    traced.save(str(path))
    reloaded = torch.jit.load(str(path))
    return lambda batch: reloaded(batch)


def export_onnx(model: torch.nn.Module, example: torch.Tensor, path: Path):
    try:
        import onnxruntime  # optional: the check needs it, as the export needs onnx and onnxscript
    except ImportError as err:
        raise RuntimeError("ONNX export needs onnx, onnxscript and onnxruntime: `pip install 'fastpipe[export]'`") from err
    batch = torch.export.Dim("batch", min=1)
    torch.onnx.export(model, (example,), str(path), input_names=["images"], output_names=["logits"],
                      dynamic_shapes={"x": {0: batch}}, dynamo=True, external_data=False, verbose=False)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda images: torch.from_numpy(session.run(["logits"], {"images": images.numpy()})[0])


def export(run_dir: Path, fmt: str, out: Path | None = None, checkpoint: str = "best", overrides: list[str] = ()) -> dict:
    """Write the export and `<out>.json` (classes, input size, normalisation, the check); returns that record."""
    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    trained = load_trained(run_dir, checkpoint, [*overrides, "--train.device=cpu", "--model.compile=false"])
    model = trained.model.float().to(memory_format=torch.contiguous_format)
    resolution = trained.config.resolution.val
    out = Path(out or Path(run_dir) / f"model{FORMATS[fmt]}")
    generator = torch.Generator().manual_seed(0)
    batch = torch.randn(CHECK_BATCH, 3, resolution, resolution, generator=generator)
    with torch.inference_mode():
        expected = model(batch)
    out.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(handle)
    temporary = Path(temporary)
    try:
        with torch.no_grad():
            run = (export_onnx if fmt == "onnx" else export_torchscript)(model, batch[:1], temporary)
            got = run(batch)
        difference = float((got - expected).abs().max())
        allowed = TOLERANCE * max(1.0, float(expected.abs().max()))
        if not difference <= allowed:
            raise RuntimeError(f"the {fmt} export's logits differ from the PyTorch model's by {difference:.3g} on a "
                               f"batch of {CHECK_BATCH} (tolerance {allowed:.3g}); nothing was written.")
        os.chmod(temporary, FILE_MODE)   # mkstemp made it 0600
        fsync_file(temporary)
        os.replace(temporary, out)
        fsync_dir(out.parent)
    finally:
        temporary.unlink(missing_ok=True)
    record = {"file": str(out), "format": fmt, "checkpoint": str(trained.checkpoint), "classes": trained.classes,
              "input": {"shape": ["batch", 3, resolution, resolution], "dtype": "float32",
                        "normalisation": f"(pixels / 255 - mean) / std, ImageNet mean {IMAGENET_MEAN}, std "
                                         f"{IMAGENET_STD}; val crop: centre {VAL_CROP_RATIO} of the shorter side"},
              "check": {"batch": CHECK_BATCH, "max_abs_difference": difference, "tolerance": allowed,
                        "relative_tolerance": TOLERANCE},
              # what the run's own evaluation did with these weights, to reproduce its accuracy
              "evaluation": {"weights": evaluation_weights_kind(trained.state), "flip_tta": trained.config.eval.flip_tta}}
    write_json_atomic(out.with_name(out.name + ".json"), record)
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastpipe.export", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a run directory written by `python -m fastpipe.train`")
    parser.add_argument("--format", required=True, choices=sorted(FORMATS))
    parser.add_argument("--out", type=Path, help="output file (default: RUN_DIR/model.onnx or model.pt)")
    parser.add_argument("--checkpoint", default="best", help="best, last, or a .pt file (default: best)")
    args, overrides = parser.parse_known_args(argv)
    try:
        record = export(args.run_dir, args.format, args.out, args.checkpoint, overrides)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    except (CheckpointError, RuntimeError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(json.dumps({k: record[k] for k in ("file", "format", "check")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
