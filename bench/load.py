"""Bounded closed-loop load on the Classify miss and hit paths (`make bench`).

Starts the Procfile stack on free loopback ports (or targets `--target`), drives it
from this process with grpc.aio at fixed concurrency, and reports per phase the
median over `--repeats` runs of throughput and latency percentiles. Prints a table
and writes bench/results/load.json.

    python -m bench.load [--seconds 5] [--repeats 3] [--target HOST:PORT]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc
import numpy as np

from bench.stack import ROOT, LocalStack
from inferpool.client import AsyncClient

RESULTS = ROOT / "bench" / "results"
SHAPE = (1, 1, 28, 28)


@dataclass
class Run:
    requests: int
    errors: int
    cached: int
    seconds: float
    p50_ms: float
    p99_ms: float

    @property
    def rps(self) -> float:
        return self.requests / self.seconds


async def closed_loop(
    target: str,
    next_input: Callable[[int], np.ndarray],
    concurrency: int,
    seconds: float,
    max_requests: int = 1_000_000,
    timeout_s: float = 5.0,
    model: str = "digits",
) -> Run:
    """`concurrency` callers, each sending its next request when the last one returns,
    until `seconds` pass or `max_requests` are sent."""
    latencies: list[float] = []
    errors = cached = sent = 0
    stop_at = time.perf_counter() + seconds
    async with AsyncClient(target) as client:

        async def caller() -> None:
            nonlocal errors, cached, sent
            while sent < max_requests and time.perf_counter() < stop_at:
                image = next_input(sent)
                sent += 1
                t0 = time.perf_counter()
                try:
                    response = await client.classify(image, model, timeout_s=timeout_s)
                except grpc.aio.AioRpcError:
                    errors += 1
                    continue
                latencies.append(time.perf_counter() - t0)
                cached += response.cached

        t0 = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
    ms = np.asarray(latencies) * 1000 if latencies else np.zeros(1)
    return Run(
        requests=len(latencies),
        errors=errors,
        cached=cached,
        seconds=elapsed,
        p50_ms=float(np.percentile(ms, 50)),
        p99_ms=float(np.percentile(ms, 99)),
    )


def unique_images(seed: int, shape: tuple[int, ...] = SHAPE) -> Callable[[int], np.ndarray]:
    rng = np.random.default_rng(seed)
    return lambda _: rng.random(shape, dtype=np.float32)


def repeated_images(pool: np.ndarray) -> Callable[[int], np.ndarray]:
    return lambda i: pool[i % len(pool)]


async def measure(target: str, seconds: float, repeats: int) -> list[dict[str, object]]:
    hot = np.random.default_rng(12345).random((256, *SHAPE), dtype=np.float32)
    # Warm the cache with the hit-path inputs, and the worker's JIT with real traffic.
    await closed_loop(target, repeated_images(hot), 16, 30, max_requests=len(hot))
    await closed_loop(target, unique_images(0), 16, 1.0)
    rows = []
    for path, concurrency in (("miss", 1), ("miss", 64), ("hit", 1), ("hit", 64)):
        runs = []
        for r in range(repeats):
            source = unique_images(1000 * concurrency + r) if path == "miss" else repeated_images(hot)
            runs.append(await closed_loop(target, source, concurrency, seconds))
        rows.append(
            {
                "path": path,
                "concurrency": concurrency,
                "rps": statistics.median(run.rps for run in runs),
                "p50_ms": statistics.median(run.p50_ms for run in runs),
                "p99_ms": statistics.median(run.p99_ms for run in runs),
                "errors": sum(run.errors for run in runs),
                "cached_fraction": sum(run.cached for run in runs)
                / max(1, sum(run.requests for run in runs)),
                "runs": [asdict(run) | {"rps": run.rps} for run in runs],
            }
        )
    return rows


def print_table(rows: list[dict[str, object]], repeats: int) -> None:
    print(f"\nClassify closed loop, median of {repeats} runs (digits CNN, CPU, loopback)")
    head = f"{'inflight':>8}  {'path':<6}{'conc':>6}{'req/s':>10}{'p50 ms':>10}{'p99 ms':>10}"
    print(f"{head}{'cached':>9}{'errors':>8}")
    for row in rows:
        print(
            f"{row['max_inflight']!s:>8}  {row['path']:<6}{row['concurrency']:>6}{row['rps']:>10.0f}"
            f"{row['p50_ms']:>10.2f}{row['p99_ms']:>10.2f}{row['cached_fraction']:>9.0%}{row['errors']:>8}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per phase (the median is reported)")
    parser.add_argument("--target", help="host:port of a running API; default starts a local stack")
    parser.add_argument(
        "--inflight",
        default="",
        help="comma-separated INFERPOOL_MAX_INFLIGHT_ENVELOPES values to compare, one stack each",
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "load.json")
    args = parser.parse_args()

    rows: list[dict[str, object]] = []
    if args.target:
        rows = asyncio.run(measure(args.target, args.seconds, args.repeats))
        for row in rows:
            row["max_inflight"] = "?"
    else:
        default = os.environ.get("INFERPOOL_MAX_INFLIGHT_ENVELOPES", "default")
        for inflight in args.inflight.split(",") if args.inflight else [default]:
            # The stack inherits this environment: INFERPOOL_* variables configure it.
            env = {} if inflight == "default" else {"INFERPOOL_MAX_INFLIGHT_ENVELOPES": inflight}
            with LocalStack(extra_env=env, flower=False) as stack:
                for row in asyncio.run(measure(stack.target, args.seconds, args.repeats)):
                    rows.append({"max_inflight": inflight, **row})
    print_table(rows, args.repeats)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"machine": platform.machine(), "cpus": os.cpu_count(), "seconds": args.seconds}
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
