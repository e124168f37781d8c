"""What a benchmark ran on: CPU, cores, memory, GPU and library versions.

Every report carries this block so that figures from two machines are never compared unknowingly.
"""
from __future__ import annotations

import os
import platform
import sys
from datetime import datetime, timezone

import psutil
import torch

from fastpipe.versions import cpu_model
from fastpipe.versions import package_versions as shared_package_versions

# Distribution names, so versions are read without importing ffcv (numba compiles on import) or DALI.
PACKAGES = {
    "torch": "torch",
    "torchvision": "torchvision",
    "ffcv": "ffcv",
    "dali": "nvidia-dali-cuda130",
    "numpy": "numpy",
    "numba": "numba",
    "pillow": "pillow",
}


def package_versions() -> dict[str, str | None]:
    return shared_package_versions(PACKAGES)


def gpu_info() -> dict | None:
    if not torch.cuda.is_available():
        return None
    index = torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    return {"name": props.name, "count": torch.cuda.device_count(),
            "memory_gb": round(props.total_memory / 2**30, 1), "cuda": torch.version.cuda}


def machine_info() -> dict:
    """A JSON-ready description of this machine and software stack."""
    return {
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "hostname": platform.node(),
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "cores_logical": os.cpu_count(),
        "cores_physical": psutil.cpu_count(logical=False),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "gpu": gpu_info(),
        "versions": package_versions(),
        # orig_argv keeps `-m benchmarks`; argv[0] would be the path of __main__.py.
        "command": " ".join([os.path.basename(sys.executable), *getattr(sys, "orig_argv", sys.argv)[1:]]),
    }


def describe(machine: dict) -> str:
    """One line for table captions: 'Intel Xeon ..., 2 cores, 23.4 GiB, no GPU'."""
    gpu = machine.get("gpu")
    gpu_text = f"{gpu['count']}x {gpu['name']}" if gpu else "no GPU"
    return (f"{machine.get('cpu_model')}, {machine.get('cores_usable')} cores, "
            f"{machine.get('memory_gb')} GiB, {gpu_text}")
