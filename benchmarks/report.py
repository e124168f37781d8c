"""The report folder: results.json, results.csv, results.md and PNG plots, plus the printed table.

Every benchmark writes the same shape of payload: {"machine": ..., "settings": ..., "results": [rows],
"notes": [...]}, so `python -m benchmarks compare` can read any of them.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
from rich.console import Console
from rich.table import Table

from benchmarks.machine import describe

# Columns shown in tables, with their headers; rows may carry more keys (all go to JSON and CSV).
TABLE_COLUMNS = {
    "backend": "backend", "split": "split", "res": "res", "workers": "workers", "batch_size": "batch",
    "img_per_s": "img/s", "img_per_s_min": "min", "img_per_s_max": "max", "ratio_to_torch": "x torch",
    "peak_rss_mb": "peak RSS MB", "pss_mb": "PSS MB", "cpu_util_pct": "CPU %",
    "decoded_px_per_output_px": "decoded px/out px", "feed_us_per_sample": "feed µs/img",
    "epoch_start_batches": "start (batches)", "device": "device",
}


def make_console() -> Console:
    """A terminal-width console, but wide enough that tables in logs and pipes are not squeezed to 80."""
    console = Console()
    return console if console.is_terminal else Console(width=140)


def format_value(value, key: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float) and key.startswith("ratio"):
        return f"{value:.2f}"
    if isinstance(value, float):
        return f"{value:.2f}" if abs(value) < 10 else f"{value:,.0f}"
    return str(value)


def markdown_table(rows: list[dict], columns: dict[str, str]) -> str:
    # Hand-written: pandas' to_markdown needs `tabulate`, which is not a dependency.
    lines = ["| " + " | ".join(columns.values()) + " |",
             "|" + "|".join("---:" if key not in ("backend", "split", "device") else "---"
                            for key in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(format_value(row.get(key), key) for key in columns) + " |")
    return "\n".join(lines)


def rich_table(rows: list[dict], columns: dict[str, str], title: str | None = None) -> Table:
    table = Table(title=title)
    for key, header in columns.items():
        table.add_column(header, justify="left" if key in ("backend", "split", "device") else "right")
    for row in rows:
        table.add_row(*(format_value(row.get(key), key) for key in columns))
    return table


def print_table(rows: list[dict], columns: dict[str, str] | None = None, title: str | None = None,
                console: Console | None = None) -> None:
    (console or make_console()).print(rich_table(rows, columns or TABLE_COLUMNS, title))


def write_csv(path: Path, rows: list[dict]) -> None:
    keys = list(dict.fromkeys(key for row in rows for key in row))
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


def write_markdown(path: Path, payload: dict, title: str, columns: dict[str, str] | None = None) -> None:
    rows = payload["results"]
    columns = {key: header for key, header in (columns or TABLE_COLUMNS).items()
               if any(key in row for row in rows)}
    parts = [f"# {title}", "", f"Machine: {describe(payload['machine'])}", ""]
    settings = payload.get("settings") or {}
    if settings:
        parts += ["Settings: " + ", ".join(f"{key}={value}" for key, value in settings.items()), ""]
    parts += [markdown_table(rows, columns) if rows else "No results.", ""]
    if payload.get("legend"):
        parts += ["Columns:", "", *(f"- {line}" for line in payload["legend"]), ""]
    if payload.get("notes"):
        parts += ["Notes:", "", *(f"- {note}" for note in payload["notes"]), ""]
    path.write_text("\n".join(parts))


def _series(rows: list[dict], group_keys: tuple[str, ...], x_key: str):
    """Group rows into plot lines: {(group values): sorted [(x, median, min, max)]}."""
    lines: dict[tuple, list] = {}
    for row in rows:
        if row.get("img_per_s") is None:
            continue
        key = tuple(row[k] for k in group_keys)
        lines.setdefault(key, []).append(
            (row[x_key], row["img_per_s"], row.get("img_per_s_min", row["img_per_s"]),
             row.get("img_per_s_max", row["img_per_s"])))
    return {key: sorted(points) for key, points in sorted(lines.items(), key=lambda item: str(item[0]))}


def _plot(path: Path, rows: list[dict], x_key: str, group_keys: tuple[str, ...], xlabel: str,
          title: str) -> None:
    matplotlib.use("Agg")   # files only; never needs a display

    fig, ax = plt.subplots(figsize=(7, 4.5))
    # One colour per backend in every plot; the second grouping key changes the line style.
    backends = sorted({row["backend"] for row in rows})
    colours = {name: f"C{index % 10}" for index, name in enumerate(backends)}
    second = sorted({row[group_keys[1]] for row in rows}) if len(group_keys) > 1 else []
    styles = ["-", "--", ":", "-."]
    for key, points in _series(rows, group_keys, x_key).items():
        xs = [p[0] for p in points]
        medians = [p[1] for p in points]
        low = [p[1] - p[2] for p in points]
        high = [p[3] - p[1] for p in points]
        label = ", ".join(f"{k}={v}" if k != "backend" else str(v) for k, v in zip(group_keys, key))
        style = styles[second.index(key[1]) % len(styles)] if second else "-"
        ax.errorbar(xs, medians, yerr=[low, high], marker="o", capsize=3, label=label,
                    color=colours.get(key[0]), linestyle=style)
    ax.set_xticks(sorted({row[x_key] for row in rows}))
    ax.set_xlabel(xlabel)
    ax.set_ylabel("images / s (median, min-max)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_loader_plots(out_dir: Path, rows: list[dict]) -> list[Path]:
    paths = [out_dir / "img_per_s_vs_workers.png", out_dir / "img_per_s_vs_resolution.png"]
    _plot(paths[0], rows, "workers", ("backend", "res"), "loader workers", "Loader throughput vs workers")
    _plot(paths[1], rows, "res", ("backend", "workers"), "resolution (px)", "Loader throughput vs resolution")
    return paths


def write_report(out_dir: str | Path, payload: dict, title: str, plots: bool = True,
                 columns: dict[str, str] | None = None) -> list[Path]:
    """Write JSON, CSV, Markdown (and plots for loader rows) into `out_dir`; returns the paths written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "results.json", out_dir / "results.csv", out_dir / "results.md"]
    written[0].write_text(json.dumps(payload, indent=2) + "\n")
    write_csv(written[1], payload["results"])
    write_markdown(written[2], payload, title, columns)
    if plots:
        written += write_loader_plots(out_dir, payload["results"])
    return written


def load_results(path: str | Path) -> dict:
    """Read a results JSON written by any benchmark, with errors that say what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"error: no results file at {path}. Run `python -m benchmarks loaders --out DIR` "
                         f"and pass DIR/results.json.")
    try:
        payload = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise SystemExit(f"error: {path} is not valid JSON ({exc}).") from exc
    if not isinstance(payload, dict) or not isinstance(payload.get("results"), list):
        raise SystemExit(f"error: {path} has no `results` list; is it a benchmark report?")
    return payload
