"""Bounded closed-loop load on the Classify miss and hit paths (`make bench`).

Starts the Procfile stack on free loopback ports (or targets `--target`), drives it
from this process with bench/loadgen.py at fixed concurrency, and reports per phase the
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
from pathlib import Path
from typing import Any

from bench.loadgen import HOT_ITEMS, Load, drive
from bench.stack import ROOT, LocalStack

RESULTS = ROOT / "bench" / "results"


async def closed_loop(
    target: str, workload: str, concurrency: int, seconds: float, **load: Any
) -> dict[str, Any]:
    """One closed-loop run of bench/loadgen.py's `workload`, as this benchmark records it."""
    run = await drive(Load(target, workload=workload, concurrency=concurrency, seconds=seconds, **load))
    return {
        "requests": run.ok,
        "errors": sum(run.errors.values()),
        "cached": run.cached,
        "seconds": run.elapsed_s,
        "p50_ms": run.p50_ms,
        "p99_ms": run.p99_ms,
        "rps": run.rps,
    }


async def measure(target: str, seconds: float, repeats: int) -> list[dict[str, object]]:
    # Warm the cache with the hit-path inputs, and the worker's JIT with real traffic.
    await closed_loop(target, "hit", 16, 30, max_requests=HOT_ITEMS)
    await closed_loop(target, "miss", 16, 1.0)
    rows: list[dict[str, object]] = []
    for path, concurrency in (("miss", 1), ("miss", 64), ("hit", 1), ("hit", 64)):
        runs = [
            await closed_loop(target, path, concurrency, seconds, seed=1000 * concurrency + r)
            for r in range(repeats)
        ]
        rows.append(
            {
                "path": path,
                "concurrency": concurrency,
                "rps": statistics.median(run["rps"] for run in runs),
                "p50_ms": statistics.median(run["p50_ms"] for run in runs),
                "p99_ms": statistics.median(run["p99_ms"] for run in runs),
                "errors": sum(run["errors"] for run in runs),
                "cached_fraction": sum(run["cached"] for run in runs)
                / max(1, sum(run["requests"] for run in runs)),
                "runs": runs,
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
