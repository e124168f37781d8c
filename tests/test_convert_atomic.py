"""Writes are atomic and watched: a killed converter leaves no file under a final name, a crashed FFCV
worker (which makes FFCV wait forever) is stopped by the watchdog, and a file that changes mid-write
fails the run."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from convert.pipeline import convert_source
from convert.sources import ConvertError, find_samples
from convert.validate import check_image
from convert.write import BetonJob, WriterProcess, WriteSettings


def job_items(folder: Path, repeat: int) -> list[tuple[str, int, int, int]]:
    """Samples for a BetonJob; repeating the files makes a write long enough to interfere with."""
    items = []
    for path in sorted(folder.rglob("*.JPEG")):
        check = check_image(path, 96)
        items.append((str(path), 0, check.width, check.height))
    return items * repeat


@pytest.fixture(scope="module")
def many_files(synthetic_folder, tmp_path_factory) -> Path:
    """An ImageFolder of 1,000 hard links to the synthetic JPEGs: a conversion that takes seconds."""
    root = tmp_path_factory.mktemp("many")
    sources = sorted((synthetic_folder / "train").rglob("*.JPEG"))
    for index in range(1000):
        target = root / f"class{index % 2}" / f"img{index:05d}.JPEG"
        target.parent.mkdir(exist_ok=True)
        os.link(sources[index % len(sources)], target)
    return root


def test_killed_converter_leaves_no_final_file_and_a_rerun_completes(many_files, tmp_path, quiet_console):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "convert", "folder", str(many_files), "--out", str(out),
               "--workers", "1", "--max-resolution", "0"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not any(path.stat().st_size for path in out.glob(".train.beton.*.tmp")):
        assert process.poll() is None and time.monotonic() < deadline, "the write never started"
        time.sleep(0.01)
    family = psutil.Process(process.pid).children(recursive=True)
    process.send_signal(signal.SIGKILL)
    process.wait()
    # generous: on a busy machine a writer may finish a long GIL-holding call before its exit thread runs
    _, alive = psutil.wait_procs(family, timeout=120)
    assert not alive, f"processes outlived the killed converter: {[(p.pid, p.cmdline()) for p in alive]}"
    assert not [path.name for path in out.iterdir() if not path.name.endswith(".tmp")]
    manifest = convert_source(find_samples(many_files), out, WriteSettings(), WriteSettings(), workers=2,
                              console=quiet_console)
    assert manifest["splits"]["train"]["written"] + manifest["splits"]["val"]["written"] == 1000
    assert sorted(path.name for path in out.iterdir()) == [
        "manifest.json", *(f"{split}.{kind}" for split in ("train", "val")
                           for kind in ("beton", "names.bin", "samples.npy"))]


def test_a_crashed_ffcv_worker_is_stopped_by_the_watchdog(synthetic_folder, tmp_path):
    path = tmp_path / ".train.beton.tmp"
    job = BetonJob("train", path, job_items(synthetic_folder, repeat=40), WriteSettings(max_resolution=96))

    def kill_one_ffcv_worker(writer):
        while writer.process.is_alive():
            try:
                workers = psutil.Process(writer.process.pid).children()
            except psutil.NoSuchProcess:
                return
            if workers and writer.progress.value > 0:
                workers[0].kill()
                return
            time.sleep(0.005)

    started = time.monotonic()
    with pytest.raises(ConvertError, match="no progress for 3 s"), WriterProcess(workers=2) as writer:
        threading.Thread(target=kill_one_ffcv_worker, args=(writer,), daemon=True).start()
        writer.write([job], stall_timeout=3)
    assert time.monotonic() - started < 120
    assert not path.exists()
    assert not writer.process.is_alive()


def test_a_file_that_changes_during_the_write_fails_the_run(synthetic_folder, tmp_path):
    items = job_items(synthetic_folder, repeat=1)
    changed, _, width, height = items[3]
    items[3] = (changed, 0, width + 1, height)          # as if the file was replaced after validation
    path = tmp_path / ".val.beton.tmp"
    with pytest.raises(ConvertError, match=f"{Path(changed).name}: size changed"), WriterProcess(workers=2) as writer:
        writer.write([BetonJob("val", path, items, WriteSettings(max_resolution=96))])
    assert not path.exists()
