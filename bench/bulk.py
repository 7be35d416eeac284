"""Bulk jobs next to interactive traffic, and bulk throughput next to the model alone.

Starts the Procfile stack on loopback (or targets `--target`) and measures, in one
run, each phase `--repeats` times, alternating:

- the model alone in this process (frozen TorchScript, best batch size): the
  compute limit of this machine;
- a bulk job alone: items/s from the start of the upload to SUCCEEDED, and over
  the job's compute phase (first to last result);
- Classify (fresh inputs, all misses) in a closed loop at each `--concurrency`,
  without and then with a bulk job running the whole time.

Each job also records the CPU time of every process of the stack (/proc) per item.
The stack runs as `make up` runs it, Flower included (`--no-flower` leaves it out).
Prints a table with medians and ratios and writes the JSON under bench/results/bulk/.

    python -m bench.bulk [--seconds 5] [--repeats 3] [--concurrency 1,16] [--bulk-items 20000]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench import procs, results
from bench.loadgen import SHAPES, Load, Run, drive
from bench.modeltime import best, model_alone
from bench.stack import ROOT, LocalStack
from inferpool.client import Client
from inferpool.jobs import TERMINAL, state_name

SHAPE = SHAPES["digits"]


def run_job(
    client: Client,
    items: int,
    seed: int,
    model: str = "digits",
    shape: tuple[int, ...] = SHAPE,
    pids: Callable[[], list[int]] | None = None,
) -> dict[str, Any]:
    """One job of `items` fresh random inputs of `shape`, from upload to its end.

    Besides the whole job's rate, the rate after the upload ended: the workers then
    have the cores to themselves, while during the upload the client and the API
    take their share (on a small machine the two rates differ by far). With `pids`
    (the stack's processes), the CPU µs each used per item over the whole job."""
    x = np.random.default_rng(seed).random((items, *shape), dtype=np.float32)
    before = procs.cpu_by_label(pids()) if pids else {}
    t0 = time.perf_counter()
    job = client.submit(x, model)
    uploaded = time.perf_counter()
    done_at_upload = job.status().counts.done
    checked = time.perf_counter()
    final = job.wait(timeout_s=600)
    total_s = time.perf_counter() - t0
    compute_s = (final.finished.ToMilliseconds() - final.started.ToMilliseconds()) / 1000
    cpu = procs.delta(before, procs.cpu_by_label(pids())) if pids else {}
    return {
        "items": items,
        "state": state_name(final.state),
        "upload_s": uploaded - t0,
        "total_s": total_s,
        "items_per_s": items / total_s,
        "compute_items_per_s": items / max(compute_s, 1e-3),
        "done_at_upload": done_at_upload,
        "after_upload_items_per_s": (items - done_at_upload) / max(t0 + total_s - checked, 1e-3),
        "server_cpu_us_per_item": {name: s * 1e6 / items for name, s in sorted(cpu.items())},
    }


async def classify_during_job(
    client: Client, target: str, concurrency: int, seconds: float, items: int, seed: int
) -> tuple[Run, bool]:
    """Classify load while a bulk job of `items` runs; True when the job was still
    running at the end of the measurement (the two really overlapped)."""
    x = np.random.default_rng(seed).random((items, *SHAPE), dtype=np.float32)
    job = await asyncio.to_thread(client.submit, x, "digits")
    run = await drive(Load(target, concurrency=concurrency, seconds=seconds, seed=seed + 1))
    status = await asyncio.to_thread(job.status)
    overlapped = state_name(status.state) not in TERMINAL
    await asyncio.to_thread(job.cancel)
    # Workers still take the cancelled job's queued chunks (to drop them, ~1 ms each):
    # a one-item job behind them ends once they are gone, so the next phase runs alone.
    probe = np.random.default_rng(seed + 2).random((1, *SHAPE), dtype=np.float32)
    await asyncio.to_thread(lambda: client.submit(probe, "digits").wait(timeout_s=300))
    return run, overlapped


async def measure(
    target: str, args: argparse.Namespace, pids: Callable[[], list[int]] | None = None
) -> dict[str, Any]:
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    with Client(target) as client:
        # Warm-up: the worker's JIT and the bulk path's first chunks.
        await asyncio.to_thread(run_job, client, 2000, 1)
        await drive(Load(target, concurrency=8, seconds=1.0, seed=2))
        jobs: list[dict[str, float]] = []
        alone: dict[int, list[Run]] = {c: [] for c in concurrencies}
        during: dict[int, list[Run]] = {c: [] for c in concurrencies}
        overlaps: dict[int, list[bool]] = {c: [] for c in concurrencies}
        for r in range(args.repeats):
            jobs.append(await asyncio.to_thread(run_job, client, args.bulk_items, 100 + r, pids=pids))
            # Sized so the job outlasts the measurement by a margin.
            rate = jobs[-1]["compute_items_per_s"]
            background = int(rate * args.seconds * 2) + args.bulk_items
            for c in concurrencies:
                alone[c].append(
                    await drive(Load(target, concurrency=c, seconds=args.seconds, seed=1000 * c + r))
                )
                run, overlapped = await classify_during_job(
                    client, target, c, args.seconds, background, 2000 * c + r
                )
                during[c].append(run)
                overlaps[c].append(overlapped)
    rows = []
    for c in concurrencies:
        a, d = alone[c], during[c]
        p99_alone = statistics.median(run.p99_ms for run in a)
        p99_during = statistics.median(run.p99_ms for run in d)
        rows.append(
            {
                "concurrency": c,
                "alone": {
                    "rps": statistics.median(run.rps for run in a),
                    "p50_ms": statistics.median(run.p50_ms for run in a),
                    "p99_ms": p99_alone,
                },
                "with_bulk": {
                    "rps": statistics.median(run.rps for run in d),
                    "p50_ms": statistics.median(run.p50_ms for run in d),
                    "p99_ms": p99_during,
                },
                "p99_ratio": p99_during / p99_alone,
                "errors": sum(sum(run.errors.values()) for run in a + d),
                "cached": sum(run.cached for run in a + d),
                "overlapped": overlaps[c],
                "runs_alone": [run.summary() for run in a],
                "runs_with_bulk": [run.summary() for run in d],
            }
        )
    return {
        "jobs": jobs,
        "bulk_items_per_s": statistics.median(j["items_per_s"] for j in jobs),
        "bulk_compute_items_per_s": statistics.median(j["compute_items_per_s"] for j in jobs),
        "bulk_after_upload_items_per_s": statistics.median(j["after_upload_items_per_s"] for j in jobs),
        "classify": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each Classify run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per phase (the median is reported)")
    parser.add_argument("--concurrency", default="1,16", help="Classify callers, comma-separated")
    parser.add_argument("--bulk-items", type=int, default=20000, help="items of the measured bulk job")
    parser.add_argument("--target", help="host:port of a running API; default starts a local stack")
    parser.add_argument(
        "--flower", action=argparse.BooleanOptionalAction, default=True, help="run Flower, as `make up` does"
    )
    parser.add_argument(
        "--out", type=Path, help="JSON path (default bench/results/bulk/<date>-<commit>.json)"
    )
    args = parser.parse_args()
    info = results.meta({"seconds": args.seconds, "repeats": args.repeats, "flower": args.flower})

    if args.target:
        result = asyncio.run(measure(args.target, args))
    else:
        with LocalStack(flower=args.flower) as stack:
            result = asyncio.run(measure(stack.target, args, lambda: procs.tree(stack.pid)))
    # Same run, stack idle: the compute limit the bulk path is compared with.
    rates = model_alone(ROOT / "models", "digits", seconds=1.0, repeats=1)
    top = best(rates)
    result["model_alone_items_per_s"] = rates
    result["model_best"] = {"batch": top["best_batch"], "items_per_s": top["best_items_per_s"]}
    best_batch = str(top["best_batch"])

    print(f"\nBulk vs model alone, median of {args.repeats} runs (digits CNN, CPU, loopback)")
    print(
        f"  model alone, best batch {best_batch}: {rates[best_batch]:>10,.0f} items/s   (by batch: "
        + ", ".join(f"{k}: {v:,.0f}" for k, v in rates.items())
        + ")"
    )
    for name, key in (
        ("bulk job, upload to SUCCEEDED", "bulk_items_per_s"),
        ("bulk job, compute phase", "bulk_compute_items_per_s"),
        ("bulk job, after its upload", "bulk_after_upload_items_per_s"),
    ):
        ratio = result[key] / rates[best_batch]
        print(f"  {name:<30}{result[key]:>10,.0f} items/s   ({ratio:.2f}x model alone)")
    for j in result["jobs"]:
        cpu = j["server_cpu_us_per_item"]
        if cpu:
            print("  CPU µs per item: " + ", ".join(f"{k} {v:.1f}" for k, v in cpu.items()))
    print(f"\nClassify (fresh inputs) without / with a concurrent bulk job of >= {args.bulk_items} items")
    print(
        f"{'conc':>6}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}   |{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}"
        f"{'p99 x':>8}{'errors':>8}  overlapped"
    )
    for row in result["classify"]:
        a, d = row["alone"], row["with_bulk"]
        print(
            f"{row['concurrency']:>6}{a['rps']:>10.0f}{a['p50_ms']:>9.2f}{a['p99_ms']:>9.2f}   |"
            f"{d['rps']:>10.0f}{d['p50_ms']:>9.2f}{d['p99_ms']:>9.2f}{row['p99_ratio']:>8.2f}"
            f"{row['errors']:>8}  {row['overlapped']}"
        )
    print(f"\nwrote {results.write('bulk', result, args.out, info)}")


if __name__ == "__main__":
    main()
