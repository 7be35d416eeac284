"""The capacity model's costs: what each component of the pool spends per request,
measured on a running stack (bench/cluster.py), and what else the machine runs.

`measure` runs one API, one worker, Redis and Memcached on loopback, `miss` and `hit`
closed-loop at 64 in flight with the API's local LRU off (so a hit is a Memcached round
trip): CPU per request of every process (API, worker, Redis, Memcached, the load
generator), Redis commands and bytes per miss (INFO deltas: after the API's
coalescing), Memcached gets and bytes per hit, the mean envelope, and the model's own
time per batch size (bench/modeltime.py).

`run_measured` also reports the cores the stack had: the machine's cores less what
every other process used meanwhile (/proc/stat's busy time less the stack's and the
load generator's, plus the hypervisor's steal). On a shared machine that is what the
simulation (bench/capacity_sim.py) is given, not the core count.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any

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
    # A lone miss's latency less the CPU it costs: wake-ups and hand-offs (not CPU).
    transit_ms: float = 0.0
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


def run_measured(cluster: Any, gens: Any, workload: str, concurrency: int, seconds: float) -> dict[str, Any]:
    """One measured run: the load's figures, CPU per request per role, and the deltas of
    Redis's, Memcached's and the APIs' counters."""
    from bench.loadgen import Load
    from bench.procs import machine_cpu
    from bench.scrape import histogram_mean

    cpu0, r0, m0 = cluster.cpu(), _redis_info(cluster.redis_url), _memcached_stats(cluster.memcached)
    s0 = _api_samples(cluster.metrics_urls())
    machine0, t0 = machine_cpu(), time.monotonic()
    run = gens.run(Load(cluster.target, "digits", workload, concurrency=concurrency, seconds=seconds))
    machine1, wall_s = machine_cpu(), time.monotonic() - t0
    cpu1, r1, m1 = cluster.cpu(), _redis_info(cluster.redis_url), _memcached_stats(cluster.memcached)
    s1 = _api_samples(cluster.metrics_urls())
    ok = max(1, run.ok)
    delta = {k: v - s0.get(k, 0.0) for k, v in s1.items()}
    stack_s = sum(cpu1.values()) - sum(cpu0.values()) + run.cpu_s
    others_s = machine1["busy"] - machine0["busy"] - stack_s + machine1["steal"] - machine0["steal"]
    cores = float(len(os.sched_getaffinity(0)))
    return {
        **run.summary(),
        # The cores the stack had: what the machine's other tenants left it.
        "cores_left": min(cores, max(0.5, cores - others_s / wall_s)),
        "others_cores_busy": others_s / wall_s,
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
        miss = run_measured(cluster, gens, "miss", concurrency, seconds)
        hit = run_measured(cluster, gens, "hit", concurrency, seconds)
        lone = run_measured(cluster, gens, "miss", 1, min(seconds, 3.0))

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
    # A lone miss's median latency less the CPU on its path (client, API, Redis, worker at
    # batch 1): time spent in wake-ups and hand-offs, which no queue or core explains.
    # (Not the lone run's own CPU per request: at one call in flight, idle polling and
    # timers make that larger than the latency.)
    path_ms = costs.client_ms + costs.api_miss_ms + costs.redis_miss_ms + costs.worker_batch_ms
    costs.transit_ms = max(0.0, lone["p50_ms"] - path_ms - costs.worker_item_ms - costs.model(1))
    return costs, {"miss": miss, "hit": hit, "lone_miss": lone, "model_items_per_s": rates}
