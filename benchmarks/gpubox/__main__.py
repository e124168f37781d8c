"""`python -m benchmarks.gpubox {wheelhouse,sim} ...` (what `make wheelhouse` and `make gpubox-sim` run)."""
from __future__ import annotations

import sys

from benchmarks.gpubox import sim, wheelhouse

COMMANDS = {"wheelhouse": wheelhouse.main, "sim": sim.main}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: python -m benchmarks.gpubox {{{','.join(COMMANDS)}}} [--help]", file=sys.stderr)
        return 2
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
