"""A simulated inference server on a virtual clock: what the rollout-time model (`benchmarks.rollout_time`) runs the
real scheduler against.

    VirtualClockLoop       an asyncio event loop whose clock jumps to the next timer instead of waiting for it
    ServerModel            the cost of one engine step, prefill, KV capacity: the numbers a replica is made of
    Replica                continuous batching (vLLM's scheduler, simplified): admit, prefill, decode, preempt
    Router                 verl's request routing: a request id sticks to its first replica, new ids go to the
                           replica with the fewest requests in flight (`GlobalRequestLoadBalancer`)

A replica runs engine steps back to back while it has work. Each step decodes one token of every running sequence
and prefills the new sequences admitted at its start:

    t_step = t0 + t1 * b + t2 * C / 1000 + p * prefill_tokens

with b the running sequences and C their summed context (tokens). Between two events (a sequence finishes, a request
arrives, the KV cache fills) the batch does not change, so the replica computes the steps up to the next event in
closed form instead of one at a time. Prefix caching: a request's prefix is served from the replica's cache up to the
longest state of the same tree (or, for its prompt, the same question) that the replica has computed before, in whole
blocks; cached blocks are never evicted (the model's optimistic side: a GRPO step that preempts loses some in vLLM).
KV capacity: a running sequence holds its context less its cache hit; each tree's shared prefix is held once. When a
step would overflow it, the most recently admitted sequence is preempted (vLLM's recompute mode): it goes back to the
front of the queue and recomputes its context, less its cache hit, when admitted again.

Why not vLLM's own scheduler: it needs a GPU (or vLLM's CPU build and real forward passes) and runs in real time; the
model must price a 1,000-GPU-second step on this 2-core machine in seconds. Its prediction is checked against real
wall times on vLLM's CPU build (`python -m benchmarks.rollout_time_cpu`).
"""

from __future__ import annotations

import asyncio
import itertools
import math
import random
import selectors
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field


class _InstantSelector(selectors.SelectSelector):
    """A selector that never waits: asked to wait `timeout` seconds, it moves the loop's clock on by that much."""

    def __init__(self, loop: VirtualClockLoop) -> None:
        super().__init__()
        self.loop = loop

    def select(self, timeout: float | None = None) -> list:
        if timeout is None:
            raise RuntimeError("the simulation is stuck: every task waits and no timer is set (a lost wake-up?)")
        self.loop.now += max(timeout, 0.0)
        return []


class VirtualClockLoop(asyncio.SelectorEventLoop):
    """asyncio on simulated time: `asyncio.sleep(5)` returns at once with `loop.time()` 5 s later. Only timers and
    futures may be awaited (no sockets, threads or subprocesses)."""

    def __init__(self) -> None:
        self.now = 0.0
        super().__init__(_InstantSelector(self))

    def time(self) -> float:
        return self.now


@dataclass(frozen=True)
class ServerModel:
    """One inference replica's costs (seconds and tokens)."""

    t0: float
    """Fixed cost of an engine step (weights read once; s)."""
    t1: float
    """Added cost per running sequence (s)."""
    t2: float = 0.0
    """Added cost per 1,000 tokens of context held by the running sequences (attention reads the KV cache; s)."""
    prefill_s_per_token: float = 0.0
    """Cost of prefilling one token that the prefix cache does not hold (s)."""
    max_num_seqs: int = 256
    """Most sequences running at once (vLLM's `max_num_seqs`)."""
    kv_tokens: int = 10**9
    """KV-cache capacity in tokens."""
    block: int = 16
    """Prefix-cache granularity in tokens (vLLM's block size)."""
    prefix_caching: bool = True

    def steps_time(self, k: int, b: int, context: int) -> float:
        """Time of k decode steps of b sequences whose summed context starts at `context` and grows b per step."""
        return k * (self.t0 + self.t1 * b + self.t2 * context / 1000) + self.t2 * b * k * (k - 1) / 2000

    def steps_within(self, elapsed: float, b: int, context: int, k: int) -> int:
        """Steps begun within `elapsed` seconds (the step in progress counts: it finishes before anything changes)."""
        lo, hi = 0, k
        while lo < hi:  # the smallest s with steps_time(s) >= elapsed
            mid = (lo + hi) // 2
            if self.steps_time(mid, b, context) >= elapsed:
                hi = mid
            else:
                lo = mid + 1
        return max(lo, 1)


@dataclass
class Request:
    """One generate call: `prefix` tokens in (their cache keys in `path`, shortest first), `new_tokens` out."""

    group: Hashable  # what shares KV with this request on a replica (the tree, or the question's prompt)
    path: Sequence[tuple[Hashable, int]]  # (cache key, prefix length) of every state this prefix extends
    prefix: int
    new_tokens: int
    done: asyncio.Future = field(repr=False, default=None)  # type: ignore[assignment]
    generated: int = 0
    hit: int = 0
    order: int = 0

    @property
    def context(self) -> int:
        return self.prefix + self.generated


class Replica:
    """Continuous batching on one simulated replica; `await generate(request)` returns when its tokens are out."""

    def __init__(self, model: ServerModel, name: str = "r0") -> None:
        self.model, self.name = model, name
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.cache: set[Hashable] = set()
        self.wake = asyncio.Event()
        self._order = itertools.count()
        self.busy_s = self.seq_s = 0.0  # time with work, and running sequences integrated over time
        self.tokens = self.prefilled = self.cached = self.preempted = 0
        self.task = asyncio.ensure_future(self._run())

    async def generate(self, request: Request) -> None:
        request.done = asyncio.get_running_loop().create_future()
        self.waiting.append(request)
        self.wake.set()
        await request.done

    def load(self) -> int:
        return len(self.waiting) + len(self.running)

    def _hit(self, request: Request) -> int:
        if not self.model.prefix_caching:
            return 0
        cached = max((n for key, n in request.path if key in self.cache), default=0)
        return min(cached, request.context) // self.model.block * self.model.block

    def _held(self, extra: Sequence[Request] = ()) -> int:
        """KV tokens held by the running sequences (and `extra`): own tokens, plus each group's shared prefix once."""
        shared: dict[Hashable, int] = {}
        own = 0
        for r in itertools.chain(self.running, extra):
            own += r.context - r.hit
            shared[r.group] = max(shared.get(r.group, 0), r.hit)
        return own + sum(shared.values())

    def _admit(self) -> int:
        """Admits waiting requests while there is room; returns the tokens to prefill."""
        prefill = 0
        while self.waiting and len(self.running) < self.model.max_num_seqs:
            request = self.waiting[0]
            request.hit = self._hit(request)
            if self.running and self._held([request]) + 1 > self.model.kv_tokens:
                break
            self.waiting.pop(0)
            request.order = next(self._order)
            prefill += request.context - request.hit
            self.cached += request.hit
            self.running.append(request)
            self.cache.update(key for key, _ in request.path)
        self.prefilled += prefill
        return prefill

    async def _run(self) -> None:
        loop, m = asyncio.get_running_loop(), self.model
        pending = 0.0  # prefill of sequences admitted for a step that has not run yet
        while True:
            if not self.running and not self.waiting:
                self.wake.clear()
                await self.wake.wait()
                continue
            prefill_s = pending + m.prefill_s_per_token * self._admit()
            pending = 0.0
            # No room for one more token of every sequence: preempt the newest first (vLLM's recompute mode).
            while len(self.running) > 1 and self._held() + len(self.running) > m.kv_tokens:
                victim = max(self.running, key=lambda r: r.order)
                self.running.remove(victim)
                self.waiting.insert(0, victim)
                self.preempted += 1
            b = len(self.running)
            context = sum(r.context for r in self.running)
            k = min(r.new_tokens - r.generated for r in self.running)
            room = m.kv_tokens - self._held()
            k = max(1, min(k, room // b)) if room >= b else 1
            duration = prefill_s + m.steps_time(k, b, context)
            start = loop.time()
            self.wake.clear()
            steps = k
            if len(self.running) < m.max_num_seqs:  # an arrival joins at the next step boundary
                try:
                    await asyncio.wait_for(self.wake.wait(), duration)
                    if loop.time() == start:  # arrived before the step began: plan it again with the newcomer
                        pending = prefill_s
                        continue
                    steps = m.steps_within(loop.time() - start - prefill_s, b, context, k)
                    await asyncio.sleep(max(0.0, prefill_s + m.steps_time(steps, b, context) - (loop.time() - start)))
                except TimeoutError:
                    pass
            else:  # full: arrivals wait for a sequence to finish, at the end of these steps
                await asyncio.sleep(duration)
            self.busy_s += loop.time() - start
            self.seq_s += b * (loop.time() - start)
            self.tokens += steps * b
            for r in self.running:
                r.generated += steps
            finished = [r for r in self.running if r.generated >= r.new_tokens]
            self.running = [r for r in self.running if r.generated < r.new_tokens]
            for r in finished:
                r.done.set_result(None)


class Router:
    """verl's `GlobalRequestLoadBalancer`: a request id sticks to its first replica; a new id goes to a replica with
    the fewest requests in flight (ties drawn with a seeded generator)."""

    def __init__(self, replicas: Sequence[Replica], seed: int = 0) -> None:
        self.replicas, self.rng = list(replicas), random.Random(seed)
        self.sticky: dict[Hashable, Replica] = {}

    def replica(self, request_id: Hashable) -> Replica:
        if request_id not in self.sticky:
            low = min(r.load() for r in self.replicas)
            self.sticky[request_id] = self.rng.choice([r for r in self.replicas if r.load() == low])
        return self.sticky[request_id]


def time_weighted_mean(events: Sequence[tuple[float, int]], end: float) -> float:
    """Mean over [0, end] of a step function given as (time, new value) changes in time order."""
    total, last_t, last_v = 0.0, 0.0, 0
    for t, v in events:
        total += last_v * (t - last_t)
        last_t, last_v = t, v
    total += last_v * (end - last_t)
    return total / end if end > 0 else math.nan


def percentile_time(times: Sequence[float], share: float) -> float:
    """The time by which `share` of the items had finished."""
    ordered = sorted(times)
    return ordered[max(0, math.ceil(share * len(ordered)) - 1)] if ordered else math.nan
