"""`make demo`: start the stack, classify the held-out digits twice through gRPC, stop.

The first pass is all cache misses (computed by the batching worker), the second
all hits (served from Memcached). Prints accuracy, hit ratio and latencies.
"""

from __future__ import annotations

import asyncio
import time

import grpc
import numpy as np

from bench.stack import ROOT, LocalStack
from inferpool.client import AsyncClient

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


def main() -> None:
    data = np.load(ROOT / "models" / "digits" / "heldout.npz")
    x, y = data["x"], data["y"]
    print("starting redis, memcached, a worker and the API (honcho, Procfile) on loopback ...")
    with LocalStack() as stack:
        print(f"stack ready, API on {stack.target}; classifying {len(x)} held-out digits twice\n")
        print(f"{'pass':<14}{'accuracy':>10}{'cached':>9}{'p50 ms':>9}{'p99 ms':>9}{'img/s':>8}")
        for name in ("1: misses", "2: repeats"):
            predicted, cached, ms, wall = asyncio.run(classify_all(stack.target, x))
            accuracy = float((predicted == y).mean())
            print(
                f"{name:<14}{accuracy:>10.2%}{cached.mean():>9.0%}{np.percentile(ms, 50):>9.2f}"
                f"{np.percentile(ms, 99):>9.2f}{len(x) / wall:>8.0f}"
            )
        print(f"\n(concurrency {CONCURRENCY}; stack log: {stack.log_path})")
    print("stack stopped")


if __name__ == "__main__":
    main()
