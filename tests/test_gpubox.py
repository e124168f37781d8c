"""The GPU box's offline install: what the wheelhouse carries is derived from requirements against the box's
package list, large wheels come back whole from their parts, the README's install block is the one the
stand-in box runs, and a crop decoder that cannot load says why."""
from __future__ import annotations

import ctypes
import subprocess

import pytest

from benchmarks.gpubox import sim, wheelhouse
from fastpipe.data import crop_decode


def resolution(**packages: tuple[str, list[str]]) -> dict:
    return {name.replace("_", "-"): {"version": version, "requires_dist": requires}
            for name, (version, requires) in packages.items()}


def test_carried_wheels_are_what_the_box_lacks_or_has_at_a_rejected_version():
    resolved = resolution(
        fastpipe=("0.1.0", ["torch>=2.11", "tomli-w>=1.0", "tomli>=2; python_version < '3.11'", "ffcv==1.0.2",
                            "nvidia-dali-cuda130; extra == 'dali'", "ruff>=0.5; extra == 'dev'"]),
        torch=("2.11.0", ["sympy>=1.13"]), sympy=("1.14", []), tomli_w=("1.2.0", []), tomli=("2.2", []),
        ffcv=("1.0.2", ["six", "assertpy"]), assertpy=("1.1", []), six=("1.17.0", []),
        nvidia_dali_cuda130=("2.4.0", ["packaging<=26.3", "nvidia-nvimgcodec-cu13[all]<0.10,>=0.9"]),
        packaging=("26.3", []), nvidia_nvimgcodec_cu13=("0.9.0.20", ["nvidia-nvjpeg; extra == 'all'"]),
        nvidia_nvjpeg=("13.3.2.43", []), ruff=("0.17.6", []))
    image = {"torch": "2.11.0", "packaging": "26.4", "six": None, "sympy": None}
    carried, assumed = wheelhouse.derive(resolved, image)
    assert set(carried) == {"tomli-w", "ffcv", "assertpy", "nvidia-dali-cuda130", "packaging",
                            "nvidia-nvimgcodec-cu13", "nvidia-nvjpeg"}
    assert carried["packaging"] == "the box has 26.4; nvidia-dali-cuda130 requires <=26.3"
    assert "not on the box" in carried["nvidia-nvjpeg"]          # reached through nvimgcodec's [all] extra
    assert set(assumed) == {"six"}                                # torch's own needs are the box's business


def test_the_box_image_list_has_the_versions_the_derivation_needs():
    image = wheelhouse.image_packages()
    assert image["torch"] == "2.11.0" and image["torchvision"] == "0.26.0" and image["packaging"] == "26.4"
    assert "tomli-w" not in image and "ffcv" not in image and "opencv-python-headless" in image


def test_large_wheels_split_into_parts_that_one_cat_joins(tmp_path, monkeypatch):
    monkeypatch.setattr(wheelhouse, "SPLIT_MB", 1)
    monkeypatch.setattr(wheelhouse, "PART_MB", 1)
    payload = bytes(range(256)) * (10 * 2**10 + 7)   # 2.5 MiB and a bit: three parts
    (tmp_path / "big-1.0-py3-none-any.whl").write_bytes(payload)
    (tmp_path / "small-1.0-py3-none-any.whl").write_bytes(b"x" * 1000)
    assert [path.name for path in wheelhouse.split_large(tmp_path)] == ["big-1.0-py3-none-any.whl"]
    parts = sorted((tmp_path / "parts").iterdir())
    assert len(parts) == 3 and not (tmp_path / "big-1.0-py3-none-any.whl").exists()
    assert (tmp_path / "small-1.0-py3-none-any.whl").exists()
    subprocess.run("cat parts/big-1.0-py3-none-any.whl.part-* > big-1.0-py3-none-any.whl", shell=True,
                   cwd=tmp_path, check=True)
    assert (tmp_path / "big-1.0-py3-none-any.whl").read_bytes() == payload


def test_readme_install_block_joins_the_parts_then_installs_from_the_wheelhouse_alone():
    lines = sim.readme_install_lines()
    assert lines[-1].startswith("pip install ") and "--no-index" in lines[-1] and "--find-links wheelhouse" in lines[-1]
    assert "fastpipe[dali]" in lines[-1]
    assert any("cat " in line and "parts" in line for line in lines[:-1])
    assert not any(word in " ".join(lines) for word in ("PYTHONPATH", "LD_LIBRARY_PATH", "--no-deps"))


def test_a_crop_decoder_that_cannot_load_says_which_file_and_why(tmp_path, monkeypatch):
    broken = tmp_path / "_cropdecode.cpython-312-x86_64-linux-gnu.so"
    broken.write_text("not a shared library")
    monkeypatch.setattr(crop_decode, "_candidates", lambda: [str(broken)])
    library, why = crop_decode._load()
    assert library is None and str(broken) in why and "could not be loaded" in why

    def glibc_too_old(path):
        raise OSError(f"/lib/x86_64-linux-gnu/libc.so.6: version `GLIBC_2.35' not found (required by {path})")

    monkeypatch.setattr(ctypes, "CDLL", glibc_too_old)
    library, why = crop_decode._load()
    assert library is None and "GLIBC_2.35" in why and crop_decode.REQUIREMENT in why
    monkeypatch.setattr(crop_decode, "_candidates", list)
    assert crop_decode._load() == (None, crop_decode.NOT_BUILT)


@pytest.mark.skipif(not crop_decode.available(), reason=crop_decode.MISSING)
def test_the_crop_decoder_is_found_in_this_tree_or_the_installed_wheel():
    assert any(path.endswith(".so") for path in crop_decode._candidates())
