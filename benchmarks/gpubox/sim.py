"""`make gpubox-sim`: the README's GPU-box install, proven on a stand-in box before a GPU is lent.

The stand-in: a Python 3.12 venv with torch 2.11.0, torchvision 0.26.0 and the box image's packages that
fastpipe's dependency closure touches, at the image's versions where image.txt knows them. Into a copy of
the tree (the files a device call carries) plus wheelhouse/, it runs the README's "GPU box, offline" lines
up to the first `pip install ` one, in a network namespace with no pip configuration; then `pip check`,
then `python -m benchmarks gpu --device cpu --quick` there and a short one from another folder. It fails
unless pip check is clean, every phase is ok, every backend produced figures and the crop decoder loaded.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.gpubox.wheelhouse import REPO, image_packages, project_tree

# What the gpu command's tests phase imports beyond fastpipe's requirements; all on the box image.
TEST_PACKAGES = ("pytest", "pytest-benchmark", "scikit-learn")
BOX_PINS = ("torch==2.11.0", "torchvision==0.26.0")
SECTION = "### GPU box, offline"
# The installed native libraries must find every library but the C/C++ runtime inside their wheels: this
# machine has OpenCV, libjpeg and X11 installed, a bare box need not.
LINKED = ("python - <<'EOF'\n"
          "import glob, subprocess, site\n"
          "from benchmarks.gpubox.wheelhouse import SYSTEM_LIBS\n"
          "root = site.getsitepackages()[0]\n"
          "libraries = glob.glob(root + '/fastpipe/data/_cropdecode*.so') + glob.glob(root + '/ffcv/_libffcv*.so')\n"
          "assert len(libraries) == 2, libraries\n"
          "for library in libraries:\n"
          "    for line in subprocess.run(['ldd', library], capture_output=True, text=True).stdout.splitlines():\n"
          "        name, _, where = line.strip().partition(' => ')\n"
          "        assert 'not found' not in where, line\n"
          "        assert not where.startswith('/') or where.startswith(root) or name.startswith(SYSTEM_LIBS), line\n"
          "    print('self-contained:', library)\n"
          "EOF")
BACKENDS = {"ffcv", "dali-cpu", "torch"}


def readme_install_lines(readme: Path = REPO / "README.md") -> list[str]:
    """The section's first code block, up to and including its first line that starts with `pip install `."""
    text = readme.read_text()
    if SECTION not in text:
        raise SystemExit(f"README.md has no '{SECTION}' section")
    block = text.split(SECTION, 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    lines = []
    for line in block.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            lines.append(line)
        if line.startswith("pip install "):
            return lines
    raise SystemExit(f"README.md's '{SECTION}' block has no line starting with `pip install `")


def stand_in_requirements(wheelhouse: Path) -> list[str]:
    """torch/torchvision at the box's versions, and the image's packages in fastpipe's resolved closure."""
    image = image_packages()
    closure = json.loads((wheelhouse / "resolution.json").read_text())
    names = sorted((set(closure) | set(TEST_PACKAGES)) & set(image) - {"torch", "torchvision"})
    return [*BOX_PINS, *(f"{name}=={image[name]}" if image[name] else name for name in names)]


def make_stand_in(venv: Path, python: str, requirements: list[str]) -> Path:
    """Built once per requirement list (a stamp holds its hash); the registry is used here, never later."""
    stamp = venv / ("stand-in-" + hashlib.sha256("\n".join(requirements).encode()).hexdigest()[:16])
    if stamp.exists():
        return venv
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([python, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "--upgrade", "pip"], check=True)
    subprocess.run([*pip, *requirements], check=True, env={**os.environ, "PIP_CONSTRAINT": ""})
    stamp.touch()
    return venv


def offline(command: str, cwd: Path, venv: Path, log: Path) -> subprocess.CompletedProcess:
    """bash -c COMMAND with no network (its own namespace), no pip configuration and the stand-in first on PATH."""
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(cwd), "LANG": "C.UTF-8",
           "PIP_CONFIG_FILE": os.devnull, "VIRTUAL_ENV": str(venv), "PYTHONUNBUFFERED": "1"}
    print(f"$ {command}   (in {cwd}, offline)", flush=True)
    done = subprocess.run(["unshare", "--net", "bash", "-eo", "pipefail", "-c", command], cwd=cwd, env=env,
                          capture_output=True, text=True, check=False)
    with open(log, "a") as handle:
        handle.write(f"$ {command}\n{done.stdout}{done.stderr}[exit {done.returncode}]\n")
    return done


def check_report(path: Path, full: bool) -> list[str]:
    """What is wrong with one gpu report: a phase not ok, a backend without figures, no crop decoder."""
    report = json.loads(path.read_text())
    problems = [f"phase {name}: {phase['status']} {phase.get('error') or phase.get('reason') or ''}".strip()
                for name, phase in report["phases"].items() if phase["status"] != "ok"
                and (full or phase.get("reason") != "--skip")]
    preflight = report["phases"].get("preflight", {})
    if preflight.get("crop_decoder") != "installed":
        problems.append(f"crop decoder: {preflight.get('crop_decoder')}")
    if full:
        loaders = {row["backend"] for row in report["results"] if row.get("img_per_s")}
        feeds = {row["feed"] for row in report["training"] if row.get("img_per_s")}
        problems += [f"no loader figures from {name}" for name in sorted(BACKENDS - loaders)]
        problems += [f"no training figures fed by {name}" for name in sorted({"ffcv", "dali", "torch"} - feeds)]
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpubox sim", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wheelhouse", default=REPO / "wheelhouse", type=Path)
    parser.add_argument("--venv", default=REPO / ".gpubox" / "venv", type=Path, help="the stand-in box")
    parser.add_argument("--python", required=True, help="a Python 3.12 interpreter for the stand-in")
    parser.add_argument("--out", default=REPO / "runs" / "gpubox-sim", type=Path)
    args = parser.parse_args(argv)
    if not (args.wheelhouse / "resolution.json").exists():
        raise SystemExit(f"no wheelhouse at {args.wheelhouse}: run `make wheelhouse` first")
    if shutil.which("unshare") is None:
        raise SystemExit("needs unshare (util-linux) to run the install with the network off")
    venv = make_stand_in(args.venv.resolve(), args.python, stand_in_requirements(args.wheelhouse))
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    log = (args.out / "sim.log").resolve()
    with tempfile.TemporaryDirectory(prefix="gpubox-sim-") as temporary:
        box = Path(temporary) / "repo"
        elsewhere = Path(temporary) / "elsewhere"
        elsewhere.mkdir()
        project_tree(box)
        shutil.copytree(args.wheelhouse, box / "wheelhouse")
        # the stand-in is reused between runs: start from the box's state, without a fastpipe installed
        subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "uninstall", "-q", "-y", "fastpipe"],
                       check=False, capture_output=True)
        steps = [(" && ".join(readme_install_lines()), box), ("pip check", box),
                 ("python -m benchmarks gpu --device cpu --quick --out runs/gpubox-sim", box),
                 ("python -m benchmarks gpu --device cpu --quick --skip tests,loaders,train,graphs --out report",
                  elsewhere)]
        results = [offline(command, cwd, venv, log) for command, cwd in [*steps[:2], (LINKED, box), ("pip list", box)]]
        for done in results:
            print(done.stdout[-3000:], done.stderr[-3000:], sep="\n")
        if any(done.returncode for done in results):
            print(f"FAILED: the install or pip check (log: {log})")
            return 1
        problems = []
        for (command, cwd), report, full in zip(steps[2:], ("runs/gpubox-sim", "report"), (True, False)):
            done = offline(command, cwd, venv, log)
            print(done.stdout[-4000:])
            found = cwd / report / "results.json"
            problems += [f"{cwd.name}: {text}" for text in
                         (check_report(found, full) if found.exists() else [f"no report ({done.stderr[-500:]})"])]
        if (box / "runs" / "gpubox-sim").is_dir():
            shutil.copytree(box / "runs" / "gpubox-sim", args.out, dirs_exist_ok=True)
    print("\n".join(f"FAILED: {text}" for text in problems) or f"gpubox-sim: ok (log and report: {args.out})")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
