"""Soak: a moderate, steady mix of traffic for minutes, watching for leaks.

Starts the stack on loopback and, for `--minutes`, offers Classify at a fixed rate
(fresh inputs and repeats of a warm set, so both misses and hits) plus a small bulk
job every `--job-every-s` seconds. Every `--sample-s` it records the API's and the
worker's RSS, Redis's key count and memory, and the reply lists alive. Reports the
error count, and the growth of each sample series between the first and the last
minute (after a warm-up minute), which should be noise.

    python -m bench.soak [--minutes 10] [--rate 150]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import time
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import redis

from bench.overload import rss_mb, stack_pids
from bench.stack import ROOT, LocalStack
from inferpool.client import AsyncClient, Client
from inferpool.jobs import state_name

RESULTS = ROOT / "bench" / "results"
SHAPE = (1, 1, 28, 28)


async def soak(target: str, redis_url: str, pids: dict[str, int], args: argparse.Namespace) -> dict[str, Any]:
    r = redis.Redis.from_url(redis_url)
    rng = np.random.default_rng(0)
    warm = rng.random((64, *SHAPE), dtype=np.float32)
    codes: Counter[str] = Counter()
    jobs: Counter[str] = Counter()
    samples: list[dict[str, float]] = []
    duration_s = args.minutes * 60
    tasks: set[asyncio.Task[None]] = set()
    async with AsyncClient(target) as client:

        async def one(i: int) -> None:
            image = warm[i % len(warm)] if i % 2 else rng.random(SHAPE, dtype=np.float32)
            try:
                await client.classify(image, "digits", timeout_s=2.0)
                codes["OK"] += 1
            except grpc.aio.AioRpcError as exc:
                codes[exc.code().name] += 1

        def bulk_job(seed: int) -> str:
            with Client(target) as c:
                x = np.random.default_rng(seed).random((args.job_items, *SHAPE[1:]), dtype=np.float32)
                return state_name(c.submit(x, "digits").wait(timeout_s=120).state)

        async def jobs_loop() -> None:
            seed = 1
            while True:
                jobs[await asyncio.to_thread(bulk_job, seed)] += 1
                seed += 1
                await asyncio.sleep(args.job_every_s)

        job_task = asyncio.create_task(jobs_loop())
        start = time.perf_counter()
        next_sample = 0.0
        sent = 0
        while (now := time.perf_counter() - start) < duration_s:
            while sent < int(now * args.rate) + 1:
                task = asyncio.create_task(one(sent))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                sent += 1
            if now >= next_sample:
                info = r.info("memory")
                samples.append(
                    {
                        "t": now,
                        **{f"rss_{k}_mb": rss_mb(p) for k, p in pids.items()},
                        # Job records are kept for the job TTL by design; everything else must not grow.
                        "redis_job_keys": float(sum(1 for _ in r.scan_iter("inferpool:job:*"))),
                        "redis_other_keys": float(r.dbsize())
                        - float(sum(1 for _ in r.scan_iter("inferpool:job:*"))),
                        "redis_used_mb": info["used_memory"] / 2**20,
                        "reply_lists": float(sum(1 for _ in r.scan_iter("inferpool:reply:*"))),
                    }
                )
                next_sample += args.sample_s
            await asyncio.sleep(0.005)
        job_task.cancel()
        if tasks:
            await asyncio.wait(tasks)
    r.close()
    first = [s for s in samples if 60 <= s["t"] < 120] or samples[:1]
    last = [s for s in samples if s["t"] >= samples[-1]["t"] - 60] or samples[-1:]
    growth = {
        k: statistics.mean(s[k] for s in last) - statistics.mean(s[k] for s in first)
        for k in samples[0]
        if k != "t"
    }
    return {
        "sent": sent,
        "codes": dict(codes),
        "error_rate": 1 - codes["OK"] / max(1, sum(codes.values())),
        "bulk_jobs": dict(jobs),
        "growth_last_minute_vs_second_minute": growth,
        "samples": samples,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=150.0, help="Classify calls per second")
    parser.add_argument("--job-every-s", type=float, default=20.0, help="pause between bulk jobs")
    parser.add_argument("--job-items", type=int, default=2000)
    parser.add_argument("--sample-s", type=float, default=10.0)
    parser.add_argument("--out", type=Path, default=RESULTS / "soak.json")
    args = parser.parse_args()
    with LocalStack(flower=False) as stack:
        assert stack.proc is not None
        result = asyncio.run(soak(stack.target, stack.redis_url, stack_pids(stack.proc.pid), args))
    print(
        f"\nsoak: {args.minutes:g} min at {args.rate:g} Classify/s plus a {args.job_items}-item job every "
        f"{args.job_every_s:g} s"
    )
    print(f"  calls {result['sent']:,}, codes {result['codes']}, error rate {result['error_rate']:.4%}")
    print(f"  bulk jobs by final state: {result['bulk_jobs']}")
    print("  growth, last minute vs second minute:")
    for k, v in result["growth_last_minute_vs_second_minute"].items():
        print(f"    {k:<18}{v:+10.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        **{k: str(v) for k, v in vars(args).items()},
    }
    args.out.write_text(json.dumps({"meta": meta, **result}, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
