"""What a proxy in front of the API replicas costs, in one run:

    python -m bench.proxy [--seconds S] [--concurrency 64] [--repeats N] [--out PATH]

One stack (Redis, Memcached, one worker, two API replicas: bench/cluster.py) and, in
turn, these ways to reach it, each driven closed-loop at `--concurrency` with the
`miss` and `hit` workloads of bench/loadgen.py (generators in their own processes):

  direct-1      the client to replica 1 alone
  haproxy-1     HAProxy (HTTP/2, gRPC health checks) to replica 1
  nginx-1       nginx (grpc_pass) to replica 1
  direct-2      the client round-robin over both replicas (ipv4:a,b), no proxy
  haproxy-2     HAProxy to both
  nginx-2       nginx to both

Per cell: throughput, p50/p99, and CPU per request of each role (api, worker, redis,
memcached, proxy). On a machine with few cores every process shares them, so a second
replica or a proxy shows what it costs, not a speed-up. JSON under bench/results/proxy/.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from bench import results
from bench.cluster import Cluster
from bench.generators import Generators
from bench.loadgen import HOT_ITEMS, Load
from bench.proxies import ProxyProcess

WAYS = ("direct-1", "haproxy-1", "nginx-1", "direct-2", "haproxy-2", "nginx-2")


def _target(cluster: Cluster, way: str) -> tuple[str, ProxyProcess | None]:
    kind, n = way.split("-")
    backends = cluster.direct[: int(n)]
    if kind == "direct":
        return ("ipv4:" + ",".join(backends) if len(backends) > 1 else backends[0]), None
    proxy = ProxyProcess(kind, backends, cluster.dir / f"{way}.log")
    return proxy.target, proxy


def measure(seconds: float, concurrency: int, repeats: int, ways: list[str]) -> list[dict[str, Any]]:
    cells: list[dict[str, Any]] = []
    with Cluster(apis=2, workers=1) as cluster, Generators(2) as gens:
        # Every hot input once through each replica's path, so `hit` is all hits.
        gens.run(Load(cluster.target, "digits", "hit", concurrency=8, seconds=60, max_requests=HOT_ITEMS * 2))
        for way in ways:
            target, proxy = _target(cluster, way)
            try:
                gens.run(
                    Load(target, "digits", "miss", concurrency=8, seconds=1.0), seed_base=1
                )  # warm the path
                for workload in ("miss", "hit"):
                    for r in range(repeats):
                        before, t0 = cluster.cpu(), time.perf_counter()
                        if proxy is not None:
                            proxy_before = sum(_cpu(proxy))
                        run = gens.run(
                            Load(target, "digits", workload, concurrency=concurrency, seconds=seconds)
                        )
                        elapsed = time.perf_counter() - t0
                        cpu = {k: v - before.get(k, 0.0) for k, v in cluster.cpu().items()}
                        if proxy is not None:
                            cpu["proxy"] = sum(_cpu(proxy)) - proxy_before
                        cell = {
                            "way": way,
                            "workload": workload,
                            "concurrency": concurrency,
                            "repeat": r,
                            **run.summary(),
                            "wall_s": elapsed,
                            "cpu_ms_per_request": {k: v * 1000 / run.ok for k, v in cpu.items()}
                            if run.ok
                            else {},
                        }
                        cells.append(cell)
                        print(
                            f"{way:10} {workload:4}@{concurrency}: {cell['rps']:7.0f}/s"
                            f"  p50 {cell['p50_ms']:6.1f} ms  p99 {cell['p99_ms']:6.1f} ms"
                            f"  errors {run.errors or 0}  "
                            + "  ".join(f"{k} {v:.2f}" for k, v in sorted(cell["cpu_ms_per_request"].items()))
                            + " (CPU ms/request)",
                            flush=True,
                        )
            finally:
                if proxy is not None:
                    proxy.stop()
    return cells


def _cpu(proxy: ProxyProcess) -> list[float]:
    from bench import procs

    return [procs.cpu_s(p) for p in procs.tree(proxy.popen.pid)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--ways", default=",".join(WAYS), help="comma-separated subset of " + ", ".join(WAYS))
    p.add_argument("--out", default=None)
    args = p.parse_args()
    ways = [w for w in args.ways.split(",") if w]
    unknown = set(ways) - set(WAYS)
    if unknown:
        p.error(f"unknown ways: {', '.join(sorted(unknown))}")
    cells = measure(args.seconds, args.concurrency, args.repeats, ways)
    path = results.write("proxy", {"cells": cells}, out=None if args.out is None else Path(args.out))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
