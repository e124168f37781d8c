"""The gpu command's first phase: is everything there and does it run? Versions; each loader backend
imported and one small batch pushed through it on the device at hand; whether the crop decoder loaded; on
a GPU, one JPEG through DALI's mixed decoder with the hardware decoder asked for and without it. A piece
that does not run fails the phase with what failed and the fix.
"""
from __future__ import annotations

import io
import subprocess
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks.gpu import CUDA_FIX, PhaseFailed
from convert.pipeline import convert_source
from convert.sources import find_samples
from convert.synthetic import make_synthetic
from convert.write import WriteSettings
from fastpipe.data import build_loader, crop_decode
from fastpipe.versions import package_versions

PACKAGES = {"torch": "torch", "torchvision": "torchvision", "ffcv": "ffcv", "dali": "nvidia-dali-cuda130",
            "numba": "numba", "numpy": "numpy"}
INSTALL = "install fastpipe from the wheelhouse: README, 'GPU box, offline' (make wheelhouse here, then its pip line)"
FIXES = {
    "ffcv": f"ffcv did not load or run; {INSTALL}",
    "dali": f"DALI did not load or run; {INSTALL}",
    "torch": "the torchvision baseline did not run: check torch and torchvision (torchvision.io decodes JPEGs)",
    "crop decoder": f"FFCV would fall back to its stock decoder; {INSTALL}",
    "cuda": CUDA_FIX,
    "nvjpeg": "DALI's mixed decoder did not run: the wheelhouse carries nvidia-nvjpeg (libnvjpeg.so.13) and "
              "nvimgcodec for it (`pip show nvidia-nvjpeg`), and the driver must support CUDA 13",
}


def preflight(ctx: dict, deadline) -> dict:
    """Versions, then each backend imported and one small batch pushed through it on the device at hand; on
    a GPU, one JPEG through DALI's mixed decoder with the hardware decoder asked for and without it. Any
    piece that does not run fails the phase, with what failed and the fix."""
    versions = package_versions(PACKAGES)
    result = {"versions": versions, "cuda_available": torch.cuda.is_available(), "torch_cuda": torch.version.cuda,
              "crop_decoder": "installed" if crop_decode.available() else crop_decode.MISSING, "backends": {},
              "missing": {}}
    if not crop_decode.available():
        result["missing"]["crop decoder"] = f"{crop_decode.MISSING}; {FIXES['crop decoder']}"
    data = tiny_data(ctx["out"] / "preflight")
    for backend in ("ffcv", "dali", "torch"):
        result["backends"][backend] = one_batch(backend, data, ctx["device"])
        if result["backends"][backend] != "ok":
            result["missing"][backend] = f"{result['backends'][backend]}; {FIXES[backend]}"
    if ctx["device"] == "cuda":
        result["gpu"] = torch.cuda.get_device_name()
        result["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
        result["driver"] = nvidia_smi("driver_version")
        result["nvjpeg"] = {name: check_mixed_decoding(load) for name, load in (("hardware", 0.9), ("cuda", 0.0))}
        for name, outcome in result["nvjpeg"].items():
            if outcome != "ok":
                result["missing"][f"nvjpeg ({name})"] = f"{FIXES['nvjpeg']}: {outcome}"
    elif ctx["asked"] == "cuda":
        result["missing"]["cuda"] = FIXES["cuda"]
    for name, fix in result["missing"].items():
        ctx["console"].print(f"[red]preflight: {name}: {fix}[/red]")
    if result["missing"]:
        raise PhaseFailed("not ready: " + "; ".join(result["missing"]), result)
    return result


def tiny_data(root: Path) -> Path:
    """Eight small JPEGs in two classes, converted raw: enough for one batch of each backend."""
    if not (root / "betons").exists():
        make_synthetic(root / "images", classes=2, per_class=4, val_per_class=1, min_side=40, max_side=64,
                       seed=0, workers=1)
        settings = WriteSettings(write_mode="raw", max_resolution=64)
        convert_source(find_samples(root / "images"), root / "betons", settings, settings, workers=1, console=None)
    return root / "betons"


def one_batch(backend: str, data: Path, device: str) -> str:
    """"ok" when the backend imports and yields one batch of the right shape on the device, else the error."""
    try:
        loader = build_loader(backend, data, "train", batch_size=4, resolution=32, workers=1, device=device)
        images, labels = next(iter(loader))
        if tuple(images.shape) != (4, 3, 32, 32) or images.device.type != device or labels.shape != (4,):
            return f"batch of {tuple(images.shape)} on {images.device}, expected (4, 3, 32, 32) on {device}"
    except Exception as exc:  # noqa: BLE001 - reported as what failed, with its fix
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
    return "ok"


def nvidia_smi(field: str) -> str | None:
    try:
        done = subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip().splitlines()[0] if done.returncode == 0 and done.stdout.strip() else None


def check_mixed_decoding(hw_decoder_load: float) -> str:
    """Decode one JPEG with DALI's mixed (nvJPEG) decoder: hw_decoder_load 0.9 asks for the hardware decoder
    (A100/H100 have one), 0 decodes on the CUDA cores."""
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(buffer, "JPEG")
    encoded = np.frombuffer(buffer.getvalue(), dtype=np.uint8)
    try:
        from nvidia.dali import fn, pipeline_def, types  # inside the try: a broken DALI is a finding

        @pipeline_def(batch_size=1, num_threads=1, device_id=0)
        def pipeline():
            data = fn.external_source(source=lambda: [encoded], batch=True, dtype=types.UINT8)
            return fn.decoders.image(data, device="mixed", output_type=types.RGB, hw_decoder_load=hw_decoder_load)

        built = pipeline()
        built.build()
        (images,) = built.run()
        shape = tuple(images.as_cpu().at(0).shape)
    except Exception as exc:  # noqa: BLE001 - reported as the missing piece
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
    return "ok" if shape == (48, 64, 3) else f"decoded shape {shape}, expected (48, 64, 3)"
