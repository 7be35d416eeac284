"""A capacity model of the pool: measured per-component costs, a discrete-event
simulation fed with them, its predictions checked against measured runs, and the
sizing of a target load.

    python -m bench.capacity [--seconds S] [--grid 1x1,2x1,1x2,2x2] [--out PATH]
    python -m bench.capacity --costs PATH --target 50000 --hit 0.3   # sizing only

1. **Costs** (one API, one worker, Redis, Memcached on loopback: bench/cluster.py), from
   a `miss` and a `hit` run closed-loop at 64 in flight, the API's local LRU off so a hit
   is a Memcached round trip: CPU per request of every process (API, worker, Redis,
   Memcached, the load generator), Redis commands and bytes per miss (INFO deltas:
   after the API's coalescing), Memcached gets and bytes per hit, the mean envelope and
   the model's own time per batch size (bench/modeltime.py).
2. **Simulation** (`simulate`): closed-loop callers (or Poisson arrivals at a rate);
   each API replica, Redis and each worker is a single-threaded process; every process
   needs one of `cores` CPU cores to run (FIFO), which is what two replicas on a
   two-core machine contend for. A hit costs API then Memcached; a miss costs API,
   Redis, a place in a worker's batch (up to max_batch_size of what is queued when the
   worker is free: overhead + per-item + the model's time for that batch), Redis for
   the reply, then API again.
3. **Check** (`--grid`): for each N API replicas x M workers, the measured miss@64
   (throughput, p99) next to the simulation's prediction for the same N, M and cores.
4. **Target** (`size`): the smallest N and M (given cores enough, one per process)
   whose simulated p99 at the target rate is under the bound, with Redis's and
   Memcached's utilisation at that rate.

JSON under bench/results/capacity/.
"""

from __future__ import annotations

import argparse
import contextlib
import heapq
import itertools
import json
import math
import random
import statistics
import time
import urllib.request
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench import results

MAX_BATCH = 64  # digits' max_batch_size


@dataclass
class Costs:
    """Milliseconds of one core per unit of work, measured (see `measure`)."""

    api_hit_ms: float = 0.5
    api_miss_ms: float = 1.0
    memcached_hit_ms: float = 0.02
    redis_miss_ms: float = 0.08
    worker_item_ms: float = 0.3  # per item, besides the model
    worker_batch_ms: float = 1.0  # per batch (message handling), besides the model
    model_ms: dict[str, float] = field(default_factory=lambda: {"1": 0.5, "64": 5.0})  # per batch, by size
    client_ms: float = 0.3  # the load generator's CPU per request (it runs on the same cores)
    envelope_items: float = 1.0
    redis_commands_per_miss: float = 0.0
    redis_bytes_per_miss: float = 0.0
    memcached_bytes_per_hit: float = 0.0

    def model(self, batch: int) -> float:
        """The model's time for a batch, linear between the measured sizes."""
        points = sorted((int(b), t) for b, t in self.model_ms.items())
        if batch <= points[0][0]:
            return points[0][1] * batch / points[0][0]
        for (b0, t0), (b1, t1) in itertools.pairwise(points):
            if batch <= b1:
                return t0 + (t1 - t0) * (batch - b0) / (b1 - b0)
        b, t = points[-1]
        return t * batch / b


# --- the simulation


class Sim:
    """Events on a heap; processes with a FIFO of tasks each, run on a shared pool of cores."""

    def __init__(self, cores: float, seed: int = 1) -> None:
        # Service times vary around their mean (gamma, coefficient of variation 0.5):
        # measured costs are means, and equal service times would hide queueing.
        self.rng = random.Random(seed)
        self.now = 0.0
        self.events: list[tuple[float, int, Callable[[], None]]] = []
        self.seq = 0
        self.free_cores = cores
        self.waiting_cores: deque[Callable[[], None]] = deque()

    def at(self, t: float, fn: Callable[[], None]) -> None:
        self.seq += 1
        heapq.heappush(self.events, (t, self.seq, fn))

    def core(self, start: Callable[[], None]) -> None:
        if self.free_cores >= 1:
            self.free_cores -= 1
            start()
        else:
            self.waiting_cores.append(start)

    def release(self) -> None:
        if self.waiting_cores:
            self.waiting_cores.popleft()()
        else:
            self.free_cores += 1

    def run(self, until: float) -> None:
        while self.events and self.events[0][0] <= until:
            self.now, _, fn = heapq.heappop(self.events)
            fn()


class Proc:
    """A single-threaded process: one task at a time, each holding a core while it runs."""

    def __init__(self, sim: Sim) -> None:
        self.sim = sim
        self.queue: deque[tuple[float, Callable[[], None]]] = deque()
        self.busy = False
        self.busy_ms = 0.0

    def submit(self, ms: float, then: Callable[[], None]) -> None:
        self.queue.append((ms, then))
        if not self.busy:
            self._next()

    def _next(self) -> None:
        if not self.queue:
            self.busy = False
            return
        self.busy = True
        mean_ms, then = self.queue.popleft()
        ms = mean_ms * self.sim.rng.gammavariate(4.0, 0.25) if mean_ms > 0 else 0.0
        self.busy_ms += ms

        def start() -> None:
            def done() -> None:
                self.sim.release()
                then()
                self._next()

            self.sim.at(self.sim.now + ms / 1000, done)

        self.sim.core(start)


class Worker:
    """Takes up to MAX_BATCH queued misses whenever it is free."""

    def __init__(self, sim: Sim, costs: Costs, queue: deque[Callable[[], None]]) -> None:
        self.proc, self.costs, self.queue = Proc(sim), costs, queue
        self.batches: list[int] = []

    def poke(self) -> None:
        if self.proc.busy or not self.queue:
            return
        batch = [self.queue.popleft() for _ in range(min(MAX_BATCH, len(self.queue)))]
        self.batches.append(len(batch))
        c = self.costs
        ms = c.worker_batch_ms + c.worker_item_ms * len(batch) + c.model(len(batch))

        def done() -> None:
            for reply in batch:
                reply()
            self.poke()

        self.proc.submit(ms, done)


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
    seed: int = 1,
) -> dict[str, Any]:
    """Throughput and latency percentiles of `seconds` simulated (after `warmup_s`)."""
    rng = random.Random(seed)
    sim = Sim(cores, seed)
    api = [Proc(sim) for _ in range(apis)]
    redis, memcached, client = Proc(sim), Proc(sim), Proc(sim)
    queue: deque[Callable[[], None]] = deque()
    pool = [Worker(sim, costs, queue) for _ in range(workers)]
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
                a.submit(costs.api_hit_ms, lambda: memcached.submit(costs.memcached_hit_ms, finish))
            else:
                half = costs.api_miss_ms / 2

                def enqueue() -> None:
                    queue.append(
                        lambda: redis.submit(costs.redis_miss_ms / 2, lambda: a.submit(half, finish))
                    )
                    for w in pool:
                        w.poke()

                a.submit(half, lambda: redis.submit(costs.redis_miss_ms / 2, enqueue))

        if client_on_cores:
            client.submit(costs.client_ms, after_client)
        else:
            after_client()

    end = warmup_s + seconds
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
        "api": max(p.busy_ms for p in api) / (end * 1000),
        "redis": redis.busy_ms / (end * 1000),
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


# --- measuring


def _redis_info(url: str) -> dict[str, float]:
    import redis

    client = redis.Redis.from_url(url)
    try:
        stats = client.info("stats")
        commands = client.info("commandstats")
    finally:
        client.close()
    return {
        "commands": float(sum(v["calls"] for v in commands.values())),
        "bytes": float(stats["total_net_input_bytes"] + stats["total_net_output_bytes"]),
    }


def _memcached_stats(address: str) -> dict[str, float]:
    import socket

    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(b"stats\r\n")
        data = b""
        while not data.endswith(b"END\r\n"):
            data += s.recv(65536)
    out = {}
    for line in data.decode().splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == "STAT":
            with contextlib.suppress(ValueError):
                out[parts[1]] = float(parts[2])
    return {"gets": out["cmd_get"], "bytes": out["bytes_read"] + out["bytes_written"]}


def _api_samples(urls: list[str]) -> dict[Any, float]:
    from bench.scrape import parse

    merged: dict[Any, float] = {}
    for url in urls:
        with urllib.request.urlopen(url, timeout=5) as response:
            for key, value in parse(response.read().decode()).items():
                merged[key] = merged.get(key, 0.0) + value
    return merged


def _run(cluster: Any, gens: Any, workload: str, concurrency: int, seconds: float) -> dict[str, Any]:
    """One measured run: the load's figures, CPU per request per role, and the deltas of
    Redis's, Memcached's and the APIs' counters."""
    from bench.loadgen import Load
    from bench.scrape import histogram_mean

    cpu0, r0, m0 = cluster.cpu(), _redis_info(cluster.redis_url), _memcached_stats(cluster.memcached)
    s0 = _api_samples(cluster.metrics_urls())
    run = gens.run(Load(cluster.target, "digits", workload, concurrency=concurrency, seconds=seconds))
    cpu1, r1, m1 = cluster.cpu(), _redis_info(cluster.redis_url), _memcached_stats(cluster.memcached)
    s1 = _api_samples(cluster.metrics_urls())
    ok = max(1, run.ok)
    delta = {k: v - s0.get(k, 0.0) for k, v in s1.items()}
    return {
        **run.summary(),
        "cpu_ms_per_request": {k: (v - cpu0.get(k, 0.0)) * 1000 / ok for k, v in cpu1.items()},
        "redis_commands_per_request": (r1["commands"] - r0["commands"]) / ok,
        "redis_bytes_per_request": (r1["bytes"] - r0["bytes"]) / ok,
        "memcached_gets_per_request": (m1["gets"] - m0["gets"]) / ok,
        "memcached_bytes_per_request": (m1["bytes"] - m0["bytes"]) / ok,
        "envelope_items": histogram_mean(delta, "inferpool_envelope_items"),
    }


def measure(seconds: float, concurrency: int = 64) -> tuple[Costs, dict[str, Any]]:
    from bench.cluster import Cluster
    from bench.generators import Generators
    from bench.loadgen import HOT_ITEMS, Load
    from bench.modeltime import model_alone
    from bench.stack import ROOT

    # The model alone, one thread (as a worker on this machine runs it): ms per batch.
    rates = model_alone(ROOT / "models", "digits", seconds=0.3, repeats=3, torch_threads=0)
    model_ms = {b: int(b) * 1000 / r for b, r in rates.items()}
    with (
        Cluster(apis=1, workers=1, extra_env={"INFERPOOL_LOCAL_CACHE_ITEMS": "0"}) as cluster,
        Generators(1) as gens,
    ):
        gens.run(Load(cluster.target, "digits", "hit", concurrency=8, seconds=60, max_requests=HOT_ITEMS))
        miss = _run(cluster, gens, "miss", concurrency, seconds)
        hit = _run(cluster, gens, "hit", concurrency, seconds)
    items = miss["envelope_items"] if miss["envelope_items"] == miss["envelope_items"] else 1.0
    worker_ms = miss["cpu_ms_per_request"].get("worker", 0.0)
    # The worker's CPU per miss less the model's share at the batch it ran (its batches
    # are about the API's envelopes: one message is one batch, or part of one).
    batch = max(1, round(items))
    model_share = Costs(model_ms=model_ms).model(batch) / batch
    besides_model = max(0.0, worker_ms - model_share)
    costs = Costs(
        api_hit_ms=hit["cpu_ms_per_request"]["api"],
        api_miss_ms=miss["cpu_ms_per_request"]["api"],
        memcached_hit_ms=hit["cpu_ms_per_request"].get("memcached", 0.0),
        redis_miss_ms=miss["cpu_ms_per_request"].get("redis", 0.0),
        # Split between per batch and per item at the observed batch: half each, an
        # assumption the grid check tests.
        worker_batch_ms=besides_model * batch / 2,
        worker_item_ms=besides_model / 2,
        model_ms=model_ms,
        client_ms=miss["gen_cpu_ms_per_request"],
        envelope_items=items,
        redis_commands_per_miss=miss["redis_commands_per_request"],
        redis_bytes_per_miss=miss["redis_bytes_per_request"],
        memcached_bytes_per_hit=hit["memcached_bytes_per_request"],
    )
    return costs, {"miss": miss, "hit": hit, "model_items_per_s": rates}


def grid(costs: Costs, cells: list[tuple[int, int]], seconds: float, cores: float) -> list[dict[str, Any]]:
    from bench.cluster import Cluster
    from bench.generators import Generators

    out = []
    for apis, workers in cells:
        with Cluster(apis=apis, workers=workers) as cluster, Generators(1) as gens:
            measured = _run(cluster, gens, "miss", 64, seconds)
        predicted = simulate(costs, apis, workers, cores=cores, concurrency=64, seconds=max(2.0, seconds))
        row = {
            "apis": apis,
            "workers": workers,
            "measured": {k: measured[k] for k in ("rps", "p50_ms", "p99_ms", "envelope_items")},
            "measured_cpu_ms_per_request": measured["cpu_ms_per_request"],
            "predicted": predicted,
        }
        print(
            f"{apis} API x {workers} worker: measured {measured['rps']:6.0f}/s"
            f" p99 {measured['p99_ms']:6.1f} ms"
            f" | predicted {predicted['rps']:6.0f}/s p99 {predicted['p99_ms']:6.1f} ms",
            flush=True,
        )
        out.append(row)
    return out


# --- sizing a target


def size(
    costs: Costs,
    rate: float,
    hit_ratio: float,
    p99_ms: float,
    worker_items_per_s: float,
    *,
    seconds: float = 1.0,
) -> dict[str, Any]:
    """The fewest API replicas and workers whose simulated p99 at `rate` is under
    `p99_ms`, one core per process. A worker is one process per GPU whose time per item
    is 1/`worker_items_per_s` (the host-side work bounds it, see docs/scaling.md)."""
    gpu = Costs(**{**asdict(costs)})
    # Per-GPU: the batch cost stays, the per-item cost makes the assumed throughput at a
    # full batch; the model's own time on the GPU is within it.
    per_item_ms = 1000 / worker_items_per_s
    gpu.worker_item_ms = max(0.0, per_item_ms - costs.worker_batch_ms / MAX_BATCH)
    gpu.model_ms = {"1": 0.0, "64": 0.0}
    misses = rate * (1 - hit_ratio)
    hits = rate * hit_ratio
    api_core_s = hits * costs.api_hit_ms / 1000 + misses * costs.api_miss_ms / 1000
    apis = max(1, math.ceil(api_core_s / 0.7))
    workers = max(1, math.ceil(misses / worker_items_per_s / 0.8))
    tried = []
    for _ in range(12):
        sim = simulate(
            gpu, apis, workers, cores=apis + workers + 4, hit_ratio=hit_ratio, rate=rate, seconds=seconds,
            warmup_s=0.3, client_on_cores=False,
        )  # fmt: skip
        tried.append({"apis": apis, "workers": workers, "p99_ms": sim["p99_ms"], "rps": sim["rps"]})
        print(
            f"  {apis} API replicas, {workers} workers: p99 {sim['p99_ms']:.1f} ms at {sim['rps']:.0f}/s",
            flush=True,
        )
        if sim["p99_ms"] < p99_ms and sim["rps"] > 0.97 * rate:
            break
        util = sim["utilisation"]
        if util["api"] >= util["worker"]:
            apis = math.ceil(apis * 1.15)
        else:
            workers = math.ceil(workers * 1.15)
    redis_core = misses * costs.redis_miss_ms / 1000
    return {
        "rate": rate,
        "hit_ratio": hit_ratio,
        "p99_bound_ms": p99_ms,
        "worker_items_per_s_assumed": worker_items_per_s,
        "api_replicas": apis,
        "workers": workers,
        "api_cores_busy": api_core_s,
        "redis_cores_busy": redis_core,
        "redis_commands_per_s": misses * costs.redis_commands_per_miss,
        "redis_bytes_per_s": misses * costs.redis_bytes_per_miss,
        "memcached_cores_busy": hits * costs.memcached_hit_ms / 1000,
        "memcached_bytes_per_s": hits * costs.memcached_bytes_per_hit,
        "tried": tried,
        "simulated": sim,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=10.0, help="each measured run")
    p.add_argument("--grid", default="1x1,2x1,1x2,2x2", help="API replicas x workers to check; empty: none")
    p.add_argument("--costs", default=None, help="a capacity JSON to take the costs from (no measuring)")
    p.add_argument("--target", type=float, default=50_000.0, help="Classify/s to size for")
    p.add_argument("--hit", type=float, default=0.3, help="hit ratio of the target load")
    p.add_argument("--p99-ms", type=float, default=100.0)
    p.add_argument("--worker-items-per-s", type=float, default=0.0, help="per GPU worker; 0: from the costs")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    from bench.procs import machine_cpu

    cores = float(len(__import__("os").sched_getaffinity(0)))
    data: dict[str, Any] = {"cores": cores, "machine_cpu": machine_cpu()}
    if args.costs:
        costs = Costs(**json.loads(Path(args.costs).read_text())["costs"])
    else:
        t0 = time.monotonic()
        costs, data["cost_runs"] = measure(args.seconds)
        print(f"costs ({time.monotonic() - t0:.0f} s): {json.dumps(asdict(costs))}", flush=True)
    data["costs"] = asdict(costs)
    cells = [tuple(int(v) for v in c.split("x")) for c in args.grid.split(",") if c]
    if cells and not args.costs:
        data["grid"] = grid(costs, cells, args.seconds, cores)  # type: ignore[arg-type]
    # The host-side work per item bounds a GPU worker (the model's share is the GPU's):
    # a worker process's per-item and per-batch costs at a full batch.
    items_per_s = args.worker_items_per_s or 1000 / (costs.worker_item_ms + costs.worker_batch_ms / MAX_BATCH)
    print(
        f"sizing {args.target:.0f}/s, {args.hit:.0%} hits, p99 < {args.p99_ms:g} ms,"
        f" {items_per_s:.0f} items/s per worker"
    )
    data["target"] = size(costs, args.target, args.hit, args.p99_ms, items_per_s)
    t = data["target"]
    print(
        f"-> {t['api_replicas']} API replicas, {t['workers']} GPU workers;"
        f" Redis {t['redis_cores_busy']:.2f} cores busy"
        f" ({t['redis_commands_per_s']:.0f} commands/s, {t['redis_bytes_per_s'] / 1e6:.0f} MB/s);"
        f" Memcached {t['memcached_cores_busy']:.2f} cores",
        flush=True,
    )
    path = results.write("capacity", data, out=Path(args.out) if args.out else None)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
