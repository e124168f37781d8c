"""`python -m benchmarks quality`: what the recipes reach. Trains each recipe on each small-image set
(`benchmarks.quality.sets`: the synthetic set, the hard set, scikit-learn's digits, a 4,000-image part of
Fashion-MNIST; `--sets fashion` for all of it) and prints val top-1 and wall time per run; writes
results.json and results.md to --out. Finished runs are kept and skipped.

Recipes: `small` is configs/small.toml as shipped; `r18-imagenet` is r18.toml at the same resolution,
batch size and LR finder with the ImageNet stem and ImageNet augmentation defaults (the starting point).
"""
from __future__ import annotations

import json
from pathlib import Path

from benchmarks.quality.sets import BENCH_SETS, REAL_SETS, SETS, prepare, split_size, train_once

ACCEPTS_CONFIG_OVERRIDES = True
RECIPES = {
    "small": ("small.toml", []),
    "r18-imagenet": ("r18.toml", ["--resolution.start=32", "--resolution.end=32", "--resolution.val=32",
                                  "--data.batch_size=128", "--optim.lr=auto", "--model.stem=imagenet",
                                  "--augment.min_scale=0.08", "--schedule.epochs=10"]),
}


def add_arguments(parser) -> None:
    parser.add_argument("--recipes", default=",".join(RECIPES), help="(default: %(default)s)")
    parser.add_argument("--sets", default=",".join(BENCH_SETS),
                        help=f"data sets, of {', '.join(SETS + REAL_SETS)} (default: %(default)s; `fashion`, "
                             "all 60,000 train images, trains small.toml for about 17 minutes on 2 cores)")
    parser.add_argument("--data-root", default="data/small", help="where the sets are written (default: %(default)s)")
    parser.add_argument("--per-class", type=int, default=150, help="train images per class of the generated sets")
    parser.add_argument("--out", default="runs/quality", help="output folder (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="a tiny synthetic set, one epoch: checks the command")


def markdown(rows: list[dict]) -> str:
    lines = ["| recipe | set | train images | epochs | val top-1 | wall time | img/s (train) | peak lr |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['recipe']} | {row['set']} | {row['train_images']:,} | {row['epochs']} | "
                     f"{row['top1']:.3f} | {row['wall_s']:.0f} s | {row['images_per_second']:,.0f} | "
                     f"{row['peak_lr']:.3g} |")
    return "\n".join(lines) + "\n"


def run(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    recipes, sets = args.recipes.split(","), args.sets.split(",")
    overrides = list(getattr(args, "overrides", []))
    sizes = {"per_class": args.per_class, "val_per_class": max(1, args.per_class // 5)}
    root = Path(args.data_root)
    if args.quick:
        sets, sizes, root = ["synthetic"], {"per_class": 12, "val_per_class": 4}, out / "data"
        overrides = ["--schedule.epochs=1", "--data.batch_size=16", "--lr_finder.steps=10", "--data.workers=1",
                     *overrides]
    unknown = [name for name in recipes if name not in RECIPES]
    if unknown:
        print(f"error: unknown recipe {', '.join(unknown)}; choose from {', '.join(RECIPES)}")
        return 2
    store = out / "results.json"
    rows = {(r["recipe"], r["set"]): r for r in json.loads(store.read_text())} if store.is_file() else {}
    for name in sets:
        betons = prepare(name, root, **sizes)
        for recipe in recipes:
            config_name, recipe_overrides = RECIPES[recipe]
            run_dir = out / "runs" / f"{recipe}-{name}"
            summary = train_once(config_name, betons, run_dir, [*recipe_overrides, *overrides])
            rows[recipe, name] = {
                "recipe": recipe, "set": name, "train_images": split_size(betons, "train"),
                "epochs": int(summary["epochs"]), "top1": float(summary["final_val_top1"]),
                "wall_s": float(summary["wall_time_s"]), "images_per_second": float(summary["mean_images_per_second"]),
                "peak_lr": float(summary["peak_lr"]), "run_dir": str(run_dir)}
            print(f"{recipe} on {name}: val top-1 {summary['final_val_top1']:.4f} in {summary['wall_time_s']:.0f} s",
                  flush=True)
            store.write_text(json.dumps(list(rows.values()), indent=2) + "\n")
    table = markdown(list(rows.values()))
    (out / "results.md").write_text(table)
    print(table)
    print(f"Outputs: {store}  {out / 'results.md'}")
    return 0
