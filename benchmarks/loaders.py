"""`python -m benchmarks loaders`: img/s of every backend x resolution x workers on one converted data set.

Each combination runs in a fresh process. A warm-up epoch (FFCV compiles with numba, DALI builds its
pipeline, torch spawns workers) is timed separately and excluded; the row reports the median of the
timed epochs with min and max.
"""
from __future__ import annotations

import ast
import gc
import itertools
import multiprocessing
import statistics
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from benchmarks.machine import machine_info
from benchmarks.measure import device_name, device_type_or_exit, time_epoch
from benchmarks.report import TABLE_COLUMNS, make_console, print_table, write_report
from benchmarks.resources import ResourceSampler
from fastpipe.data import build_loader, crop_decode
from fastpipe.data.beton import MODE_RAW, BetonError, BetonSamples, check_beton, read_manifest
from fastpipe.data.sample_table import SampleTable

BASELINE = "torch"
LEGEND = [
    "img/s: median over the timed epochs (a warm-up epoch is excluded); min and max over the same epochs",
    "x torch: img/s over the torch baseline's at the same resolution, workers and batch size",
    ("peak RSS MB: highest resident memory summed over the process and its children, sampled every 50 ms "
     "(pages shared by forked workers count once per process)"),
    ("PSS MB: proportional set size of the same tree at the end of the fullest timed epoch "
     "(shared pages split between processes)"),
    "CPU %: CPU time of the tree over wall time, as a share of all usable cores",
    "feed µs/img: DALI only, main-thread time spent handing each sample to the pipeline (timed epochs)",
    ("start (batches): time from iter() to an epoch's first batch (timed epochs, median), in steady-state "
     "batch times"),
    ("decoded px/out px: pixels decoded per output pixel; ffcv's crop decoder counts what it decoded, "
     "ffcv:stock and dali the stored size of every JPEG sample (raw samples decode none), torch the size "
     "of every original file"),
    "ffcv:stock is FFCV's own decoder (full decode, INTER_AREA); ffcv is the crop decoder when built",
    ("restart_decodes_share, entropy_read_share (JSON/CSV, crop decoder): the share of samples decoded from "
     "their restart intervals, and the share of those samples' entropy-coded bytes that were read"),
    "each row runs in its own fresh process unless --no-isolate was given (see settings)",
]


@dataclass(frozen=True)
class LoaderCase:
    backend: str
    res: int
    workers: int
    batch_size: int
    split: str = "train"


def parse_int_list(text: str, name: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise SystemExit(f"error: --{name} takes comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise SystemExit(f"error: --{name} needs at least one integer >= 1, got {text!r}")
    return values


VARIANT_OPTION = {"ffcv": "decoder"}   # "ffcv:stock" -> backend ffcv with decoder="stock"


def split_variant(name: str) -> tuple[str, dict]:
    """'ffcv:stock' -> ('ffcv', {'decoder': 'stock'}); a plain name has no extra options."""
    backend, colon, variant = name.partition(":")
    if not colon:
        return backend, {}
    if backend not in VARIANT_OPTION or not variant:
        raise SystemExit(f"error: unknown backend variant {name!r}; variants: "
                         + ", ".join(f"{key}:<{value}>" for key, value in VARIANT_OPTION.items()))
    return backend, {VARIANT_OPTION[backend]: variant}


def whole_image_decoded_pixels(data: str, split: str, resolution: int, backend: str = "ffcv") -> float:
    """Decoded px per output px for a loader that decodes whole images: FFCV's stock decoder and DALI decode
    every JPEG sample of the beton, the torch baseline every original file (sizes read from headers)."""


    if backend == BASELINE:
        manifest = read_manifest(data)
        root = Path(manifest["source_root"])
        area = 0
        samples = SampleTable(data, manifest, split).pairs()
        for relative, _ in samples:
            with Image.open(root / relative) as image:   # reads the header only
                area += image.width * image.height
        return area / (len(samples) * resolution ** 2)
    samples = BetonSamples(check_beton(data, split))
    jpeg = samples.mode != MODE_RAW
    return float((samples.height * samples.width)[jpeg].sum() / (len(samples) * resolution ** 2))


def parse_backend_options(pairs: list[str] | None) -> dict[str, dict]:
    """['dali.hw_decoder_load=0.7', 'ffcv.os_cache=True'] -> {'dali': {'hw_decoder_load': 0.7}, ...}."""
    options: dict[str, dict] = {}
    for pair in pairs or []:
        key, sep, raw = pair.partition("=")
        backend, dot, name = key.partition(".")
        if not sep or not dot or not name:
            raise SystemExit(f"error: --option {pair!r} must look like BACKEND.NAME=VALUE, "
                             f"e.g. dali.hw_decoder_load=0.7")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw   # plain strings need no quotes
        options.setdefault(backend, {})[name] = value
    return options


def measure_case(case: LoaderCase, data: str, device: str, epochs: int, warmup: int,
                 options: dict | None = None, progress: Progress | None = None,
                 max_batches: int | None = None, steady: bool = False) -> dict:
    """Build the loader, run warm-up + timed epochs under a resource sampler; returns one result row."""
    backend, variant_options = split_variant(case.backend)
    with ResourceSampler() as usage:
        loader = build_loader(backend=backend, data=data, split=case.split, batch_size=case.batch_size,
                              resolution=case.res, workers=case.workers, device=device, shuffle=True,
                              drop_last=True, seed=0, **{**(options or {}), **variant_options})
        crop_decoder = getattr(loader, "decoder_kind", None) == "crop"
        batches = len(loader) if max_batches is None else min(len(loader), max_batches)
        if batches < 1:
            raise ValueError(f"{case.split} split has fewer than batch_size={case.batch_size} samples; "
                             f"lower --batch-size")
        task = None
        if progress is not None:
            task = progress.add_task(f"{case.backend} {case.res}px w{case.workers}",
                                     total=batches * (epochs + warmup))
        advance = (lambda: progress.advance(task)) if task is not None else None
        warmup_s = 0.0
        for epoch in range(warmup):
            loader.set_epoch(epoch)
            warmup_s += time_epoch(loader, device, max_batches, advance)[1]
        rates, starts, batch_times, rss_after_epoch, pss_after_epoch = [], [], [], [], []
        images = 0
        feed = getattr(loader, "feed", None)   # DALI: main-thread time handing batches over
        if feed is not None:
            feed.reset()
        crop_decode.reset_counters()
        for epoch in range(warmup, warmup + epochs):
            loader.set_epoch(epoch)
            images, seconds, first_batch = time_epoch(loader, device, max_batches, advance, steady)
            rates.append(images / seconds)
            starts.append(first_batch)
            batch_times.append(case.batch_size / rates[-1])
            usage.sample()
            rss_after_epoch.append(usage.current_rss_bytes)
            pss_after_epoch.append(usage.tree_pss_bytes())
        work = crop_decode.read_counters()
        del loader
        gc.collect()
    restarts = {}
    if crop_decoder:
        decoded = work["decoded_pixels"] / max(work["output_pixels"], 1)
        if work["restart_decodes"]:   # JPEGs decoded from their restart intervals: how much Huffman data they read
            restarts = {"restart_decodes_share": round(work["restart_decodes"] / max(work["samples"], 1), 3),
                        "entropy_read_share": round(work["entropy_bytes_read"] / max(work["entropy_bytes"], 1), 3)}
    else:
        decoded = whole_image_decoded_pixels(data, case.split, case.res, backend)
    if task is not None:
        progress.remove_task(task)
    growth = (100.0 * (rss_after_epoch[-1] / rss_after_epoch[0] - 1.0)
              if len(rss_after_epoch) > 1 and rss_after_epoch[0] else None)
    return {
        "backend": case.backend, "split": case.split, "res": case.res, "workers": case.workers,
        "batch_size": case.batch_size, "device": device_name(device),
        "img_per_s": round(statistics.median(rates), 1), "img_per_s_min": round(min(rates), 1),
        "img_per_s_max": round(max(rates), 1),
        "ratio_to_torch": None, "peak_rss_mb": round(usage.peak_rss_mb, 1),
        "pss_mb": round(max(pss_after_epoch) / 2**20, 1) if None not in pss_after_epoch else None,
        "cpu_util_pct": round(usage.cpu_util_pct, 1),
        "rss_growth_pct": None if growth is None else round(growth, 2),
        "decoded_px_per_output_px": round(decoded, 2), **restarts,
        "feed_us_per_sample": None if feed is None or feed.us_per_sample is None else round(feed.us_per_sample, 2),
        # time to an epoch's first batch (after the warm-up epochs), in seconds and in steady batch times
        "epoch_start_s": round(statistics.median(starts), 4),
        "epoch_start_batches": round(statistics.median(starts) / statistics.median(batch_times), 2),
        "epochs": epochs, "images_per_epoch": images, "warmup_s": round(warmup_s, 3),
        "timing": "from the first batch" if steady else "whole epochs",
        "options": {**(options or {}), **variant_options},
    }


def add_ratios(rows: list[dict]) -> None:
    """Each row's img/s over the torch row with the same split, resolution, workers and batch size."""
    def key(row):
        return row["split"], row["res"], row["workers"], row["batch_size"]

    baseline = {key(row): row["img_per_s"] for row in rows if row["backend"] == BASELINE}
    for row in rows:
        base = baseline.get(key(row))
        row["ratio_to_torch"] = round(row["img_per_s"] / base, 3) if base else None


def unavailable_backends(backends: list[str]) -> dict[str, str]:
    """Backends that cannot run here, with the reason, so they are skipped with a note."""
    try:
        from fastpipe.data import available_backends  # a broken install is reported, not raised
    except ImportError as exc:
        return {name: f"fastpipe.data cannot be imported ({exc})" for name in backends}
    available = set(available_backends())
    return {name: f"backend {name!r} is not available here (available: {', '.join(sorted(available))})"
            for name in backends if split_variant(name)[0] not in available}


def measure_isolated(case: LoaderCase, data: str, device: str, epochs: int, warmup: int,
                     options: dict | None, max_batches: int | None) -> dict:
    """`measure_case` in a fresh spawned process: no memory, JIT caches or threads left by earlier cases.

    Forked loader workers copy the parent's pages, so in one long process every later backend's
    memory figures grow with what earlier ones left behind; a process per case keeps rows comparable.
    """
    context = multiprocessing.get_context("spawn")
    # A crashing child (FFCV aborts inside OpenCV on a bad file) raises BrokenProcessPool, never hangs.
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(measure_case, case, data, device, epochs, warmup, options, None,
                           max_batches).result()


def run_cases(cases: list[LoaderCase], data: str, device: str, epochs: int, warmup: int,
              options: dict[str, dict], console: Console, max_batches: int | None = None,
              isolate: bool = True, steady: bool = False) -> tuple[list[dict], list[str], int]:
    """Measure each case; returns (rows, notes, failures). A failing case becomes a note, not a crash."""
    rows, notes, failures = [], [], 0
    skipped = unavailable_backends(sorted({case.backend for case in cases}))
    for backend, reason in skipped.items():
        notes.append(f"{backend}: skipped, {reason}")
        console.print(f"[yellow]{backend}: skipped, {reason}[/yellow]")
    runnable = [case for case in cases if case.backend not in skipped]
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*columns, console=console, transient=True) as progress:
        overall = progress.add_task("loader benchmark", total=len(runnable))
        for case in runnable:
            progress.update(overall, description=f"{case.backend} {case.res}px, {case.workers} workers")
            backend_options = options.get(split_variant(case.backend)[0])
            try:
                if isolate:
                    rows.append(measure_isolated(case, data, device, epochs, warmup, backend_options,
                                                 max_batches))
                else:
                    rows.append(measure_case(case, data, device, epochs, warmup, backend_options,
                                             progress, max_batches, steady))
            except Exception as exc:  # noqa: BLE001 - one broken backend must not lose the rest
                failures += 1
                message = (f"{case.backend} res={case.res} workers={case.workers}: failed: "
                           f"{type(exc).__name__}: {exc}")
                notes.append(message)
                console.print(f"[red]{message}[/red]")
            progress.advance(overall)
    add_ratios(rows)
    return rows, notes, failures


def add_arguments(parser) -> None:
    parser.add_argument("--data", required=True, help="converter output folder (betons + manifest.json)")
    parser.add_argument("--backends", default="ffcv,dali,torch",
                        help="comma-separated; torch (the baseline) is always added; ffcv:stock is FFCV's "
                             "own decoder, ffcv:crop the crop decoder")
    parser.add_argument("--res", default="160", help="comma-separated resolutions in px")
    parser.add_argument("--workers", default="2", help="comma-separated worker counts")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs per combination (after warm-up)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed warm-up epochs per combination")
    parser.add_argument("--max-batches", type=int, help="cap each epoch at this many batches (large sets)")
    parser.add_argument("--split", default="train", choices=["train", "val"])
    parser.add_argument("--no-isolate", dest="isolate", action="store_false",
                        help="run every case in this process (faster start; memory figures then include "
                             "what earlier cases left behind)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--option", action="append", metavar="BACKEND.NAME=VALUE",
                        help="backend option passed to build_loader, e.g. dali.hw_decoder_load=0.7")
    parser.add_argument("--out", default="runs/bench-loaders", help="report folder")
    parser.add_argument("--json", help="also write the results JSON here")


def run(args) -> int:
    console = make_console()

    backends = [name.strip() for name in args.backends.split(",") if name.strip()]
    try:
        adopted = read_manifest(args.data).get("layout") == "adopted"
    except BetonError as exc:
        raise SystemExit(f"error: {exc}") from None
    if adopted:   # no source images: nothing for the baseline to read, so no x torch column
        backends = [name for name in backends if name != BASELINE]
        console.print("note: adopted betons have no source images, so the torch baseline does not run")
    elif BASELINE not in backends:
        backends.append(BASELINE)
    resolutions = parse_int_list(args.res, "res")
    workers = parse_int_list(args.workers, "workers")
    if args.batch_size < 1 or args.epochs < 1 or args.warmup < 0 or (args.max_batches or 1) < 1:
        raise SystemExit("error: --batch-size, --epochs and --max-batches must be >= 1 and --warmup >= 0")
    try:
        check_beton(args.data, args.split)
    except BetonError as exc:
        raise SystemExit(f"error: {exc}") from None
    device = device_type_or_exit(args.device)
    options = parse_backend_options(args.option)
    cases = [LoaderCase(backend, res, count, args.batch_size, args.split)
             for backend, res, count in itertools.product(backends, resolutions, workers)]
    rows, notes, failures = run_cases(cases, args.data, device, args.epochs, args.warmup, options, console,
                                      args.max_batches, args.isolate)
    payload = {
        "benchmark": "loaders",
        "machine": machine_info(),
        "settings": {"data": str(Path(args.data).resolve()), "split": args.split, "epochs": args.epochs,
                     "warmup": args.warmup, "max_batches": args.max_batches, "isolated": args.isolate,
                     "device": device,
                     "backends": backends},
        "results": rows,
        "legend": LEGEND,
        "notes": notes,
    }
    written = write_report(args.out, payload, "Loader throughput")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(written[0].read_text())
    # split, batch size and device are the same on every row: in the title, not in columns.
    shown = {key: header for key, header in TABLE_COLUMNS.items() if key not in ("split", "batch_size", "device")}
    print_table(rows, shown, console=console,
                title=f"Loader img/s ({args.split}, batch {args.batch_size}, {device_name(device)})")
    for note in notes:
        console.print(f"note: {note}")
    console.print(f"report: {', '.join(str(path) for path in written)}")
    return 1 if failures else 0
