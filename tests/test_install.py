"""The package installs against the GPU boxes' preinstalled torch 2.11 / torchvision 0.26, while `make`
installs the tested pins of constraints.txt, which must lie inside the declared ranges."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parent.parent


def declared() -> dict[str, Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = [item for group in project["optional-dependencies"].values() for item in group]
    return {Requirement(text).name: Requirement(text) for text in [*project["dependencies"], *extras]}


def pins() -> dict[str, str]:
    lines = (REPO / "constraints.txt").read_text().splitlines()
    return dict(line.split("==") for line in lines if line.strip() and not line.startswith("#"))


def test_declared_requirements_accept_the_gpu_box_torch_and_torchvision():
    requirements = declared()
    for name, version in (("torch", "2.11.0"), ("torch", "2.11.0+cu128"), ("torchvision", "0.26.0"),
                          ("torchvision", "0.26.0+cu128")):
        assert requirements[name].specifier.contains(version), (name, version)


def test_tested_pins_lie_inside_the_declared_ranges_and_cover_torch():
    requirements, pinned = declared(), pins()
    assert {"torch", "torchvision", "ffcv", "nvidia-dali-cuda130"} <= set(pinned)
    for name, version in pinned.items():
        if name in requirements:
            assert requirements[name].specifier.contains(version), (name, version)


def test_make_installs_with_the_constraints():
    makefile = (REPO / "Makefile").read_text()
    assert "-c constraints.txt -e '.[dali,dev]'" in makefile


def test_make_refuses_a_new_venv_on_a_disk_without_room_and_says_what_to_do(tmp_path):
    if shutil.which("make") is None:
        pytest.skip("no make")
    venv = tmp_path / "not" / "made" / "yet" / "venv"   # as `make VENV=/other/disk/venv` on a new disk

    def diskcheck(gb: int) -> subprocess.CompletedProcess:
        return subprocess.run(["make", "--no-print-directory", "-C", str(REPO), "diskcheck", f"VENV={venv}",
                               f"VENV_GB={gb}"], check=False, capture_output=True, text=True)

    short = diskcheck(10**6)  # a million GB: no disk has that
    assert short.returncode != 0
    assert "needs about 1000000 GB free" in short.stderr and "make VENV=" in short.stderr
    assert not (tmp_path / "not").exists()
    assert diskcheck(0).returncode == 0
