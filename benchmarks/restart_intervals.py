"""`python -m benchmarks restart-intervals`: how long the stored JPEGs' restart intervals should be.

The same images are encoded once per interval rule (none; `restarts.restart_interval` aiming at 1, 2, 4 or
8 MCUs; one interval per MCU row) and the crop decoder decodes the same random-resized crops (FFCV's crop
draw, 8 per image) from each, on one core, the rules taking turns every round. Printed per storage size and
rule: the bytes over the same JPEGs without intervals, µs per crop (best round) and its ratio to no intervals
and to a full decode alone (FFCV's imdecode of the file without intervals: the issue's yardstick), and the
share of the entropy-coded bytes the decoder read. Shorter intervals read less of each row but cost more
bytes, more so on smooth real photographs than on noisy generated ones: run it on both (`--images skimage`,
or a folder of your own photos). restarts.TARGET_MCUS comes from this table.
"""
from __future__ import annotations

import statistics
import textwrap
import time
from pathlib import Path

import numpy as np

from benchmarks.machine import describe, machine_info
from benchmarks.report import print_table, write_report

COLUMNS = {"side": "stored px", "rule": "interval rule", "interval_mcus": "MCUs (median)",
           "bytes_over_pct": "bytes over none %", "us_per_crop": "µs/crop", "vs_none": "vs none",
           "of_full_decode": "of full decode", "entropy_read_share": "entropy bytes read"}
STORAGE_CAP_PCT = 3   # what restart intervals may add to a JPEG beton (the plot's line)


def add_arguments(parser) -> None:
    parser.add_argument("--images", default="generated",
                        help="generated, skimage (scikit-image's colour photographs) or a folder of images "
                             "(default: %(default)s)")
    parser.add_argument("--count", type=int, default=24, help="images per storage size (default: %(default)s)")
    parser.add_argument("--sides", default="256,512", help="storage sizes: longest side in px (default: %(default)s)")
    parser.add_argument("--targets", default="1,2,4,8,row",
                        help="interval rules: target MCUs, or row (default: %(default)s; 'none' is always run)")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality (the converter's default: %(default)s)")
    parser.add_argument("--crops", type=int, default=8, help="random-resized crops per image (default: %(default)s)")
    parser.add_argument("--res", type=int, default=160, help="output resolution (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds (default: %(default)s)")
    parser.add_argument("--out", default="runs/bench/restart-intervals", help="report folder")


def parse_targets(text: str) -> list[str]:
    rules = ["none"]
    for part in (piece.strip() for piece in text.split(",")):
        if part in ("row", "none"):
            rules += [part] if part not in rules else []
        elif part.isdigit() and int(part) >= 1:
            rules.append(part)
        elif part:
            raise SystemExit(f"--targets: {part!r} is neither a number of MCUs (1 or more) nor 'row'")
    return rules


def interval_for(rule: str, width: int) -> int:
    from fastpipe.data.restarts import mcu_columns, restart_interval

    columns = mcu_columns(width)
    return 0 if rule == "none" else columns if rule == "row" else restart_interval(columns, int(rule))


def draw_crops(images: list[np.ndarray], per_image: int) -> list[list[tuple]]:
    from ffcv.fields.rgb_image import get_random_crop  # compiles numba on import: only this benchmark

    crops = []
    for index, image in enumerate(images):
        np.random.seed(index)   # FFCV draws from numpy's global generator
        crops.append([tuple(get_random_crop(*image.shape[:2], np.array([0.08, 1.0]), np.array([3 / 4, 4 / 3])))
                      for _ in range(per_image)])
    return crops


def sweep(images: list[np.ndarray], rules: list[str], side: int, args) -> list[dict]:
    """One storage size: every rule's bytes, best-round µs per crop and read shares."""
    from ffcv.libffcv import imdecode  # ffcv: as above

    from fastpipe.data import crop_decode
    from fastpipe.data.restarts import encode_jpeg

    encoded = {rule: [encode_jpeg(image, args.quality, interval_for(rule, image.shape[1])) for image in images]
               for rule in rules}
    crops = draw_crops(images, args.crops)
    out = np.zeros((args.res, args.res, 3), np.uint8)
    scratch = np.zeros(max(image.size for image in images), np.uint8)

    def decode_crops(files) -> float:
        started = time.perf_counter()
        for jpeg, image, boxes in zip(files, images, crops):
            for top, left, height, width in boxes:
                crop_decode.decode_crop(jpeg, *image.shape[:2], top, left, height, width, out, 0,
                                        crop_decode.MAX_DENOM)
        return (time.perf_counter() - started) / (len(files) * args.crops) * 1e6

    def decode_full() -> float:
        started = time.perf_counter()
        for jpeg, image in zip(encoded["none"], images):
            height, width = image.shape[:2]
            imdecode(jpeg, scratch, height, width, height, width, 0, 0, 1, 1, False, False)
        return (time.perf_counter() - started) / len(images) * 1e6

    decode_full()
    for rule in rules:   # warm-up: caches, the decoder's buffers
        decode_crops(encoded[rule])
    times: dict[str, list[float]] = {rule: [] for rule in rules + ["full"]}
    for round_ in range(args.rounds):
        order = rules if round_ % 2 == 0 else rules[::-1]
        for rule in order:
            times[rule].append(decode_crops(encoded[rule]))
        times["full"].append(decode_full())
    full, plain_bytes = min(times["full"]), sum(len(jpeg) for jpeg in encoded["none"])
    rows = []
    for rule in rules:
        crop_decode.reset_counters()
        decode_crops(encoded[rule])
        work = crop_decode.read_counters()
        best = min(times[rule])
        rows.append({
            "side": side, "rule": rule,
            "interval_mcus": round(statistics.median(interval_for(rule, image.shape[1]) for image in images), 1),
            "bytes_over_pct": round((sum(len(jpeg) for jpeg in encoded[rule]) / plain_bytes - 1) * 100, 2),
            "us_per_crop": round(best, 1), "us_per_crop_median": round(statistics.median(times[rule]), 1),
            "vs_none": round(best / min(times["none"]), 3), "of_full_decode": round(best / full, 3),
            "full_decode_us": round(full, 1),
            "entropy_read_share": round(work["entropy_bytes_read"] / max(work["entropy_bytes"], 1), 3),
            "restart_decodes_share": round(work["restart_decodes"] / max(work["samples"], 1), 3)})
    return rows


def plot(path: Path, rows: list[dict], title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for index, side in enumerate(sorted({row["side"] for row in rows})):
        points = sorted((row for row in rows if row["side"] == side), key=lambda row: row["bytes_over_pct"])
        ax.plot([row["bytes_over_pct"] for row in points], [row["vs_none"] for row in points], marker="o",
                color=f"C{index}", label=f"stored at {side} px")
        for row in points:
            ax.annotate(row["rule"], (row["bytes_over_pct"], row["vs_none"]), textcoords="offset points",
                        xytext=(4, 4), fontsize=8)
    ax.axvline(STORAGE_CAP_PCT, color="grey", linestyle="--", linewidth=1)
    ax.annotate(f"{STORAGE_CAP_PCT:g}% storage cap", (STORAGE_CAP_PCT, 1.0), textcoords="offset points",
                xytext=(4, -10), fontsize=8, color="grey")
    ax.set_xlabel("bytes over the same JPEGs without intervals (%)")
    ax.set_ylabel("crop decoder time / without intervals")
    ax.set_title(textwrap.fill(title, 90), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(args) -> int:
    from benchmarks.photos import load
    from fastpipe.data import crop_decode

    if not crop_decode.available():
        raise SystemExit(crop_decode.MISSING)
    rules = parse_targets(args.targets)
    try:
        sides = [int(side) for side in args.sides.split(",") if side.strip()]
    except ValueError:
        raise SystemExit(f"--sides: {args.sides!r} is not a comma-separated list of sizes in px") from None
    if not sides or min(sides) < 16 or args.count < 1 or args.crops < 1 or args.rounds < 1:
        raise SystemExit("--sides (16 px or more), --count, --crops and --rounds need positive values")
    rows = []
    for side in sides:
        images = load(args.images, side, args.count)
        rows += sweep(images, rules, side, args)
        print(f"stored at {side} px: " + ", ".join(f"{row['rule']} {row['us_per_crop']:.0f} µs"
                                                  for row in rows if row["side"] == side))
    machine = machine_info()
    title = (f"restart intervals: {args.images} images x {args.count}, quality {args.quality}, {args.crops} crops "
             f"each to {args.res} px, one core ({describe(machine)})")
    print_table(rows, COLUMNS, title)
    write_report(args.out, {"machine": machine, "images": args.images, "quality": args.quality, "results": rows},
                 title, plots=False, columns=COLUMNS)
    plot(Path(args.out) / "restart-intervals.png", rows, title)
    return 0
