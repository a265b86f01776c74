"""Sequences in flight: how many generate calls an agent-loop worker has at the inference servers, over a step.

A GPU decodes memory-bound, so the sequences in flight decide a rollout's time (issue 29). Each verl agent-loop
worker process counts its own (`IN_FLIGHT`, one per process), and every tree it finishes carries a snapshot of the
step so far; the trainer keeps each worker's latest snapshot and logs `carl/seqs_in_flight_mean` (the time-weighted
mean over the step's rollout, averaged over workers) and `carl/seqs_in_flight_min` (the lowest of the ten
tenths-of-the-rollout means, over workers: how far the tail drops). The rollout-time model
(`benchmarks.rollout_time`) reports the same two numbers, computed by the same `summarize`.

The tail (`TailBoost`, `algorithm.carl.tail_forks_in_flight`): once most of a worker's trees have ended, its last
ones hold the step with K forks each. From then on those stragglers run up to `tail_forks_in_flight` forks at once.
When the boost starts depends on timing, so fork choices do too: under `rollout.full_determinism` it is refused.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from carl_core.forking import Tail


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
        first, last = int((t - start) / span), int((t_next - start) / span)  # the windows the segment touches
        for w in range(max(first, 0), min(last, windows - 1) + 1):
            lo, hi = max(t, start + w * span), min(t_next, start + (w + 1) * span if w < windows - 1 else end)
            area[w] += count * max(0.0, hi - lo)
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


class TailBoost:
    """One step's straggler boost in one agent-loop worker: every tree joins before the first await (as the fork
    pool's trees do, `recipe.carl.pool.ForkPool`); once at most `ceil(share x trees)` of them are still growing, the
    rest run up to `forks_in_flight` forks at once (`carl_core.forking.grow_tree`'s `tail`)."""

    def __init__(self, forks_in_flight: int, share: float) -> None:
        self.share, self.trees, self.ended = share, 0, 0
        self.tail = Tail(asyncio.Event(), forks_in_flight)

    def join(self) -> Tail:
        self.trees += 1
        return self.tail

    def end(self) -> None:
        self.ended += 1
        if self.trees - self.ended <= math.ceil(self.share * self.trees):
            self.tail.event.set()


class TailBoosts:
    """The worker process's boosts, one per training step (the agent loop's `TAILS`)."""

    def __init__(self) -> None:
        self.steps: dict[int, TailBoost] = {}

    def get(self, step: int, forks_in_flight: int, share: float) -> TailBoost:
        if step not in self.steps:
            self.steps[step] = TailBoost(forks_in_flight, share)
        for old in [s for s in self.steps if s < step - 2]:
            del self.steps[old]
        return self.steps[step]


TAILS = TailBoosts()
