"""`python -m benchmarks compare A.json B.json`: matching rows side by side with the ratio B/A.

Rows match on (backend, split, res, workers, batch_size). A ratio below 1 - threshold is a
regression, above 1 + threshold a gain; `--fail-on-regression` turns a regression into exit code 1.
"""
from __future__ import annotations

from benchmarks.machine import describe
from benchmarks.report import load_results, make_console, print_table

KEY = ("backend", "split", "res", "workers", "batch_size")
COLUMNS = {"backend": "backend", "split": "split", "res": "res", "workers": "workers",
           "batch_size": "batch", "a": "A", "b": "B", "ratio": "B/A", "status": "status", "note": "note"}


def row_key(row: dict) -> tuple:
    return tuple(row.get(name) for name in KEY)


def compare_rows(rows_a: list[dict], rows_b: list[dict], metric: str = "img_per_s",
                 threshold: float = 0.05) -> list[dict]:
    """One entry per key of A, then B's new keys; status: regression, gain, same, only in A/B."""
    by_a = {row_key(row): row for row in rows_a}
    by_b = {row_key(row): row for row in rows_b}
    compared = []
    for key in dict.fromkeys([*by_a, *by_b]):
        row_a = by_a.get(key, {})
        a, b = row_a.get(metric), by_b.get(key, {}).get(metric)
        entry = dict(zip(KEY, key), a=a, b=b, ratio=None, note="")
        if a is None or b is None:
            entry["status"] = "only in A" if b is None else "only in B"
        elif a <= 0:
            entry["status"] = "A is zero"
        else:
            entry["ratio"] = round(b / a, 3)
            entry["status"] = ("regression" if entry["ratio"] < 1 - threshold
                               else "gain" if entry["ratio"] > 1 + threshold else "same")
            low, high = row_a.get(f"{metric}_min"), row_a.get(f"{metric}_max")
            if entry["status"] != "same" and low is not None and high is not None and low <= b <= high:
                entry["note"] = "in A's range"   # B's median inside A's min-max: maybe noise
        compared.append(entry)
    return compared


def add_arguments(parser) -> None:
    parser.add_argument("a", help="results JSON of the reference run")
    parser.add_argument("b", help="results JSON of the new run")
    parser.add_argument("--threshold", type=float, default=0.05,
                        help="relative change that counts as a regression or gain (default 0.05)")
    parser.add_argument("--metric", default="img_per_s", help="row field to compare (default img_per_s)")
    parser.add_argument("--fail-on-regression", action="store_true", help="exit 1 when any row regressed")


def run(args) -> int:
    if not 0 <= args.threshold < 1:
        raise SystemExit(f"error: --threshold must be in [0, 1), got {args.threshold}")
    console = make_console()
    payload_a, payload_b = load_results(args.a), load_results(args.b)
    compared = compare_rows(payload_a["results"], payload_b["results"], args.metric, args.threshold)
    if not compared:
        raise SystemExit("error: both reports have no rows to compare.")
    styles = {"regression": "red", "gain": "green"}
    shown = [dict(entry, status=f"[{styles[entry['status']]}]{entry['status']}[/]"
                  if entry["status"] in styles else entry["status"]) for entry in compared]
    print_table(shown, COLUMNS, title=f"{args.metric}: A={args.a}  B={args.b}", console=console)
    for name, payload in (("A", payload_a), ("B", payload_b)):
        if "machine" in payload:
            console.print(f"{name}: {describe(payload['machine'])}")
    if payload_a.get("machine", {}).get("cpu_model") != payload_b.get("machine", {}).get("cpu_model"):
        console.print("[yellow]warning: the two reports come from different CPUs[/yellow]")
    regressions = [entry for entry in compared if entry["status"] == "regression"]
    gains = sum(entry["status"] == "gain" for entry in compared)
    console.print(f"{len(regressions)} regression(s), {gains} gain(s) beyond {args.threshold:.0%}")
    return 1 if regressions and args.fail_on_regression else 0
