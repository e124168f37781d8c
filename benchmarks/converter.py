"""Converter benchmark: conversion images/s with 1 and with all workers, by source (folder, WebDataset shards,
ImageNet's archives, the same images), the storage table (write mode x
max resolution: beton size, FFCV loader img/s vs torchvision's ImageFolder path), and peak memory of a
conversion at two data set sizes. Run `python -m benchmarks convert --help`.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
from rich.console import Console

from benchmarks.machine import describe, machine_info
from benchmarks.measure import measure_batches
from benchmarks.report import markdown_table, rich_table, write_csv
from benchmarks.resources import ResourceSampler
from convert.pipeline import convert_source
from convert.sources import find_samples
from convert.synthetic import make_synthetic
from convert.write import WriteSettings
from fastpipe.data import build_loader

THROUGHPUT_COLUMNS = {"workers": "workers", "images": "images", "seconds": "seconds", "img_per_s": "img/s",
                      "speedup": "x 1 worker", "cpu_util_pct": "CPU % of all cores"}
STORAGE_COLUMNS = {"write_mode": "write mode", "max_resolution": "max res", "size_mb": "train MB",
                   "kb_per_image": "KB/img", "convert_img_per_s": "convert img/s",
                   "loader_img_per_s": "FFCV img/s", "ratio_to_torch": "x torch",
                   "stock_img_per_s": "FFCV stock img/s", "stock_ratio_to_torch": "stock x torch"}
SOURCE_COLUMNS = {"source": "source", "workers": "workers", "images": "images", "scan_s": "scan s",
                  "seconds": "seconds", "img_per_s": "img/s", "vs_folder": "x folder"}
MEMORY_COLUMNS = {"images": "images", "seconds": "seconds", "max_process_rss_mb": "max process RSS MB",
                  "tree_pss_mb": "tree PSS MB"}


def add_arguments(parser) -> None:
    parser.add_argument("--work", default="runs/bench/converter-data",
                        help="scratch folder for the synthetic set and betons (default: %(default)s)")
    parser.add_argument("--out", default="runs/bench/converter", help="report folder (default: %(default)s)")
    parser.add_argument("--images", type=int, default=1000, help="synthetic images (default: %(default)s)")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="'all workers' (default: all cores)")
    parser.add_argument("--modes", default="raw,proportion,jpg", help="write modes for the storage table")
    parser.add_argument("--resolutions", default="256,512", help="max resolutions for the storage table")
    parser.add_argument("--loader-res", type=int, default=160)
    parser.add_argument("--loader-workers", type=int, default=os.cpu_count())
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=40, help="timed loader batches per case")
    parser.add_argument("--rss-sizes", default="2000,8000", help="data set sizes for the memory rows")
    parser.add_argument("--skip", default="", help="comma list of sections to skip: throughput,sources,storage,memory")


def synthetic_set(folder: Path, images: int, classes: int) -> Path:
    """A flat ImageFolder of `images` synthetic JPEGs (kept between runs)."""
    per_class = max(1, images // classes)
    if len(list(folder.rglob("*.JPEG"))) != per_class * classes:
        make_synthetic(folder, classes=classes, per_class=per_class, seed=0)
    return folder


def linked_set(base: Path, folder: Path, images: int) -> Path:
    """`images` hard links cycling over the files of `base`: a bigger data set at no disk cost."""
    sources = sorted(base.rglob("*.JPEG"))
    if len(list(folder.rglob("*.JPEG"))) != images:
        for index in range(images):
            source = sources[index % len(sources)]
            target = folder / source.parent.name / f"link{index:06d}.JPEG"
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.exists():
                os.link(source, target)
    return folder


def convert_once(source, out: Path, settings, workers: int) -> tuple[float, dict]:
    start = time.perf_counter()
    manifest = convert_source(source, out, settings, settings, workers=workers, force=True,
                              console=Console(quiet=True))
    return time.perf_counter() - start, manifest


def throughput_rows(source, work: Path, workers: int) -> list[dict]:
    images = sum(len(items) for items in source.splits.values())
    convert_once(source, work / "warmup", WriteSettings(), workers)     # starts the forkserver (FFCV import)
    rows = []
    for count in dict.fromkeys((1, workers)):
        with ResourceSampler() as usage:     # low CPU % with many workers would mean a serial bottleneck
            seconds, _ = convert_once(source, work / f"workers{count}", WriteSettings(), count)
        rows.append({"table": "throughput", "workers": count, "images": images, "seconds": round(seconds, 2),
                     "img_per_s": images / seconds, "cpu_util_pct": usage.cpu_util_pct})
    for row in rows:
        row["speedup"] = row["img_per_s"] / rows[0]["img_per_s"]
    return rows


def pack_archives(source, folder: Path, shard_size: int = 500) -> dict:
    """The source's images as WebDataset shards and as ImageNet's archives (per-synset tars in a train tar,
    a flat val tar, LOC_val_solution.csv), written once: the same bytes for every converter source."""
    import csv
    import io
    import tarfile

    def add(archive, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))

    folder.mkdir(parents=True, exist_ok=True)
    done = folder / "done"
    synset = [f"n{label:08d}" for label in range(len(source.classes))]   # sorted like the class folders
    if not done.exists():
        for split, items in source.splits.items():
            for first in range(0, len(items), shard_size):
                with tarfile.open(folder / f"{split}-{first // shard_size:06d}.tar", "w") as shard:
                    for index, (path, label) in enumerate(items[first:first + shard_size], start=first):
                        add(shard, f"{split}{index:07d}.jpg", Path(path).read_bytes())
                        add(shard, f"{split}{index:07d}.cls", str(label).encode())
        by_label: dict[int, list] = {}
        for path, label in source.splits["train"]:
            by_label.setdefault(label, []).append(path)
        with tarfile.open(folder / "ILSVRC2012_img_train.tar", "w") as outer:
            for label, name in enumerate(synset):
                inner = io.BytesIO()
                with tarfile.open(fileobj=inner, mode="w") as per_synset:
                    for path in by_label.get(label, []):
                        add(per_synset, f"{name}_{Path(path).stem}.JPEG", Path(path).read_bytes())
                add(outer, f"{name}.tar", inner.getvalue())
        with tarfile.open(folder / "ILSVRC2012_img_val.tar", "w") as val, \
                open(folder / "LOC_val_solution.csv", "w", newline="") as handle:
            rows = csv.writer(handle)
            rows.writerow(["ImageId", "PredictionString"])
            for number, (path, label) in enumerate(source.splits["val"], start=1):
                add(val, f"ILSVRC2012_val_{number:08d}.JPEG", Path(path).read_bytes())
                rows.writerow([f"ILSVRC2012_val_{number:08d}", f"{synset[label]} 0 0 1 1"])
        done.touch()
    return {"shards": folder, "train_tar": folder / "ILSVRC2012_img_train.tar",
            "val_tar": folder / "ILSVRC2012_img_val.tar", "val_labels": folder / "LOC_val_solution.csv"}


def source_rows(source, work: Path, workers: int) -> list[dict]:
    """Conversion img/s of the same images from a folder, WebDataset shards and ImageNet's archives (the
    archive scan included)."""
    from convert.imagenet import imagenet_source
    from convert.webdataset import webdataset_source

    packed = pack_archives(source, work / "archives")
    makers = {"folder": lambda: source,
              "webdataset": lambda: webdataset_source(str(packed["shards"] / "train-*.tar"),
                                                      str(packed["shards"] / "val-*.tar")),
              "imagenet": lambda: imagenet_source(packed["train_tar"], packed["val_tar"],
                                                  val_labels=packed["val_labels"])}
    rows = []
    for name, make in makers.items():
        started = time.perf_counter()
        made = make()
        scan = time.perf_counter() - started
        seconds, manifest = convert_once(made, work / f"source-{name}", WriteSettings(), workers)
        images = sum(split["written"] for split in manifest["splits"].values())
        rows.append({"table": "sources", "source": name, "workers": workers, "images": images,
                     "scan_s": round(scan, 2), "seconds": round(scan + seconds, 2),
                     "img_per_s": images / (scan + seconds)})
    for row in rows:
        row["vs_folder"] = row["img_per_s"] / rows[0]["img_per_s"]
    return rows


def loader_img_per_s(backend: str, data: Path, args, warmup_batches: int = 4, **options) -> float:
    """Steady-state img/s of a train loader over `args.batches` batches (crossing epochs as needed),
    after `warmup_batches` untimed ones (FFCV compiles its pipeline on the first)."""
    loader = build_loader(backend, data=data, split="train", batch_size=args.batch_size,
                          resolution=args.loader_res, workers=args.loader_workers, device="cpu", **options)
    return measure_batches(loader, "cpu", args.batches, warmup_batches)


def storage_rows(source, work: Path, args, console: Console) -> tuple[list[dict], float | None]:
    rows, torch_img_per_s = [], None
    for mode in args.modes.split(","):
        for resolution in map(int, args.resolutions.split(",")):
            out = work / f"{mode}-{resolution}"
            seconds, manifest = convert_once(source, out, WriteSettings(write_mode=mode, max_resolution=resolution),
                                             args.workers)
            train = manifest["splits"]["train"]
            row = {"table": "storage", "write_mode": mode, "max_resolution": resolution,
                   "size_mb": train["size_bytes"] / 2**20, "kb_per_image": train["size_bytes"] / 1024 / train["written"],
                   "convert_img_per_s": (train["written"] + manifest["splits"]["val"]["written"]) / seconds}
            try:
                if torch_img_per_s is None:
                    torch_img_per_s = loader_img_per_s("torch", out, args)
                row["stock_img_per_s"] = loader_img_per_s("ffcv", out, args, decoder="stock")
                row["loader_img_per_s"] = loader_img_per_s("ffcv", out, args)   # the crop decoder when built
                row["ratio_to_torch"] = row["loader_img_per_s"] / torch_img_per_s
                row["stock_ratio_to_torch"] = row["stock_img_per_s"] / torch_img_per_s
            except Exception as err:  # noqa: BLE001 - a loader that cannot run here leaves its columns empty
                console.print(f"loader measurement failed for {mode}@{resolution}: {err}")
            rows.append(row)
            console.print(f"  {mode}@{resolution}: {row['size_mb']:.1f} MB, "
                          f"FFCV {row.get('loader_img_per_s', float('nan')):,.0f} img/s")
    return rows, torch_img_per_s


def peak_memory(src: Path, out: Path, workers: int) -> dict:
    """Run `python -m convert folder` in a wrapper process; report the largest single process RSS
    (getrusage of the wrapper's children) and the peak proportional set size (PSS: shared pages split
    between the processes sharing them) summed over the whole process tree, sampled every 0.3 s."""
    wrapper = ("import resource, subprocess, sys; "
               "code = subprocess.call(sys.argv[1:], stdout=subprocess.DEVNULL); "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(code)")
    command = [sys.executable, "-c", wrapper, sys.executable, "-m", "convert", "folder", str(src), "--out", str(out),
               "--force", "--workers", str(workers)]
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0]

    def sample() -> None:
        root = psutil.Process(process.pid)
        while process.poll() is None:
            total = 0
            try:
                for member in [root, *root.children(recursive=True)]:
                    total += member.memory_full_info().pss
            except psutil.Error:
                pass
            peak[0] = max(peak[0], total)
            time.sleep(0.3)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output, errors = process.communicate()
    sampler.join()
    if process.returncode:
        raise RuntimeError(f"conversion of {src} failed with exit code {process.returncode}:\n{errors[-2000:]}")
    max_rss_kb = int(output.strip().splitlines()[-1])
    return {"max_process_rss_mb": max_rss_kb / 1024, "tree_pss_mb": peak[0] / 2**20,
            "seconds": round(time.perf_counter() - start, 1)}


def run(args) -> int:
    console = Console()
    skip = set(filter(None, args.skip.split(",")))
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    console.print(f"synthetic set: {args.images} images in {work / 'images'}")
    source = find_samples(synthetic_set(work / "images", args.images, args.classes))
    machine = machine_info()
    rows, notes, sections = [], [f"Machine: {describe(machine)}."], []

    if "throughput" not in skip:
        console.print("conversion throughput ...")
        table = throughput_rows(source, work / "betons", args.workers)
        rows += table
        sections.append(("Conversion throughput (validate + write, both splits)", table, THROUGHPUT_COLUMNS))
    if "sources" not in skip:
        console.print("sources: the same images from a folder, WebDataset shards and ImageNet's archives ...")
        table = source_rows(source, work / "betons", args.workers)
        rows += table
        sections.append(("Conversion img/s by source (the same images; archives read in place)", table,
                         SOURCE_COLUMNS))
    if "storage" not in skip:
        console.print("storage table ...")
        table, torch_img_per_s = storage_rows(source, work / "betons", args, console)
        rows += table
        title = (f"Storage: train beton size and FFCV loader img/s at {args.loader_res} px "
                 f"({args.loader_workers} workers, batch {args.batch_size})")
        sections.append((title, table, STORAGE_COLUMNS))
        if torch_img_per_s:
            notes.append(f"torchvision ImageFolder baseline (same images, same crop size): "
                         f"{torch_img_per_s:,.0f} img/s.")
    if "memory" not in skip:
        console.print("peak memory ...")
        table = []
        for size in map(int, args.rss_sizes.split(",")):
            src = linked_set(work / "images", work / f"linked-{size}", size)
            table.append({"table": "memory", "images": size, **peak_memory(src, work / "betons" / f"rss-{size}",
                                                                           args.workers)})
        rows += table
        sections.append(("Peak memory of `python -m convert folder`", table, MEMORY_COLUMNS))
        notes.append("Max process RSS: the largest single process of the converter (getrusage; torch, "
                     "numba and FFCV loaded). Tree PSS: all its processes together, shared pages counted once.")

    payload = {"machine": machine, "settings": vars(args), "results": rows, "notes": notes}
    (out / "results.json").write_text(json.dumps(payload, indent=2) + "\n")
    write_csv(out / "results.csv", rows)
    parts = ["# Converter benchmark", "", f"Command: `python -m benchmarks convert {' '.join(sys.argv[2:])}`", ""]
    for title, table, columns in sections:
        console.print(rich_table(table, columns, title))
        parts += [f"## {title}", "", markdown_table(table, columns), ""]
    parts += ["Notes:", "", *(f"- {note}" for note in notes), ""]
    (out / "results.md").write_text("\n".join(parts))
    for note in notes:
        console.print(note)
    console.print(f"report: {out / 'results.md'}, {out / 'results.json'}")
    return 0

