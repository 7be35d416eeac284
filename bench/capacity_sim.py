"""The capacity model's discrete-event simulation of the pool, fed with measured costs
(bench/capacity_costs.py).

Closed-loop callers (or Poisson arrivals at a rate) send Classify calls to N API
replicas round robin. A hit costs its API, then Memcached. A miss costs its API, then
waits in that API's publisher: as the real one (api/publisher.py), each API keeps one
envelope per model in flight and sends what queued meanwhile as the next envelope, so
batches grow with load. Redis carries each item there and back; a worker takes queued
envelopes up to MAX_BATCH items (per batch overhead + per item + the model's time for
that batch); replies cost Redis and then the API again.

Every process is single-threaded (one task at a time, FIFO). The processes share the
machine's cores the way Linux shares them, by processor sharing: n running tasks on c
cores each progress at min(1, c/n) of a core. On a 2-core machine whose other tenants
use part of it, c is what they leave (measured per run: bench/capacity_costs.py), so
adding replicas there adds contention, not capacity. `sharing=False` gives the earlier
model (each task holds a whole core while it runs, FIFO for cores), for comparison.
"""

from __future__ import annotations

import heapq
import random
import statistics
from collections import deque
from collections.abc import Callable
from typing import Any

from bench.capacity_costs import MAX_BATCH, Costs


class Sim:
    """Events on a heap, and the cores the processes run on."""

    def __init__(self, cores: float, seed: int = 1, sharing: bool = True) -> None:
        # Service times vary around their mean (gamma, coefficient of variation 0.5):
        # measured costs are means, and equal service times would hide queueing.
        self.rng = random.Random(seed)
        self.now = 0.0
        self.events: list[tuple[float, int, Callable[[], None]]] = []
        self.seq = 0
        self.cpu: SharedCores | FifoCores = SharedCores(self, cores) if sharing else FifoCores(self, cores)

    def at(self, t: float, fn: Callable[[], None]) -> None:
        self.seq += 1
        heapq.heappush(self.events, (t, self.seq, fn))

    def run(self, until: float) -> None:
        while self.events and self.events[0][0] <= until:
            self.now, _, fn = heapq.heappop(self.events)
            fn()


class SharedCores:
    """Processor sharing: the running tasks share `cores` equally, none faster than one
    core. Tracked in virtual time: `done_s` is the work every running task has received
    since the start; a task ends when it has received its own work on top of what it
    found there."""

    def __init__(self, sim: Sim, cores: float) -> None:
        self.sim, self.cores = sim, cores
        self.done_s = 0.0
        self.updated = 0.0
        self.running: list[tuple[float, int, Callable[[], None]]] = []
        self.generation = 0  # completions scheduled before the last change are stale

    def _rate(self) -> float:
        return min(1.0, self.cores / len(self.running)) if self.running else 1.0

    def _advance(self) -> None:
        self.done_s += (self.sim.now - self.updated) * self._rate()
        self.updated = self.sim.now

    def run(self, seconds: float, then: Callable[[], None]) -> None:
        self._advance()
        self.sim.seq += 1
        heapq.heappush(self.running, (self.done_s + seconds, self.sim.seq, then))
        self._schedule()

    def _schedule(self) -> None:
        self.generation += 1
        if self.running:
            generation = self.generation
            left_s = max(0.0, self.running[0][0] - self.done_s)
            self.sim.at(self.sim.now + left_s / self._rate(), lambda: self._complete(generation))

    def _complete(self, generation: int) -> None:
        if generation != self.generation:
            return
        self._advance()
        _, _, then = heapq.heappop(self.running)
        self._schedule()
        then()


class FifoCores:
    """Each task holds a whole core while it runs; tasks wait for one in FIFO order."""

    def __init__(self, sim: Sim, cores: float) -> None:
        self.sim, self.free = sim, cores
        self.waiting: deque[tuple[float, Callable[[], None]]] = deque()

    def run(self, seconds: float, then: Callable[[], None]) -> None:
        if self.free >= 1:
            self.free -= 1
            self.sim.at(self.sim.now + seconds, lambda: self._complete(then))
        else:
            self.waiting.append((seconds, then))

    def _complete(self, then: Callable[[], None]) -> None:
        if self.waiting:
            seconds, nxt = self.waiting.popleft()
            self.sim.at(self.sim.now + seconds, lambda: self._complete(nxt))
        else:
            self.free += 1
        then()


class Proc:
    """A single-threaded process: one task at a time, each run on the shared cores.
    `first` tasks go before the others: an API's loop handles the replies it has before
    it accepts the next call (grpc.aio takes one new call per loop iteration, and keeps
    the rest in gRPC's core)."""

    def __init__(self, sim: Sim) -> None:
        self.sim = sim
        self.queue: deque[tuple[float, Callable[[], None]]] = deque()
        self.first: deque[tuple[float, Callable[[], None]]] = deque()
        self.busy = False
        self.busy_ms = 0.0

    def submit(self, ms: float, then: Callable[[], None], first: bool = False) -> None:
        (self.first if first else self.queue).append((ms, then))
        if not self.busy:
            self._next()

    def _next(self) -> None:
        if not self.first and not self.queue:
            self.busy = False
            return
        self.busy = True
        mean_ms, then = (self.first or self.queue).popleft()
        ms = mean_ms * self.sim.rng.gammavariate(4.0, 0.25) if mean_ms > 0 else 0.0
        self.busy_ms += ms

        def done() -> None:
            then()
            self._next()

        self.sim.cpu.run(ms / 1000, done)


# The mean CPU burst of the machine's other tenants (the one figure here not measured:
# p99 depends on it, see docs/scaling.md).
OTHERS_BURST_MS = 20.0

# An envelope: its items' reply callbacks.
Envelope = list[Callable[[], None]]


class Api:
    """An API replica: its process, and its publisher's one envelope in flight. As in
    api/publisher.py, the slot is freed as the envelope's callers take their replies,
    which they do on the API's loop, behind whatever else it has to do."""

    def __init__(self, sim: Sim, costs: Costs, broker: Broker) -> None:
        self.proc, self.costs, self.broker = Proc(sim), costs, broker
        self.pending: list[Callable[[], None]] = []
        self.inflight = False

    def miss(self, finish: Callable[[], None]) -> None:
        """Queues a miss whose first half of API work is done; `finish` runs once the
        API has handled its reply."""
        self.pending.append(finish)
        self._flush()

    def _flush(self) -> None:
        if self.inflight or not self.pending:
            return
        take, self.pending = self.pending[:MAX_BATCH], self.pending[MAX_BATCH:]
        self.inflight = True
        left = [len(take)]

        def handled(finish: Callable[[], None]) -> None:
            finish()
            left[0] -= 1
            if not left[0]:
                self.inflight = False
                self._flush()

        half = self.costs.api_miss_ms / 2
        self.broker.publish(
            [lambda f=f: self.proc.submit(half, lambda: handled(f), first=True) for f in take]  # type: ignore[misc]
        )


class Broker:
    """Redis, and the queue of envelopes the workers take from."""

    def __init__(self, sim: Sim, costs: Costs) -> None:
        self.redis, self.costs = Proc(sim), costs
        self.queue: deque[Envelope] = deque()
        self.workers: list[Worker] = []

    def publish(self, envelope: Envelope) -> None:
        def queued() -> None:
            self.queue.append(envelope)
            for w in self.workers:
                w.poke()

        # Then the time no CPU accounts for (wake-ups, hand-offs between threads), once
        # each way: half of `transit_ms`.
        sim = self.redis.sim
        self.redis.submit(
            self.costs.redis_miss_ms / 2 * len(envelope),
            lambda: sim.at(sim.now + self.costs.transit_ms / 2000, queued),
        )


class Worker:
    """Takes queued envelopes, up to MAX_BATCH items, whenever it is free."""

    def __init__(self, sim: Sim, costs: Costs, broker: Broker) -> None:
        self.proc, self.costs, self.broker = Proc(sim), costs, broker
        self.batches: list[int] = []

    def poke(self) -> None:
        queue = self.broker.queue
        if self.proc.busy or not queue:
            return
        taken = [queue.popleft()]
        items = len(taken[0])
        while queue and items + len(queue[0]) <= MAX_BATCH:
            items += len(queue[0])
            taken.append(queue.popleft())
        self.batches.append(items)
        c = self.costs
        ms = c.worker_batch_ms + c.worker_item_ms * items + c.model(items)

        sim = self.proc.sim

        def done() -> None:
            for replies in taken:
                # Replies go back through Redis, an envelope's in one pipeline.
                back = _all(replies)
                self.broker.redis.submit(
                    c.redis_miss_ms / 2 * len(replies),
                    lambda b=back: sim.at(sim.now + c.transit_ms / 2000, b),  # type: ignore[misc]
                )
            self.poke()

        self.proc.submit(ms, done)


def _all(replies: list[Callable[[], None]]) -> Callable[[], None]:
    def run() -> None:
        for reply in replies:
            reply()

    return run


def simulate(
    costs: Costs,
    apis: int,
    workers: int,
    *,
    cores: float,
    hit_ratio: float = 0.0,
    concurrency: int = 0,
    rate: float = 0.0,
    seconds: float = 2.0,
    warmup_s: float = 0.5,
    client_on_cores: bool = True,
    sharing: bool = True,
    others_cores: float = 0.0,
    others_burst_ms: float = OTHERS_BURST_MS,
    brokers: int = 1,
    seed: int = 1,
) -> dict[str, Any]:
    """Throughput and latency percentiles of `seconds` simulated (after `warmup_s`).
    `others_cores`: the machine's other tenants' mean use, as bursts of CPU work
    (exponential, `others_burst_ms` on average) arriving at random and competing for
    `cores` like the pool's own processes."""
    rng = random.Random(seed)
    sim = Sim(cores, seed, sharing)
    # Redis instances as broker shards: replica i publishes to shard i mod R (its models'
    # shard, as if the load's models were spread evenly), worker k consumes shard k mod R.
    shards = [Broker(sim, costs) for _ in range(brokers)]
    api = [Api(sim, costs, shards[i % brokers]) for i in range(apis)]
    memcached, client = Proc(sim), Proc(sim)
    pool = [Worker(sim, costs, shards[k % brokers]) for k in range(workers)]
    for k, w in enumerate(pool):
        shards[k % brokers].workers.append(w)
    latencies: list[float] = []
    rr = [0]

    def request(on_done: Callable[[], None]) -> None:
        t0 = sim.now
        a = api[rr[0] % apis]
        rr[0] += 1

        def finish() -> None:
            if t0 >= warmup_s:
                latencies.append(sim.now - t0)
            on_done()

        def after_client() -> None:
            if rng.random() < hit_ratio:
                a.proc.submit(costs.api_hit_ms, lambda: memcached.submit(costs.memcached_hit_ms, finish))
            else:
                a.proc.submit(costs.api_miss_ms / 2, lambda: a.miss(finish))

        if client_on_cores:
            client.submit(costs.client_ms, after_client)
        else:
            after_client()

    end = warmup_s + seconds
    if others_cores > 0:
        t = 0.0
        while t < end:
            t += rng.expovariate(others_cores * 1000 / others_burst_ms)
            burst_s = rng.expovariate(1000 / others_burst_ms)
            sim.at(t, lambda burst_s=burst_s: sim.cpu.run(burst_s, lambda: None))  # type: ignore[misc]
    if concurrency:

        def caller() -> None:
            if sim.now < end:
                request(caller)

        for _ in range(concurrency):
            sim.at(0.0, caller)
    else:
        t = 0.0
        while t < end:
            t += rng.expovariate(rate)
            sim.at(t, lambda: request(lambda: None))
    sim.run(end)
    lat_ms = sorted(x * 1000 for x in latencies)

    def pct(q: float) -> float:
        return lat_ms[min(len(lat_ms) - 1, int(q * len(lat_ms)))] if lat_ms else float("nan")

    util = {
        "api": max(a.proc.busy_ms for a in api) / (end * 1000),
        "redis": max(b.redis.busy_ms for b in shards) / (end * 1000),
        "memcached": memcached.busy_ms / (end * 1000),
        "worker": max(w.proc.busy_ms for w in pool) / (end * 1000),
    }
    batches = [b for w in pool for b in w.batches]
    return {
        "rps": len(lat_ms) / seconds,
        "p50_ms": pct(0.5),
        "p99_ms": pct(0.99),
        "utilisation": util,
        "mean_batch": statistics.fmean(batches) if batches else float("nan"),
    }
