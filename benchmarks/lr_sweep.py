"""`python -m benchmarks lr-sweep`: how good is optim.lr = "auto"? For each small-image data set, one full
short training per fixed peak LR (6 over 2 decades) and one with lr = "auto"; every suggestion rule of the LR
finder is read from the auto run's sweep and compared with the best fixed LR (highest val top-1; among equal
top-1s, the lowest val loss).

Writes results.json, results.csv, results.md and lr_sweep.png to --out. Finished runs are kept and skipped,
so the command can be stopped and started again (or run one --sets at a time).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from benchmarks.small_sets import SETS, prepare, train_once

ACCEPTS_CONFIG_OVERRIDES = True
DEFAULT_LRS = tuple(float(f"{lr:.3g}") for lr in np.logspace(np.log10(0.02), np.log10(2.0), 6))


def add_arguments(parser) -> None:
    parser.add_argument("--sets", default=",".join(SETS), help="data sets (default: %(default)s)")
    parser.add_argument("--data-root", default="data/small", help="where the sets are written (default: %(default)s)")
    parser.add_argument("--config", default="small.toml", help="the recipe every run starts from (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=10, help="epochs of each training (default: %(default)s)")
    parser.add_argument("--lrs", default=",".join(map(str, DEFAULT_LRS)), help="fixed peak LRs (default: %(default)s)")
    parser.add_argument("--out", default="runs/lr-sweep", help="output folder (default: %(default)s)")
    parser.add_argument("--quick", action="store_true",
                        help="a tiny synthetic set, 2 LRs, 1 epoch: checks the command, measures nothing")


def rule_suggestions(run_dir: Path, steps: int, lr_scale: float) -> dict[str, float | None]:
    """Every rule's peak LR, from the sweep an lr = "auto" run wrote to lr_finder.csv."""
    import pandas as pd

    from fastpipe.lr_finder import read_curve

    curve = pd.read_csv(run_dir / "lr_finder.csv")
    result = read_curve(curve["lr"].tolist(), curve["loss"].tolist(), steps=steps)
    return {rule: None if lr is None else lr / lr_scale for rule, lr in result.suggestions().items()}


def sweep_set(name: str, args, lrs: list[float], overrides: list[str]) -> dict:
    from fastpipe.config import load_config

    sizes = {"per_class": 12, "val_per_class": 4} if args.quick else {}
    betons = prepare(name, Path(args.out) / "data" if args.quick else Path(args.data_root), **sizes)
    common = [f"--schedule.epochs={args.epochs}", "--train.log_every=1000", *overrides]
    runs = Path(args.out) / "runs" / name
    fixed = []
    for lr in lrs:
        started = time.perf_counter()
        summary = train_once(args.config, betons, runs / f"lr-{lr:g}", [*common, f"--optim.lr={lr}"])
        fixed.append({"lr": lr, "top1": summary["final_val_top1"], "loss": summary["final_val_loss"],
                      "wall_s": summary["wall_time_s"], "seconds": time.perf_counter() - started})
        print(f"{name}: lr {lr:g} -> val top-1 {summary['final_val_top1']:.4f}", flush=True)
    auto = train_once(args.config, betons, runs / "lr-auto", [*common, "--optim.lr=auto"])
    config = load_config(args.config, [f"--data.path={betons}", *common])
    # the sweep ran at the first epoch's batch size; optim.lr is for data.batch_size (one process)
    lr_scale = config.schedule_for_resolution().batch_size_at(0) / config.data.batch_size
    suggestions = rule_suggestions(runs / "lr-auto", config.lr_finder.steps, lr_scale)
    best = max(fixed, key=lambda row: (row["top1"], -row["loss"]))   # ties (an easy set): the lower val loss
    print(f"{name}: lr auto ({auto['peak_lr']:.3g}) -> val top-1 {auto['final_val_top1']:.4f}; best fixed lr "
          f"{best['lr']:g} ({best['top1']:.4f})", flush=True)
    tied = [row["lr"] for row in fixed if row["top1"] == best["top1"]]
    return {"set": name, "fixed": fixed, "best_lr": best["lr"], "best_top1": best["top1"],
            "best_range": [min(tied), max(tied)],
            "auto_lr": auto["peak_lr"], "auto_top1": auto["final_val_top1"], "auto_wall_s": auto["wall_time_s"],
            "rules": suggestions, "rule": _rule(), "train_images": _train_images(betons)}


def _rule() -> str:
    from fastpipe.lr_finder import SUGGESTION_RULE

    return SUGGESTION_RULE


def _train_images(betons: Path) -> int:
    from fastpipe.data.beton import read_manifest

    return int(read_manifest(betons)["splits"]["train"]["written"])


def within_2x(lr: float | None, row: dict) -> bool:
    """Whether `lr` lies within 2x of an LR that reached the best top-1 (several may tie on an easy set)."""
    low, high = row.get("best_range", [row["best_lr"]] * 2)
    return lr is not None and low / 2 <= lr <= high * 2


def markdown(results: list[dict], lrs: list[float]) -> str:
    """Val top-1 per fixed LR; then each suggestion as a multiple of the best LR, marked ok when within 2x
    of an LR with the best top-1."""
    header = ["set", "train images", *[f"lr {lr:g}" for lr in lrs], "best lr (ties)", "lr=auto (top-1)",
              "auto / best"] + [f"{rule} / best" for rule in results[0]["rules"]] if results else []
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for row in results:
        by_lr = {item["lr"]: item["top1"] for item in row["fixed"]}
        low, high = row.get("best_range", [row["best_lr"]] * 2)
        ties = f" ({low:g}-{high:g})" if low != high else ""

        def ratio(lr, row=row):
            return "-" if lr is None else f"{lr / row['best_lr']:.2f}x{' ok' if within_2x(lr, row) else ''}"

        cells = [row["set"], f"{row['train_images']:,}", *[f"{by_lr[lr]:.3f}" if lr in by_lr else "-" for lr in lrs],
                 f"{row['best_lr']:g}{ties}", f"{row['auto_lr']:.3g} ({row['auto_top1']:.3f})", ratio(row["auto_lr"])]
        cells += [ratio(lr) for lr in row["rules"].values()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(results: list[dict], path: Path) -> Path:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.2 * max(len(results), 1), 3.8), dpi=110, layout="constrained")
    colors = {"edge": "black", "steepest": "tab:red", "min_loss_div10": "tab:green", "valley": "tab:orange", "min_loss": "tab:purple",
              "min_loss_div2": "tab:brown"}
    for index, row in enumerate(results):
        ax = fig.add_subplot(1, len(results), index + 1)
        ax.plot([item["lr"] for item in row["fixed"]], [item["top1"] for item in row["fixed"]], "o-",
                color="tab:blue", label="fixed peak LR")
        ax.plot([row["auto_lr"]], [row["auto_top1"]], "*", color="black", markersize=14, label="lr=auto")
        for rule, lr in row["rules"].items():
            if lr is not None:
                ax.axvline(lr, color=colors.get(rule, "0.5"), linestyle="--", linewidth=1, label=rule)
        ax.axvspan(row["best_lr"] / 2, row["best_lr"] * 2, color="tab:blue", alpha=0.08, label="best / 2 .. x 2")
        ax.set_xscale("log")
        ax.set_title(f"{row['set']} ({row['train_images']:,} train images)", fontsize=9)
        ax.set_xlabel("peak LR")
        ax.set_ylabel("val top-1")
        ax.grid(True, which="both", alpha=0.3)
        if index == 0:
            ax.legend(fontsize=7)
    fig.savefig(path)
    return path


def run(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lrs = [float(lr) for lr in args.lrs.split(",")]
    overrides = list(getattr(args, "overrides", []))
    sets = args.sets.split(",")
    if args.quick:
        lrs, sets, args.epochs = lrs[:: max(1, len(lrs) - 1)][:2], ["synthetic"], 1
        overrides = ["--data.batch_size=16", "--lr_finder.steps=10", "--data.workers=1", *overrides]
    store = out / "results.json"
    results = {row["set"]: row for row in json.loads(store.read_text())} if store.is_file() else {}
    for name in sets:
        results[name] = sweep_set(name, args, lrs, overrides)
        store.write_text(json.dumps(list(results.values()), indent=2) + "\n")   # after each set: safe to stop
    rows = list(results.values())
    (out / "results.md").write_text(markdown(rows, lrs))
    _write_csv(rows, out / "results.csv")
    plot(rows, out / "lr_sweep.png")
    print(markdown(rows, lrs))
    print(f"Outputs: {store}  {out / 'results.csv'}  {out / 'results.md'}  {out / 'lr_sweep.png'}")
    return 0


def _write_csv(results: list[dict], path: Path) -> None:
    import pandas as pd

    rows = [{"set": row["set"], "kind": "fixed", "lr": item["lr"], "val_top1": item["top1"], "wall_s": item["wall_s"]}
            for row in results for item in row["fixed"]]
    rows += [{"set": row["set"], "kind": "auto", "lr": row["auto_lr"], "val_top1": row["auto_top1"],
              "wall_s": row["auto_wall_s"]} for row in results]
    rows += [{"set": row["set"], "kind": f"rule:{rule}", "lr": lr} for row in results for rule, lr in row["rules"].items()]
    pd.DataFrame(rows).to_csv(path, index=False)
