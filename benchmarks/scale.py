"""`python -m benchmarks scale --samples 128000,1281167`: what a data set's size costs a loader process.

For each size: a train beton of that many tiny raw images (12 x 12 px, 1,000 classes) written by FFCV's own
DatasetWriter and adopted (`convert adopt`), then for ffcv and dali a fresh process that builds the train
loader and takes one batch. Printed: the manifest's and the per-sample table's size, the time to the first
batch, the process's peak RSS and, at the first batch, its private (anonymous) and file-backed resident
memory, and between sizes the growth in bytes per added sample. File-backed pages are the memory-mapped
beton's, shared with every process reading it and given back under pressure: the kernel maps the pages
around each sample read (fault-around, 64 KB by default), so with tiny samples the batches in flight map a
share of the file that grows with it up to their own bound (batches x samples x 64 KB), not with bookkeeping.
`beton pages MB` gives that share once the loader's batches ahead are read (2 s after the first batch); they
only accumulate, so the peak RSS less them is what the process itself holds at its peak.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.machine import describe, machine_info
from benchmarks.report import print_table, write_report

COLUMNS = {"samples": "samples", "backend": "backend", "manifest_kb": "manifest KB", "table_mb": "table MB",
           "first_batch_s": "first batch s", "peak_rss_mb": "peak RSS MB", "anon_mb": "private MB",
           "file_mb": "file-backed MB", "beton_mb": "beton pages MB", "bytes_per_added_sample": "RSS B/added sample",
           "anon_bytes_per_added_sample": "private B/added sample",
           "other_mb": "peak RSS less beton pages MB", "other_bytes_per_added_sample": "peak RSS less beton pages B/added sample"}
SIDE, CLASSES, VAL = 12, 1000, 1000

PROBE = """
import json, resource, sys, time
started = time.perf_counter()
from fastpipe.data import build_loader
loader = build_loader(sys.argv[1], sys.argv[2], "train", batch_size=512, resolution=16, workers=2, seed=0)
batches = iter(loader)
next(batches)
first = time.perf_counter() - started
time.sleep(2)   # the loader fills its batches ahead: their reads map beton pages too
status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines() if ":" in line)
kib = lambda key: int(status.get(key, "0 kB").split()[0])
beton_kib, mapping = 0, ""
for line in open("/proc/self/smaps"):   # the resident pages of the memory-mapped betons
    parts = line.split()
    if parts and not parts[0].endswith(":"):
        mapping = parts[-1] if len(parts) > 5 else ""
    elif parts[:1] == ["Rss:"] and mapping.endswith(".beton"):
        beton_kib += int(parts[1])
print(json.dumps({"first_batch_s": first, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "anon_mb": kib("RssAnon") / 1024, "file_mb": kib("RssFile") / 1024, "beton_mb": beton_kib / 1024}),
      flush=True)
batches.close()
"""


def add_arguments(parser) -> None:
    parser.add_argument("--samples", default="128000,1281167", help="comma-separated train set sizes")
    parser.add_argument("--backends", default="ffcv,dali")
    parser.add_argument("--work", default="runs/bench/scale-data", help="where the betons are kept between runs")
    parser.add_argument("--out", default="runs/bench/scale", help="report folder")


def make_betons(folder: Path, samples: int) -> Path:
    """FFCV-written betons of `samples` (train) and VAL tiny images, adopted; kept between runs."""
    from convert.adopt import adopt

    if (folder / "manifest.json").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    write_tiny_beton(folder / "train.beton", samples)
    write_tiny_beton(folder / "val.beton", VAL)
    adopt(folder)
    return folder


class TinyImages:
    """Index-seeded 12 x 12 images with cycling labels: cheap to make at any count."""

    def __init__(self, count: int):
        self.count = count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int):
        pixels = np.full((SIDE, SIDE, 3), index % 251, dtype=np.uint8)
        return pixels, index % CLASSES


def write_tiny_beton(path: Path, count: int) -> None:
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    temporary = path.with_name(f".{path.name}.tmp")
    writer = DatasetWriter(str(temporary), {"image": RGBImageField(write_mode="raw"), "label": IntField()},
                           num_workers=2)
    writer.from_indexed_dataset(TinyImages(count), chunksize=2000)
    temporary.replace(path)


def probe(backend: str, data: Path) -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE, backend, str(data)], capture_output=True, text=True,
                          check=False, timeout=900)
    if done.returncode:
        raise RuntimeError(f"{backend} on {data} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(args) -> int:
    sizes = [int(size) for size in args.samples.split(",")]
    backends = [name.strip() for name in args.backends.split(",") if name.strip()]
    rows = []
    for samples in sizes:
        started = time.perf_counter()
        data = make_betons(Path(args.work) / f"tiny-{samples}", samples)
        print(f"{samples:,} samples ready in {time.perf_counter() - started:.0f} s ({data})")
        manifest_kb = (data / "manifest.json").stat().st_size / 1024
        table_mb = sum(path.stat().st_size for path in data.glob("*.samples.npy")) / 2**20
        for backend in backends:
            found = probe(backend, data)
            rows.append({"samples": samples, "backend": backend, "manifest_kb": round(manifest_kb, 1),
                         "table_mb": round(table_mb, 1), "first_batch_s": round(found["first_batch_s"], 2),
                         "peak_rss_mb": round(found["peak_rss_mb"], 1), "anon_mb": round(found["anon_mb"], 1),
                         "file_mb": round(found["file_mb"], 1), "beton_mb": round(found["beton_mb"], 1),
                         "other_mb": round(found["peak_rss_mb"] - found["beton_mb"], 1)})
    for row in rows:   # growth against the smallest size, per added sample
        base = next(other for other in rows if other["backend"] == row["backend"])
        if row["samples"] > base["samples"]:
            for key, name in (("peak_rss_mb", "bytes_per_added_sample"), ("anon_mb", "anon_bytes_per_added_sample"),
                              ("other_mb", "other_bytes_per_added_sample")):
                row[name] = round((row[key] - base[key]) * 2**20 / (row["samples"] - base["samples"]), 1)
    machine = machine_info()
    title = f"Loader cost of the data set's size ({describe(machine)})"
    print_table(rows, COLUMNS, title)
    write_report(args.out, {"machine": machine, "results": rows}, title, plots=False, columns=COLUMNS)
    return 0
