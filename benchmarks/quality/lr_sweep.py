"""`python -m benchmarks lr-sweep`: how good is optim.lr = "auto"? For each small-image data set, full short
trainings at each fixed peak LR (6 over 2 decades) and with lr = "auto", each with --seeds seeds (weights,
sample order, augmentation); every suggestion rule of the LR finder is read from the auto runs' sweeps and
compared with the best fixed LR (highest mean val top-1; among equal means, the lowest val loss).

Val sets of a few hundred images cannot tell close LRs apart: the LRs whose mean top-1 lies within one
standard error of the best (the binomial sqrt(p (1 - p) / n) of the val set at the best's top-1) count as
tied with it, and a suggestion is "ok" when within 2x of one of them. The strict ratio to the single best
LR is printed beside it.

Writes results.json, results.csv, results.md and lr_sweep.png to --out. Finished runs are kept and skipped,
so the command can be stopped and started again (or run one --sets at a time).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from benchmarks.quality.sets import BENCH_SETS, prepare, split_size, train_once
from fastpipe.config import load_config
from fastpipe.train.lr_finder import SUGGESTION_RULE, read_curve

ACCEPTS_CONFIG_OVERRIDES = True
DEFAULT_LRS = tuple(float(f"{lr:.3g}") for lr in np.logspace(np.log10(0.02), np.log10(2.0), 6))


def add_arguments(parser) -> None:
    parser.add_argument("--sets", default=",".join(BENCH_SETS), help="data sets (default: %(default)s)")
    parser.add_argument("--data-root", default="data/small", help="where the sets are written (default: %(default)s)")
    parser.add_argument("--config", default="small.toml", help="the recipe every run starts from (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=10, help="epochs of each training (default: %(default)s)")
    parser.add_argument("--lrs", default=",".join(map(str, DEFAULT_LRS)), help="fixed peak LRs (default: %(default)s)")
    parser.add_argument("--seeds", type=int, default=2, help="trainings per LR, train.seed 0..N-1 (default: %(default)s)")
    parser.add_argument("--out", default="runs/lr-sweep", help="output folder (default: %(default)s)")
    parser.add_argument("--quick", action="store_true",
                        help="a tiny synthetic set, 2 LRs, 1 epoch: checks the command, measures nothing")


def rule_suggestions(run_dir: Path, steps: int, lr_scale: float) -> dict[str, float | None]:
    """Every rule's peak LR, from the sweep an lr = "auto" run wrote to lr_finder.csv."""


    curve = pd.read_csv(run_dir / "lr_finder.csv")
    result = read_curve(curve["lr"].tolist(), curve["loss"].tolist(), steps=steps)
    return {rule: None if lr is None else lr / lr_scale for rule, lr in result.suggestions().items()}


def _seed_dir(runs: Path, name: str, seed: int) -> Path:
    return runs / (name if seed == 0 else f"{name}-seed{seed}")


def sweep_set(name: str, args, lrs: list[float], overrides: list[str]) -> dict:
    sizes = {"per_class": 12, "val_per_class": 4} if args.quick else {}
    betons = prepare(name, Path(args.out) / "data" if args.quick else Path(args.data_root), **sizes)
    common = [f"--schedule.epochs={args.epochs}", "--train.log_every=1000", *overrides]
    runs, seeds = Path(args.out) / "runs" / name, range(max(1, args.seeds))
    fixed = []
    for lr in lrs:
        summaries = [train_once(args.config, betons, _seed_dir(runs, f"lr-{lr:g}", seed),
                                [*common, f"--optim.lr={lr}", f"--train.seed={seed}"]) for seed in seeds]
        top1 = [s["final_val_top1"] for s in summaries]
        fixed.append({"lr": lr, "top1": float(np.mean(top1)), "top1_seeds": top1,
                      "loss": float(np.mean([s["final_val_loss"] for s in summaries])),
                      "wall_s": float(np.mean([s["wall_time_s"] for s in summaries]))})
        print(f"{name}: lr {lr:g} -> val top-1 {fixed[-1]['top1']:.4f} ({', '.join(f'{t:.4f}' for t in top1)})",
              flush=True)
    autos = [train_once(args.config, betons, _seed_dir(runs, "lr-auto", seed), [*common, "--optim.lr=auto",
                        f"--train.seed={seed}"]) for seed in seeds]
    config = load_config(args.config, [f"--data.path={betons}", *common])
    # the sweep ran at the first epoch's batch size; optim.lr is for data.batch_size (one process)
    lr_scale = config.schedule_for_resolution().batch_size_at(0) / config.data.batch_size
    per_seed = [rule_suggestions(_seed_dir(runs, "lr-auto", seed), config.lr_finder.steps, lr_scale) for seed in seeds]
    suggestions = {rule: _geomean([row[rule] for row in per_seed]) for rule in per_seed[0]}
    val_images = split_size(betons, "val")
    best, noise, tied = best_and_tied(fixed, val_images)
    auto_lrs = [a["peak_lr"] for a in autos]
    auto_top1 = float(np.mean([a["final_val_top1"] for a in autos]))
    print(f"{name}: lr auto ({', '.join(f'{lr:.3g}' for lr in auto_lrs)}) -> val top-1 {auto_top1:.4f}; best fixed "
          f"lr {best['lr']:g} ({best['top1']:.4f}; within one standard error {noise:.4f}: "
          f"{', '.join(f'{lr:g}' for lr in tied)})", flush=True)
    return {"set": name, "fixed": fixed, "best_lr": best["lr"], "best_top1": best["top1"], "seeds": len(seeds),
            "val_images": val_images, "noise": noise, "best_range": [min(tied), max(tied)],
            "auto_lr": _geomean(auto_lrs), "auto_lrs": auto_lrs, "auto_top1": auto_top1,
            "auto_top1_seeds": [a["final_val_top1"] for a in autos],
            "auto_wall_s": float(np.mean([a["wall_time_s"] for a in autos])),
            "rules": suggestions, "rule": _rule(), "train_images": split_size(betons, "train")}


def best_and_tied(fixed: list[dict], val_images: int) -> tuple[dict, float, list[float]]:
    """The best row (highest mean top-1; among equals the lower val loss), the val set's standard error at
    its top-1, and the LRs whose top-1 lies within that error of the best."""
    best = max(fixed, key=lambda row: (row["top1"], -row["loss"]))
    noise = float(np.sqrt(best["top1"] * (1 - best["top1"]) / val_images))
    return best, noise, [row["lr"] for row in fixed if row["top1"] >= best["top1"] - noise]


def _geomean(values: list[float | None]) -> float | None:
    return None if any(v is None for v in values) else float(np.exp(np.mean(np.log(values))))


def _rule() -> str:
    return SUGGESTION_RULE


def within_2x(lr: float | None, row: dict) -> bool:
    """Whether `lr` lies within 2x of an LR whose top-1 is within one standard error of the best."""
    low, high = row.get("best_range", [row["best_lr"]] * 2)
    return lr is not None and low / 2 <= lr <= high * 2


def markdown(results: list[dict], lrs: list[float]) -> str:
    """Mean val top-1 per fixed LR; then each suggestion as a multiple of the best LR, marked ok when within
    2x of an LR whose top-1 is within one standard error of the best."""
    header = ["set", "train / val images", "seeds", *[f"lr {lr:g}" for lr in lrs], "best lr (within 1 s.e.)",
              "lr=auto (top-1)", "auto / best"] + [f"{rule} / best" for rule in results[0]["rules"]] if results else []
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for row in results:
        by_lr = {item["lr"]: item["top1"] for item in row["fixed"]}
        low, high = row.get("best_range", [row["best_lr"]] * 2)
        ties = f" ({low:g}-{high:g})" if low != high else ""

        def ratio(lr, row=row):
            return "-" if lr is None else f"{lr / row['best_lr']:.2f}x{' ok' if within_2x(lr, row) else ''}"

        cells = [row["set"], f"{row['train_images']:,} / {row.get('val_images', 0):,}", str(row.get("seeds", 1)), *[f"{by_lr[lr]:.3f}" if lr in by_lr else "-" for lr in lrs],
                 f"{row['best_lr']:g}{ties}", f"{row['auto_lr']:.3g} ({row['auto_top1']:.3f})", ratio(row["auto_lr"])]
        cells += [ratio(lr) for lr in row["rules"].values()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(results: list[dict], path: Path) -> Path:
    fig = Figure(figsize=(4.2 * max(len(results), 1), 3.8), dpi=110, layout="constrained")
    colors = {"edge": "black", "steepest": "tab:red", "min_loss_div10": "tab:green", "valley": "tab:orange", "min_loss": "tab:purple",
              "min_loss_div2": "tab:brown"}
    for index, row in enumerate(results):
        ax = fig.add_subplot(1, len(results), index + 1)
        ax.plot([item["lr"] for item in row["fixed"]], [item["top1"] for item in row["fixed"]], "o-",
                color="tab:blue", label="fixed peak LR (mean)")
        for item in row["fixed"]:
            ax.plot([item["lr"]] * len(item.get("top1_seeds", [])), item.get("top1_seeds", []), ".",
                    color="tab:blue", alpha=0.5)
        ax.plot([row["auto_lr"]], [row["auto_top1"]], "*", color="black", markersize=14, label="lr=auto (mean)")
        for rule, lr in row["rules"].items():
            if lr is not None:
                ax.axvline(lr, color=colors.get(rule, "0.5"), linestyle="--", linewidth=1, label=rule)
        low, high = row.get("best_range", [row["best_lr"]] * 2)
        ax.axvspan(low / 2, high * 2, color="tab:blue", alpha=0.08, label="within 2x of the best (1 s.e.)")
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
    rows = [{"set": row["set"], "kind": "fixed", "lr": item["lr"], "seed": seed, "val_top1": top1,
             "wall_s": item["wall_s"]}
            for row in results for item in row["fixed"] for seed, top1 in enumerate(item.get("top1_seeds", [item["top1"]]))]
    rows += [{"set": row["set"], "kind": "auto", "lr": lr, "seed": seed, "val_top1": top1, "wall_s": row["auto_wall_s"]}
             for row in results for seed, (lr, top1) in enumerate(zip(row.get("auto_lrs", [row["auto_lr"]]),
                                                                      row.get("auto_top1_seeds", [row["auto_top1"]])))]
    rows += [{"set": row["set"], "kind": f"rule:{rule}", "lr": lr} for row in results for rule, lr in row["rules"].items()]
    pd.DataFrame(rows).to_csv(path, index=False)
