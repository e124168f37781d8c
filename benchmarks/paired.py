"""`python -m benchmarks paired --data A,B`: one backend on several data folders, compared paired.

Whole benchmark runs on a shared machine swing by tens of percent, more than a storage change moves a loader.
Here every folder gets its own loader in one process, one warm-up epoch each, then epochs alternate between
them (the order reversed every other round), so each round compares epochs taken side by side. Printed: the
median img/s of each folder and, per round, each folder's img/s over the first folder's, with their median.
"""
from __future__ import annotations

import statistics
import time

from benchmarks.machine import describe, machine_info
from benchmarks.report import print_table, write_report

COLUMNS = {"data": "data", "img_per_s": "median img/s", "ratio": "median / first", "ratios": "per round / first"}


def add_arguments(parser) -> None:
    parser.add_argument("--data", required=True, help="comma-separated converter output folders (2 or more)")
    parser.add_argument("--backend", default="ffcv", help="ffcv, ffcv:stock, dali or torch (default: %(default)s)")
    parser.add_argument("--res", type=int, default=160)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=6, help="timed epochs per folder (default: %(default)s)")
    parser.add_argument("--split", default="train", choices=("train", "val"))
    parser.add_argument("--out", default="runs/bench/paired", help="report folder")


def epoch_rate(loader) -> float:
    started, images = time.perf_counter(), 0
    for batch, _ in loader:
        images += len(batch)
    return images / (time.perf_counter() - started)


def run(args) -> int:
    from fastpipe.data import build_loader

    folders = [name.strip() for name in args.data.split(",") if name.strip()]
    if len(folders) < 2:
        raise SystemExit("--data needs at least two folders to compare")
    backend, _, decoder = args.backend.partition(":")
    options = {"decoder": decoder} if decoder else {}
    loaders = [build_loader(backend, folder, args.split, batch_size=args.batch_size, resolution=args.res,
                            workers=args.workers, seed=0, **options) for folder in folders]
    for loader in loaders:   # compilation, page cache
        epoch_rate(loader)
    rates: list[list[float]] = [[] for _ in folders]
    for round_ in range(args.rounds):
        order = range(len(folders)) if round_ % 2 == 0 else reversed(range(len(folders)))
        for index in order:
            rates[index].append(epoch_rate(loaders[index]))
        print(f"round {round_ + 1}/{args.rounds}: " + ", ".join(f"{rate[-1]:,.0f}" for rate in rates) + " img/s")
    rows = []
    for folder, rate in zip(folders, rates):
        ratios = [mine / first for mine, first in zip(rate, rates[0])]
        rows.append({"data": folder, "img_per_s": round(statistics.median(rate)),
                     "ratio": round(statistics.median(ratios), 3),
                     "ratios": " ".join(f"{ratio:.2f}" for ratio in ratios)})
    machine = machine_info()
    title = (f"{args.backend} paired over {len(folders)} folders, {args.res} px, {args.workers} workers, "
             f"batch {args.batch_size} ({describe(machine)})")
    print_table(rows, COLUMNS, title)
    write_report(args.out, {"machine": machine, "backend": args.backend, "results": rows}, title, plots=False,
                 columns=COLUMNS)
    return 0
