"""What software and CPU produced a file: package versions (read from metadata, never by importing the
package: ffcv compiles numba code on import) and the CPU model. Shared by manifests, runs and benchmarks."""
from __future__ import annotations

import platform
from importlib import metadata


def package_versions(distributions: dict[str, str]) -> dict[str, str | None]:
    """{name: version or None} for {name: distribution}, plus the Python version."""
    versions: dict[str, str | None] = {}
    for name, distribution in distributions.items():
        try:
            versions[name] = metadata.version(distribution)
        except metadata.PackageNotFoundError:
            versions[name] = None
    versions["python"] = platform.python_version()
    return versions


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
