"""Sequences in flight: how many generate calls an agent-loop worker has at the inference servers, over a step.

A GPU decodes memory-bound, so the sequences in flight decide a rollout's time (issue 29). Each verl agent-loop
worker process counts its own (`IN_FLIGHT`, one per process), and every tree it finishes carries a snapshot of the
step so far; the trainer keeps each worker's latest snapshot and logs `carl/seqs_in_flight_mean` (the time-weighted
mean over the step's rollout, averaged over workers) and `carl/seqs_in_flight_min` (the lowest of the ten
tenths-of-the-rollout means, over workers: how far the tail drops). The rollout-time model
(`benchmarks.rollout_time`) reports the same two numbers, computed by the same `summarize`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any


def summarize(events: Sequence[tuple[float, int]], end: float, windows: int = 10) -> tuple[float, float]:
    """The time-weighted mean of a count over [events[0] time, end], and the lowest mean over `windows` equal parts.

    Args:
        events: (time, count after the change), in time order; the first sets the start.
        end: the end of the period (>= the last event's time).

    Returns:
        (mean, lowest window mean); (0, 0) for an empty period.
    """
    if not events or end <= events[0][0]:
        return 0.0, 0.0
    start = events[0][0]
    span = (end - start) / windows
    area = [0.0] * windows
    points = [*events, (end, events[-1][1])]
    for (t, count), (t_next, _) in zip(points, points[1:], strict=False):
        while t < t_next:  # spread the segment [t, t_next) over the windows it covers
            w = min(int((t - start) / span), windows - 1)
            stop = min(t_next, start + (w + 1) * span) if w < windows - 1 else t_next
            area[w] += count * (stop - t)
            t = stop
    means = [a / span for a in area]
    return sum(means) / windows, min(means)


class InFlight:
    """Generate calls of this process in flight, per training step (a few steps are kept)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.steps: dict[int, list[tuple[float, int]]] = {}

    def change(self, step: int, delta: int) -> None:
        now = self.clock()
        events = self.steps.setdefault(step, [(now, 0)])
        events.append((now, events[-1][1] + delta))
        for old in [s for s in self.steps if s < step - 2]:
            del self.steps[old]

    def snapshot(self, step: int) -> dict[str, Any]:
        """This worker's step so far: `{"worker", "end", "mean", "min"}`."""
        now = self.clock()
        mean, low = summarize(self.steps.get(step, []), now)
        return {"worker": os.getpid(), "end": now, "mean": mean, "min": low}


IN_FLIGHT = InFlight()
"""The agent-loop worker process's counter (one asyncio loop per worker: no lock needed)."""


def in_flight_metrics(snapshots: Iterable[dict[str, Any] | None]) -> dict[str, float]:
    """`carl/seqs_in_flight_{mean,min}` from the step's trees' snapshots: each worker's latest one counts."""
    latest: dict[Any, dict[str, Any]] = {}
    for snap in snapshots:
        if snap and (snap["worker"] not in latest or snap["end"] > latest[snap["worker"]]["end"]):
            latest[snap["worker"]] = snap
    if not latest:
        return {}
    return {
        "carl/seqs_in_flight_mean": sum(s["mean"] for s in latest.values()) / len(latest),
        "carl/seqs_in_flight_min": min(s["min"] for s in latest.values()),
    }
