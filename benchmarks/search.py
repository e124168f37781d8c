"""Successive halving under a wall-clock budget: the search core of `python -m benchmarks autotune`.

Every candidate is measured briefly, the better half is measured again for twice as long, and so on
until one is left. Before each trial the cost is estimated from the trials so far, and the search
stops (keeping what it has) when the budget would be exceeded: a full grid is never run.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field


class Budget:
    """A wall-clock deadline shared by every phase of a tuning run."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic):
        self.seconds = seconds
        self.clock = clock
        self.start = clock()

    @property
    def elapsed(self) -> float:
        return self.clock() - self.start

    @property
    def remaining(self) -> float:
        return self.seconds - self.elapsed

    def allows(self, estimate_s: float) -> bool:
        return self.remaining > 0 and estimate_s <= self.remaining

    def share(self, parts: int) -> Budget:
        """A sub-budget: an equal share of what remains among `parts` pending phases."""
        return Budget(max(0.0, self.remaining) / max(1, parts), self.clock)


@dataclass
class Trial:
    candidate: Hashable
    rung: int
    units: int
    score: float | None   # None: the candidate failed (out of memory, error)
    seconds: float
    note: str = ""
    started_s: float = 0.0   # offset into the budget when the trial began


@dataclass
class SearchResult:
    best: Hashable | None
    best_score: float | None
    trials: list[Trial] = field(default_factory=list)
    complete: bool = True   # False when the budget stopped the search early
    reason: str = ""


def successive_halving(candidates: list[Hashable], evaluate: Callable[[Hashable, int], float],
                       budget: Budget, min_units: int = 2, eta: int = 2, max_units: int | None = None,
                       prefer: Callable[[Hashable], float] | None = None,
                       first_estimate: float = 0.0) -> SearchResult:
    """Find the candidate with the highest `evaluate(candidate, units)` score.

    `units` is the measurement length (batches or steps), `min_units` on the first rung and times
    `eta` on each later one. A candidate whose evaluation raises is dropped with the error as its note.
    `prefer` breaks near-ties (scores within 2%): the candidate with the larger `prefer` value wins.
    `first_estimate` is the expected cost of the first trial (e.g. from an earlier, similar search).
    """
    if not candidates:
        raise ValueError("successive halving needs at least one candidate")
    if eta < 2 or min_units < 1:
        raise ValueError("successive halving needs eta >= 2 and min_units >= 1")
    result = SearchResult(best=None, best_score=None)
    survivors = list(dict.fromkeys(candidates))
    units, rung = min_units, 0
    previous = first_estimate   # slowest trial of the previous rung, scaled to this rung's length
    while survivors:
        scored: list[tuple[float, Hashable]] = []
        durations: list[float] = []
        for candidate in survivors:
            # The slowest trial so far: overestimating stops early, underestimating overruns the budget.
            estimate = max(durations, default=previous)
            if not budget.allows(estimate):
                result.complete = False
                result.reason = (f"time budget reached after {budget.elapsed:.1f} s "
                                 f"(next trial estimated at {estimate:.1f} s)")
                break
            start = budget.clock()
            note = ""
            try:
                score = float(evaluate(candidate, units))
            except Exception as exc:  # noqa: BLE001 - e.g. out of memory: drop it, go on
                score, note = None, f"{type(exc).__name__}: {exc}"[:200]
            seconds = budget.clock() - start
            durations.append(seconds)
            result.trials.append(Trial(candidate, rung, units, score, seconds, note, start - budget.start))
            if score is not None and math.isfinite(score):
                scored.append((score, candidate))
        if scored:
            result.best, result.best_score = _pick(scored, prefer)
        if not result.complete or len(survivors) == 1:
            break
        keep = max(1, math.ceil(len(scored) / eta))
        survivors = [candidate for _, candidate in sorted(scored, key=lambda item: -item[0])[:keep]]
        if max_units is not None and units * eta > max_units:
            break
        previous = max(durations, default=0.0) * eta
        units *= eta
        rung += 1
    if result.best is None and not result.reason:
        result.reason = "every candidate failed"
    return result


def _pick(scored: list[tuple[float, Hashable]], prefer) -> tuple[Hashable, float]:
    top = max(score for score, _ in scored)
    if prefer is None:
        return next((candidate, score) for score, candidate in scored if score == top)
    close = [(score, candidate) for score, candidate in scored if score >= 0.98 * top]
    score, candidate = max(close, key=lambda item: (prefer(item[1]), item[0]))
    return candidate, score
