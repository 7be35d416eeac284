"""`make demo`: start the stack, classify the held-out digits twice through gRPC, stop.

The first pass is all cache misses (computed by the batching worker), the second
all hits (served from Memcached). Prints accuracy, hit ratio and latencies, then
what Flower and the worker's Prometheus endpoint saw of it.
"""

from __future__ import annotations

import asyncio
import time

import grpc
import numpy as np

from bench.scrape import scrape, total
from bench.stack import ROOT, LocalStack
from inferpool.client import AsyncClient
from inferpool.names import task_name

CONCURRENCY = 16


async def classify_all(target: str, images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Returns (predicted labels, cached flags, latencies in ms, wall seconds)."""
    predicted = np.full(len(images), -1)
    cached = np.zeros(len(images), bool)
    latency_ms = np.zeros(len(images))
    gate = asyncio.Semaphore(CONCURRENCY)
    async with AsyncClient(target) as client:

        async def one(i: int) -> None:
            async with gate:
                t0 = time.perf_counter()
                try:
                    response = await client.classify(images[i][None], "digits", timeout_s=10)
                except grpc.aio.AioRpcError as exc:
                    print(f"  image {i}: {exc.code().name} {exc.details()}")
                    return
                latency_ms[i] = (time.perf_counter() - t0) * 1000
                predicted[i] = response.classes[0].index
                cached[i] = response.cached

        t0 = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(len(images))))
        return predicted, cached, latency_ms, time.perf_counter() - t0


def _flower_counts(stack: LocalStack) -> tuple[int, int, int]:
    """(workers online, tasks succeeded, tasks failed) from Flower's workers table."""
    workers = stack.flower_json("/workers?json=1")["data"]
    return (
        sum(bool(w.get("status")) for w in workers),
        sum(w.get("task-succeeded", 0) for w in workers),
        sum(w.get("task-failed", 0) for w in workers),
    )


def _worker_metrics_summary(url: str) -> str:
    try:
        samples = scrape(url)
    except OSError as exc:
        return f"unreachable ({exc})"
    batches = total(samples, "inferpool_batch_size_count")
    items = total(samples, "inferpool_batch_size_sum")
    if not batches:
        return "no batch observed (the batcher does not report to Prometheus yet)"
    return f"{batches:.0f} batches, {items / batches:.1f} items per batch on average"


def main() -> None:
    data = np.load(ROOT / "models" / "digits" / "heldout.npz")
    x, y = data["x"], data["y"]
    print("starting redis, memcached, a worker, the API and Flower (honcho, Procfile) on loopback ...")
    with LocalStack() as stack:
        user, password = stack.flower_auth
        print(f"stack ready, API on {stack.target}, Flower on {stack.flower_url}/ ({user} / {password})")
        print(f"draw a digit at http://{stack.http_target}/ (KServe v2 REST on the same port)")
        # The stack waited for Flower to reach the worker: its tasks show from the first.
        events_on = stack.task_events_on
        try:
            _, succeeded_before, failed_before = _flower_counts(stack)
        except OSError:
            succeeded_before = failed_before = 0
        print(f"classifying {len(x)} held-out digits twice\n")
        print(f"{'pass':<14}{'accuracy':>10}{'cached':>9}{'p50 ms':>9}{'p99 ms':>9}{'img/s':>8}")
        for name in ("1: misses", "2: repeats"):
            predicted, cached, ms, wall = asyncio.run(classify_all(stack.target, x))
            accuracy = float((predicted == y).mean())
            print(
                f"{name:<14}{accuracy:>10.2%}{cached.mean():>9.0%}{np.percentile(ms, 50):>9.2f}"
                f"{np.percentile(ms, 99):>9.2f}{len(x) / wall:>8.0f}"
            )
        try:
            online, succeeded, failed = _flower_counts(stack)
            flower = (
                f"{online} worker(s) online; during the passes {succeeded - succeeded_before} "
                f"{task_name('digits')} tasks (queue messages) succeeded, {failed - failed_before} failed"
            )
            if not events_on:
                flower += " (task events were not on yet: Flower had not reached the worker)"
        except OSError as exc:
            flower = f"unreachable ({exc})"
        print(f"\nflower:  {flower}")
        worker_metrics = stack.metrics_urls["worker"]
        print(f"metrics: {worker_metrics}: {_worker_metrics_summary(worker_metrics)}")
        print(f"\n(concurrency {CONCURRENCY}; stack log: {stack.log_path})")
    print("stack stopped")


if __name__ == "__main__":
    main()
