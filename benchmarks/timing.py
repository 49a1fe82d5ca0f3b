"""Median step times of several callables measured in turns, so that a noisy neighbour (other
processes on a shared machine) slows every variant alike instead of whichever ran last."""

from __future__ import annotations

import statistics
import time
from typing import Callable


def time_in_turns(steps: dict[str, Callable[[], None]], *, rounds: int, steps_per_round: int = 1,
                  warmup: int = 1, sync: Callable[[], None] = lambda: None) -> dict[str, list[float]]:
    """Seconds per step of each callable: one value per round (the mean of that round's
    `steps_per_round` calls). The order of the variants rotates every round."""
    names = list(steps)
    for name in names:
        for _ in range(warmup):
            steps[name]()
    sync()
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            for _ in range(steps_per_round):
                steps[name]()
            sync()
            seconds[name].append((time.perf_counter() - start) / steps_per_round)
    return seconds


def median(values: list[float]) -> float:
    return statistics.median(values)


def spread(values: list[float]) -> float:
    """Relative spread (max - min) / median: how much to trust a median."""
    mid = statistics.median(values)
    return (max(values) - min(values)) / mid if mid else 0.0
