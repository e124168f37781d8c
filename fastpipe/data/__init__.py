"""One loader interface over FFCV, DALI and a torchvision baseline, all reading one converted data set.

`build_loader(backend=...)` is the only place a backend is chosen; backend modules (and FFCV/DALI,
which are slow to import) load only when asked for, so `import fastpipe.data` stays cheap.
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:   # torch costs ~2 s to import; `python -m convert` only needs fastpipe.data.beton
    import torch

# name -> (module, class, third-party package the backend needs)
BACKENDS = {
    "ffcv": ("fastpipe.data.ffcv_backend", "FFCVLoader", "ffcv"),
    "dali": ("fastpipe.data.dali_backend", "DALILoader", "nvidia.dali"),
    "torch": ("fastpipe.data.torch_backend", "TorchLoader", "torchvision"),
}
INSTALL_HINTS = {
    "ffcv": "pip install ffcv (needs OpenCV and libjpeg-turbo; `make setup` installs them)",
    "nvidia.dali": "pip install nvidia-dali-cuda130 (or `pip install -e '.[dali]'`)",
    "torchvision": "pip install torchvision",
}


def _installed(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except ModuleNotFoundError:   # parent package missing (e.g. no `nvidia` namespace at all)
        return False


def available_backends() -> list[str]:
    """Backends whose libraries are installed (found without importing them)."""
    return [name for name, (_, _, package) in BACKENDS.items() if _installed(package)]


def build_loader(backend: str = "ffcv", data: str | os.PathLike = "", split: str = "train",
                 batch_size: int = 256, resolution: int = 160, workers: int = 8, device: str = "cpu",
                 shuffle: bool = True, drop_last: bool = True, normalize: bool = True,
                 dtype: torch.dtype | None = None, seed: int = 0, distributed: bool = False,
                 min_scale: float = 0.08, max_scale: float = 1.0, ratio: tuple[float, float] = (3 / 4, 4 / 3),
                 flip: bool = True, **backend_options):
    """Build a loader yielding (images NCHW channels_last, labels int64), both on `device`.

    backend_options go to the backend: ffcv (order, os_cache, batches_ahead), dali (hw_decoder_load,
    prefetch), torch (prefetch_factor).
    """
    if dtype is None:
        import torch  # loaded only now: see TYPE_CHECKING above
        dtype = torch.float32
    if backend not in BACKENDS:
        raise ValueError(f"Unknown loader backend {backend!r}; choose one of {sorted(BACKENDS)} "
                         f"(installed here: {available_backends()}).")
    module_name, class_name, package = BACKENDS[backend]
    if not _installed(package):
        raise RuntimeError(f"Loader backend {backend!r} needs {package}, which is not installed: "
                           f"{INSTALL_HINTS[package]}. Backends available here: {available_backends()}.")
    loader_class = getattr(importlib.import_module(module_name), class_name)
    accepted = [name for name, parameter in inspect.signature(loader_class).parameters.items()
                if parameter.kind is inspect.Parameter.KEYWORD_ONLY]
    unknown = sorted(set(backend_options) - set(accepted))
    if unknown:
        raise ValueError(f"Option(s) {unknown} are not understood by the {backend!r} loader; "
                         f"its options are {accepted}.")
    return loader_class(data, split, batch_size=batch_size, resolution=resolution, workers=workers,
                        device=device, shuffle=shuffle, drop_last=drop_last, normalize=normalize,
                        dtype=dtype, seed=seed, distributed=distributed, min_scale=min_scale,
                        max_scale=max_scale, ratio=ratio, flip=flip, **backend_options)


__all__ = ["BACKENDS", "available_backends", "build_loader"]
