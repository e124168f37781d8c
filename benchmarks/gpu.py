"""`python -m benchmarks gpu`: the whole GPU truth from one short command, offline.

Phases, each with a time budget and a skip flag; a phase that fails is reported and the next one runs:
  preflight  versions, CUDA, driver, nvJPEG and DALI's mixed decoding; for each missing piece, the fix
  tests      the gpu-marked tests
  data       a synthetic ImageNet-size set made with all cores, converted raw@256 and jpg@256
  loaders    img/s per backend (DALI mixed and CPU, FFCV with ToDevice, torch) per storage and resolution
  train      ResNet-50/18 img/s with the trainer's own step: synthetic on-device batches vs each loader
  epoch      a 2-epoch run of configs/r50.toml: seconds per epoch outside the step loop, by kind
  graphs     graphs compiled across a set_resolution change (one per shape, none in steady state)
The report (JSON, Markdown, PNG) names the device. `--device cpu --quick` runs the same phases small on
the CPU, skipping only what needs CUDA; the test suite runs it so the command cannot rot.
"""
from __future__ import annotations

import gc
import json
import os
import re
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.machine import describe, machine_info
from benchmarks.report import make_console, markdown_table, print_table, write_report

# Each phase imports what it runs inside its own function: on a box where a dependency is broken, that
# phase fails with the error (and preflight says what to fix) instead of the whole command failing at import.
CUDA_FIX = "torch sees no GPU: check `nvidia-smi`, the driver and CUDA_VISIBLE_DEVICES"


class PhaseFailed(Exception):
    """A phase that ran to its end but found failures: its findings are kept in the report."""

    def __init__(self, message: str, found: dict):
        super().__init__(message)
        self.found = found

PHASES = ("preflight", "tests", "data", "loaders", "train", "epoch", "graphs")
REPO = Path(__file__).resolve().parent.parent
LOADER_COLUMNS = {"backend": "backend", "storage": "storage", "res": "res", "workers": "workers",
                  "batch_size": "batch", "img_per_s": "img/s", "ratio_to_torch": "x torch", "peak_rss_mb": "peak RSS MB",
                  "cpu_util_pct": "CPU %", "feed_us_per_sample": "feed µs/img",
                  "epoch_start_s": "epoch start s", "epoch_start_batches": "start (batches)"}
EPOCH_COLUMNS = {"arch": "model", "epoch": "epoch", "epoch_time_s": "epoch s", "img_per_s": "img/s",
                 "epoch_start": "loader start s", "compile": "compile s", "eval": "eval s", "report": "report s",
                 "plots": "plots s", "checkpoint": "checkpoint s"}
TRAIN_COLUMNS = {"arch": "model", "feed": "feed", "storage": "storage", "res": "res", "batch_size": "batch",
                 "img_per_s": "img/s", "ratio_to_synthetic": "x synthetic"}


@dataclass(frozen=True)
class Sizes:
    """How big each phase runs: the full GPU run, or `--quick` on a CPU."""
    classes: int
    per_class: int
    val_per_class: int
    image_sides: tuple[int, int]
    resolutions: tuple[int, ...]
    loader_batch: int
    loader_epochs: int
    max_batches: int | None
    train_res: int
    train_batch: dict
    train_steps: int
    graph_res: tuple[int, int]
    budgets: dict


FULL = Sizes(classes=100, per_class=100, val_per_class=10, image_sides=(200, 500), resolutions=(160, 224),
             loader_batch=256, loader_epochs=1, max_batches=None, train_res=160,
             train_batch={"resnet50": 512, "resnet18": 512}, train_steps=30, graph_res=(160, 192),
             # 8.3 minutes in all (graphs: CPU only unless --graphs); compiling ResNet-50 and -18 is most of it
             budgets={"preflight": 45, "tests": 50, "data": 40, "loaders": 95, "train": 190, "epoch": 75,
                      "graphs": 60})
QUICK = Sizes(classes=4, per_class=12, val_per_class=4, image_sides=(48, 96), resolutions=(32,),
              loader_batch=16, loader_epochs=1, max_batches=2, train_res=32,
              train_batch={"resnet50": 4, "resnet18": 8}, train_steps=1, graph_res=(32, 48),
              budgets={"preflight": 45, "tests": 60, "data": 40, "loaders": 60, "train": 40, "epoch": 60,
                       "graphs": 40})


class Deadline:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def check(self, what: str, notes: list[str]) -> bool:
        """False (with a note) once the phase's budget is spent: later units are skipped."""
        if self.left() > 0:
            return True
        notes.append(f"budget spent: skipped {what}")
        return False


# ----------------------------------------------------------------------------------------------- phases
def gpu_tests(ctx: dict, deadline: Deadline) -> dict:
    if not (REPO / "tests").is_dir():
        return {"status": "skipped", "reason": f"no tests/ beside {REPO / 'benchmarks'}: run from the repository"}
    command = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", str(REPO / "tests")]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=max(deadline.left(), 1),
                              cwd=REPO, check=False)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"the gpu-marked tests ran past the phase budget of {ctx['sizes'].budgets['tests']} s")
    summary = (done.stdout.strip().splitlines() or ["no output"])[-1]
    counts = {kind: int(number) for number, kind in re.findall(r"(\d+) (passed|failed|skipped|error)", summary)}
    if done.returncode not in (0, 5) or counts.get("failed") or counts.get("error"):
        tail = "\n".join(done.stdout.strip().splitlines()[-15:])
        raise RuntimeError(f"gpu tests failed ({summary}):\n{tail}")
    return {"summary": summary, **counts}


def make_data(ctx: dict, deadline: Deadline) -> dict:
    from convert.pipeline import convert_source
    from convert.sources import find_samples
    from convert.synthetic import make_synthetic
    from convert.write import WriteSettings

    sizes, root = ctx["sizes"], ctx["out"] / "data"
    cores = os.cpu_count() or 1
    images = root / "images"
    started = time.perf_counter()
    made = make_synthetic(images, classes=sizes.classes, per_class=sizes.per_class,
                          val_per_class=sizes.val_per_class, min_side=sizes.image_sides[0],
                          max_side=sizes.image_sides[1], seed=0, workers=cores)
    source = find_samples(images)
    ctx["data"] = {}
    for storage in ("raw", "jpg"):
        settings = WriteSettings(write_mode=storage, max_resolution=256)
        convert_source(source, root / storage, settings, settings, workers=cores,
                       console=make_console() if not ctx["quiet"] else None)
        ctx["data"][storage] = root / storage
    return {"images": made["images"], "seconds": round(time.perf_counter() - started, 1),
            "storages": {name: str(path) for name, path in ctx["data"].items()}}


def loader_rows(ctx: dict, deadline: Deadline) -> dict:
    from benchmarks.loaders import LoaderCase, run_cases

    sizes, notes, rows, failures = ctx["sizes"], [], [], []
    workers = ctx["workers"]
    feeds = [("ffcv", ctx["device"]), ("torch", ctx["device"]), ("dali", "cpu")]
    if ctx["device"] == "cuda":
        feeds.insert(0, ("dali", "cuda"))
    # resolution outermost, so a budget that runs out still leaves every storage measured at 160 px; one
    # process for all cases (start-up and JIT once), since this phase has minutes, not tens of them
    for res in sizes.resolutions:
        for storage, path in ctx["data"].items():
            for backend, device in feeds:
                if not deadline.check(f"{backend} on {device} at {res} px ({storage})", notes):
                    continue
                case = LoaderCase(backend, res, workers, sizes.loader_batch)
                found, case_notes, failed = run_cases([case], str(path), device, sizes.loader_epochs, 1, {},
                                                      ctx["console"], sizes.max_batches, isolate=False, steady=True)
                notes += case_notes
                if failed:
                    failures += [f"{backend} on {device} at {res} px ({storage})"]
                for row in found:
                    row["backend"] = "dali-mixed" if backend == "dali" and device == "cuda" else (
                        "dali-cpu" if backend == "dali" else backend)
                    row["storage"] = storage
                    rows.append(row)
    torch_rate = {(row["storage"], row["res"]): row["img_per_s"] for row in rows if row["backend"] == "torch"}
    for row in rows:
        base = torch_rate.get((row["storage"], row["res"]))
        row["ratio_to_torch"] = round(row["img_per_s"] / base, 3) if base else None
    ctx["results"] += rows
    print_table(rows, LOADER_COLUMNS, title="loader img/s", console=ctx["console"])
    found = {"rows": len(rows), "notes": notes}
    if failures:
        raise PhaseFailed(f"{len(failures)} loader case(s) failed: {', '.join(failures)} (notes: {notes})", found)
    return found


def train_rows(ctx: dict, deadline: Deadline) -> dict:
    from benchmarks.train_step import build_train_step, fed_rate, synthetic_rate
    from fastpipe.config import load_config
    from fastpipe.train.assemble import loader_for
    from fastpipe.train.runtime import build_runtime

    sizes, notes, rows, failures = ctx["sizes"], [], [], []
    data = ctx["data"]["raw"]
    for arch in ("resnet50", "resnet18"):   # the recipe's model first: a spent budget skips ResNet-18
        if not deadline.check(f"{arch} training", notes):
            continue
        batch = sizes.train_batch[arch]
        config = load_config(None, {"data": {"path": str(data), "batch_size": batch, "workers": ctx["workers"]},
                                    "model": {"arch": arch}, "train": {"device": ctx["device"]},
                                    "resolution": {"start": sizes.train_res, "end": sizes.train_res}})
        step = build_train_step(config, sizes.classes, ctx["device"])
        ceiling = synthetic_rate(step, batch, sizes.train_res, sizes.classes, sizes.train_steps, warmup=2)
        base = {"arch": arch, "res": sizes.train_res, "batch_size": batch, "graphs": step.graphs}
        rows.append({**base, "feed": "synthetic", "storage": "-", "img_per_s": round(ceiling, 1),
                     "ratio_to_synthetic": 1.0})
        runtime = build_runtime(config, device=ctx["device"])
        # --quick (the test suite's CPU check): raw storage only, each feed's loader costs seconds to build
        # here; the loaders phase covers both storages
        storages = list(ctx["data"].items())[:1] if ctx["quick"] else ctx["data"].items()
        for storage, path in storages:
            for backend in ("ffcv", "dali", "torch"):
                if not deadline.check(f"{arch} fed by {backend} ({storage})", notes):
                    continue
                try:
                    loader = loader_for(config, "train", runtime, backend=backend, data=str(path),
                                          batch_size=batch, resolution=sizes.train_res)
                    rate = fed_rate(step, loader, sizes.train_steps, warmup=2)
                except Exception as exc:  # noqa: BLE001 - one feed failing must not lose the others
                    failures.append(f"{arch} fed by {backend} ({storage}): {type(exc).__name__}: {exc}")
                    continue
                finally:
                    loader = None
                    gc.collect()   # free one loader's threads and workers before the next one starts
                rows.append({**base, "feed": backend, "storage": storage, "img_per_s": round(rate, 1),
                             "ratio_to_synthetic": round(rate / ceiling, 3)})
    ctx["train_rows"] = rows
    print_table(rows, TRAIN_COLUMNS, title="training img/s: the trainer's step, synthetic vs loaders",
                console=ctx["console"])
    if failures:
        raise PhaseFailed(f"{len(failures)} training feed(s) failed: {'; '.join(failures)}",
                          {"rows": rows, "notes": notes + failures})
    return {"rows": rows, "notes": notes}


def epoch_overheads(ctx: dict, deadline: Deadline) -> dict:
    """A short real training run (the trainer, configs/r50.toml at one resolution, two epochs): per epoch, the
    seconds spent outside the step loop by kind (summary.json's outside_step_s) beside the epoch's time."""
    import pandas as pd

    from fastpipe.config import load_config
    from fastpipe.train import Trainer

    sizes = ctx["sizes"]
    arch = "resnet18" if ctx["quick"] else "resnet50"
    batch = sizes.train_batch[arch]
    run_dir = ctx["out"] / "epoch-run"
    overrides = {"data": {"path": str(ctx["data"]["jpg"]), "batch_size": batch, "workers": "auto"},
                 "model": {"arch": arch},   # the default compile cache: the train phase's graphs are in it
                 "train": {"device": ctx["device"], "log_every": 10**6}, "schedule": {"epochs": 2},
                 "resolution": {"start": sizes.train_res, "end": sizes.train_res, "val": sizes.train_res},
                 "run": {"dir": str(run_dir)}}
    config = load_config(REPO / "configs" / "r50.toml" if (REPO / "configs" / "r50.toml").is_file() else None,
                         overrides)
    Trainer(config, run_dir).fit()
    summary = json.loads((run_dir / "summary.json").read_text())
    history = pd.read_csv(run_dir / "metrics.csv").set_index("epoch")
    rows = [{"arch": arch, "epoch": row["epoch"], "epoch_time_s": round(float(history.at[row["epoch"], "epoch_time_s"]), 2),
             "img_per_s": round(float(history.at[row["epoch"], "images_per_second"]), 1),
             **{kind: round(seconds, 3) for kind, seconds in row.items() if kind != "epoch"}}
            for row in summary["outside_step_s"]["per_epoch"]]
    ctx["epoch_rows"] = rows
    print_table(rows, EPOCH_COLUMNS, title="per-epoch seconds outside the step loop (a 2-epoch run of r50.toml)",
                console=ctx["console"])
    return {"rows": rows, "run_dir": str(run_dir)}


def graph_counts(ctx: dict, deadline: Deadline) -> dict:
    """The trainer's compiled model across set_resolution: A, B, then A again must make two graphs."""
    from benchmarks.train_step import build_train_step, synthetic_rate
    from fastpipe.config import load_config

    sizes = ctx["sizes"]
    compile_backend = "inductor" if ctx["device"] == "cuda" else "aot_eager"   # no C++ build on a small CPU
    config = load_config(None, {"model": {"arch": "resnet18", "compile": True, "compile_backend": compile_backend},
                                "train": {"device": ctx["device"]}})
    step = build_train_step(config, sizes.classes, ctx["device"])
    low, high = sizes.graph_res
    counts = []
    for res in (low, high, low):
        synthetic_rate(step, 8, res, sizes.classes, steps=2, warmup=1)
        counts.append(step.graphs)
    if counts != [1, 2, 2]:
        raise RuntimeError(f"graphs after {low}, {high}, {low} px: {counts}; expected [1, 2, 2] (one per shape)")
    return {"graphs_after_each_resolution": counts, "resolutions": [low, high, low],
            "compile_backend": compile_backend}


def run_preflight(ctx: dict, deadline) -> dict:
    from benchmarks.preflight import preflight

    return preflight(ctx, deadline)


RUNNERS = {"preflight": run_preflight, "tests": gpu_tests, "data": make_data, "loaders": loader_rows,
           "train": train_rows, "epoch": epoch_overheads, "graphs": graph_counts}
NEEDS = {"loaders": "data", "train": "data", "epoch": "data"}


# --------------------------------------------------------------------------------------------- command
def add_arguments(parser) -> None:
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                        help="cuda (default), or cpu to run the same phases without a GPU")
    parser.add_argument("--quick", action="store_true", help="small sizes: the CPU check the test suite runs")
    parser.add_argument("--skip", default="", help=f"comma-separated phases to skip: {', '.join(PHASES)}")
    parser.add_argument("--workers", type=int, help="loader workers (default: the usable cores)")
    parser.add_argument("--graphs", action="store_true",
                        help="on a GPU, run the graphs phase too (the CPU run checks the same counts)")
    parser.add_argument("--out", default="runs/bench-gpu", help="report folder")


def run(args) -> int:
    from fastpipe.train.assemble import usable_cores

    skip = {name.strip() for name in args.skip.split(",") if name.strip()}
    if unknown := skip - set(PHASES):
        raise SystemExit(f"error: unknown phase(s) {', '.join(sorted(unknown))}; phases: {', '.join(PHASES)}")
    console = make_console()
    device = args.device if args.device == "cpu" or torch.cuda.is_available() else "cpu"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sizes = QUICK if args.quick else FULL
    ctx = {"device": device, "asked": args.device, "quick": args.quick, "sizes": sizes, "out": out,
           "console": console, "results": [], "train_rows": [], "quiet": args.quick,
           "workers": args.workers or usable_cores()}
    if device != args.device:
        console.print(f"[yellow]no CUDA GPU here: running the CPU phases; {CUDA_FIX}[/yellow]")
    phases: dict[str, dict] = {}
    started = time.perf_counter()
    for name in PHASES:
        needed = NEEDS.get(name)
        if name in skip:
            phases[name] = {"status": "skipped", "reason": "--skip"}
            continue
        if name == "graphs" and device == "cuda" and not args.graphs:   # device minutes are scarce
            phases[name] = {"status": "skipped", "reason": "the CPU run checks it; --graphs runs it here"}
            continue
        if needed and phases.get(needed, {}).get("status") != "ok":
            phases[name] = {"status": "skipped", "reason": f"needs the {needed} phase"}
            continue
        budget = sizes.budgets[name]
        console.print(f"[bold]{name}[/bold] (budget {budget} s) ...")
        phase_start = time.perf_counter()
        try:
            result = RUNNERS[name](ctx, Deadline(budget))
            phases[name] = {"status": "ok", **result}
        except PhaseFailed as exc:
            phases[name] = {**exc.found, "status": "failed", "error": str(exc)}
            console.print(f"[red]{name} failed: {exc}[/red]")
        except Exception as exc:  # noqa: BLE001 - report it, then go on with the next phase
            phases[name] = {"status": "failed", "error": f"{type(exc).__name__}: {exc}",
                            "trace": traceback.format_exc(limit=3)}
            console.print(f"[red]{name} failed: {type(exc).__name__}: {exc}[/red]")
        phases[name]["seconds"] = round(time.perf_counter() - phase_start, 1)
        phases[name]["budget_s"] = budget
    machine = machine_info()
    device_text = (machine.get("gpu") or {}).get("name") if device == "cuda" else "CPU"
    payload = {"benchmark": "gpu", "machine": machine, "device": device_text,
               "settings": {"device": device, "quick": args.quick, "workers": ctx["workers"],
                            "skipped": sorted(skip)},
               "elapsed_s": round(time.perf_counter() - started, 1), "phases": phases,
               "results": ctx["results"], "training": ctx["train_rows"], "epochs": ctx.get("epoch_rows", [])}
    title = f"fastpipe on {device_text} ({describe(machine)})"
    written = write_report(out, payload, title, plots=bool(ctx["results"]), columns=LOADER_COLUMNS)
    with open(out / "results.md", "a") as handle:
        handle.write(phase_markdown(phases, ctx["train_rows"], ctx.get("epoch_rows", [])))
    (out / "results.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print_table([{"phase": name, "status": phase["status"], "seconds": phase.get("seconds")}
                 for name, phase in phases.items()], {"phase": "phase", "status": "status", "seconds": "s"},
                title=f"benchmarks gpu on {device_text}: {payload['elapsed_s']} s", console=console)
    console.print(f"report: {', '.join(str(path) for path in written)}")
    return 1 if any(phase["status"] == "failed" for phase in phases.values()) else 0


def phase_markdown(phases: dict, train: list[dict], epochs: list[dict] = ()) -> str:
    lines = ["", "## Phases", "", "| phase | status | seconds | budget s | detail |", "|---|---|---:|---:|---|"]
    for name, phase in phases.items():
        detail = phase.get("error") or phase.get("reason") or phase.get("summary") or ""
        if name == "preflight" and phase.get("status") == "ok":
            detail = ", ".join(f"{k} {v}" for k, v in phase["versions"].items()) + "; one batch: " + ", ".join(
                f"{k} {v}" for k, v in phase["backends"].items()) + f"; crop decoder {phase['crop_decoder']}" + (
                "; nvJPEG: " + ", ".join(f"{k} {v}" for k, v in phase["nvjpeg"].items()) if "nvjpeg" in phase else "")
        if name == "graphs" and phase.get("status") == "ok":
            detail = f"graphs after {phase['resolutions']} px: {phase['graphs_after_each_resolution']}"
        lines.append(f"| {name} | {phase['status']} | {phase.get('seconds', '')} | {phase.get('budget_s', '')} | "
                     f"{str(detail).replace('|', '/').splitlines()[0] if detail else ''} |")
    if train:
        lines += ["", "## Training img/s (the trainer's step; x synthetic is the data-stall figure)", "",
                  markdown_table(train, TRAIN_COLUMNS)]
    if epochs:
        lines += ["", "## Seconds per epoch outside the step loop (a 2-epoch run of configs/r50.toml)", "",
                  markdown_table(list(epochs), EPOCH_COLUMNS)]
    return "\n".join(lines) + "\n"
