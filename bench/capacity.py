"""A capacity model of the pool: measured per-component costs (bench/capacity_costs.py),
a discrete-event simulation fed with them (bench/capacity_sim.py), its predictions
checked against measured runs, and the sizing of a target load.

    python -m bench.capacity [--seconds S] [--grid 1x1,2x1,1x2,2x2] [--out PATH]
    python -m bench.capacity --costs PATH --target 50000 --hit 0.3   # sizing only

1. **Costs**: `measure` (one API, one worker, miss and hit at 64 in flight).
2. **Check** (`--grid`): for each N API replicas x M workers, the measured miss@64
   (throughput, p99) next to the simulation's prediction for the same N, M and the
   cores the machine's other tenants left the stack during that run; and, for
   comparison, the prediction without processor sharing on all cores.
3. **Target** (`size`): the smallest N and M (given cores enough, one per process)
   whose simulated p99 at the target rate is under the bound, with Redis's and
   Memcached's utilisation at that rate.

JSON under bench/results/capacity/.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench import results
from bench.capacity_costs import MAX_BATCH, Costs, measure, run_measured
from bench.capacity_sim import simulate


def with_cpu_of(costs: Costs, run: dict[str, Any]) -> Costs:
    """`costs` scaled to the CPU per request each role used in `run` (a grid cell)."""
    cpu = run["cpu_ms_per_request"]
    worker_was = costs.worker_item_ms + costs.worker_batch_ms / max(1.0, costs.envelope_items)
    worker_was += costs.model(max(1, round(costs.envelope_items))) / max(1.0, costs.envelope_items)
    scale = cpu.get("worker", 0.0) / worker_was if worker_was else 1.0
    return Costs(
        **{
            **asdict(costs),
            "api_miss_ms": cpu["api"],
            "redis_miss_ms": cpu.get("redis", costs.redis_miss_ms),
            "worker_item_ms": costs.worker_item_ms * scale,
            "worker_batch_ms": costs.worker_batch_ms * scale,
            "client_ms": run["gen_cpu_ms_per_request"],
        }
    )


def grid(costs: Costs, cells: list[tuple[int, int]], seconds: float, cores: float) -> list[dict[str, Any]]:
    from bench.cluster import Cluster
    from bench.generators import Generators

    out = []
    for apis, workers in cells:
        with Cluster(apis=apis, workers=workers) as cluster, Generators(1) as gens:
            measured = run_measured(cluster, gens, "miss", 64, seconds)
        left = measured["cores_left"]
        sim_s = max(2.0, seconds)
        # The other tenants compete for the cores as the pool's processes do.
        predicted = simulate(
            costs, apis, workers, cores=cores, others_cores=cores - left, concurrency=64, seconds=sim_s
        )
        unshared = simulate(costs, apis, workers, cores=cores, concurrency=64, seconds=sim_s, sharing=False)
        # The same model given this run's own CPU per request: what is left of the error
        # is the model's, not the costs' (which grow with the processes sharing the cores).
        own = simulate(
            with_cpu_of(costs, measured), apis, workers, cores=cores, others_cores=cores - left,
            concurrency=64, seconds=sim_s,
        )  # fmt: skip
        row = {
            "apis": apis,
            "workers": workers,
            "cores_left": left,
            "measured": {k: measured[k] for k in ("rps", "p50_ms", "p99_ms", "envelope_items")},
            "measured_cpu_ms_per_request": measured["cpu_ms_per_request"],
            "predicted": predicted,
            "predicted_fifo_all_cores": unshared,
            "predicted_with_own_cpu": own,
        }
        print(
            f"{apis} API x {workers} worker ({left:.2f} cores left):"
            f" measured {measured['rps']:6.0f}/s p99 {measured['p99_ms']:6.1f} ms"
            f" | predicted {predicted['rps']:6.0f}/s p99 {predicted['p99_ms']:6.1f} ms"
            f" | FIFO on {cores:g} cores {unshared['rps']:6.0f}/s p99 {unshared['p99_ms']:6.1f} ms"
            f" | own CPU {own['rps']:6.0f}/s p99 {own['p99_ms']:6.1f} ms",
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
    """The fewest API replicas, workers and Redis instances (broker shards) whose
    simulated p99 at `rate` is under `p99_ms`, one core per process. A worker is one
    process per GPU whose time per item is 1/`worker_items_per_s` (the host-side work
    bounds it, see docs/scaling.md). Shards assume the load's models can be spread
    evenly over them (a model's queue is on one Redis)."""
    gpu = Costs(**{**asdict(costs)})
    # Per-GPU: the batch cost stays, the per-item cost makes the assumed throughput at a
    # full batch; the model's own time on the GPU is within it.
    per_item_ms = 1000 / worker_items_per_s
    gpu.worker_item_ms = max(0.0, per_item_ms - costs.worker_batch_ms / MAX_BATCH)
    gpu.model_ms = {"1": 0.0, "64": 0.0}
    misses = rate * (1 - hit_ratio)
    hits = rate * hit_ratio
    api_core_s = hits * costs.api_hit_ms / 1000 + misses * costs.api_miss_ms / 1000
    redis_core = misses * costs.redis_miss_ms / 1000
    n = {
        "api": max(1, math.ceil(api_core_s / 0.7)),
        "worker": max(1, math.ceil(misses / worker_items_per_s / 0.8)),
        "redis": max(1, math.ceil(redis_core / 0.6)),
    }
    tried = []
    for _ in range(16):
        n["worker"] = max(n["worker"], n["redis"])  # every shard needs a worker
        sim = simulate(
            gpu, n["api"], n["worker"], cores=sum(n.values()) + 4, hit_ratio=hit_ratio, rate=rate,
            seconds=seconds, warmup_s=0.3, client_on_cores=False, brokers=n["redis"],
        )  # fmt: skip
        tried.append({**n, "p99_ms": sim["p99_ms"], "rps": sim["rps"]})
        print(
            f"  {n['api']} API replicas, {n['worker']} workers, {n['redis']} Redis:"
            f" p99 {sim['p99_ms']:.1f} ms at {sim['rps']:.0f}/s",
            flush=True,
        )
        if sim["p99_ms"] < p99_ms and sim["rps"] > 0.97 * rate:
            break
        util = sim["utilisation"]
        busiest = max(n, key=lambda role: util[role])
        n[busiest] = math.ceil(n[busiest] * 1.15) if busiest != "redis" else n[busiest] + 1
    apis, workers = n["api"], n["worker"]
    return {
        "rate": rate,
        "hit_ratio": hit_ratio,
        "p99_bound_ms": p99_ms,
        "worker_items_per_s_assumed": worker_items_per_s,
        "api_replicas": apis,
        "workers": workers,
        "redis_instances": n["redis"],
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

    cores = float(len(os.sched_getaffinity(0)))
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
        f"-> {t['api_replicas']} API replicas, {t['workers']} GPU workers, {t['redis_instances']} Redis;"
        f" Redis {t['redis_cores_busy']:.2f} cores busy"
        f" ({t['redis_commands_per_s']:.0f} commands/s, {t['redis_bytes_per_s'] / 1e6:.0f} MB/s);"
        f" Memcached {t['memcached_cores_busy']:.2f} cores",
        flush=True,
    )
    path = results.write("capacity", data, out=Path(args.out) if args.out else None)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
