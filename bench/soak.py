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
import statistics
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import redis

from bench import procs, results
from bench.loadgen import SHAPES, Load, drive
from bench.stack import LocalStack
from inferpool.client import Client
from inferpool.jobs import state_name


async def soak(target: str, redis_url: str, pids: dict[str, int], args: argparse.Namespace) -> dict[str, Any]:
    r = redis.Redis.from_url(redis_url)
    jobs: Counter[str] = Counter()
    samples: list[dict[str, float]] = []
    duration_s = args.minutes * 60

    def bulk_job(seed: int) -> str:
        with Client(target) as c:
            x = np.random.default_rng(seed).random((args.job_items, *SHAPES["digits"]), dtype=np.float32)
            return state_name(c.submit(x, "digits").wait(timeout_s=120).state)

    async def jobs_loop() -> None:
        seed = 1
        while True:
            jobs[await asyncio.to_thread(bulk_job, seed)] += 1
            seed += 1
            await asyncio.sleep(args.job_every_s)

    async def sampler() -> None:
        start = time.perf_counter()
        while (now := time.perf_counter() - start) < duration_s:
            info = r.info("memory")
            job_keys = float(sum(1 for _ in r.scan_iter("inferpool:job:*")))
            samples.append(
                {
                    "t": now,
                    **{f"rss_{k}_mb": procs.rss_mb(p) for k, p in pids.items()},
                    # Job records are kept for the job TTL by design; everything else must not grow.
                    "redis_job_keys": job_keys,
                    "redis_other_keys": float(r.dbsize()) - job_keys,
                    "redis_used_mb": info["used_memory"] / 2**20,
                    "reply_lists": float(sum(1 for _ in r.scan_iter("inferpool:reply:*"))),
                }
            )
            await asyncio.sleep(args.sample_s)

    job_task = asyncio.create_task(jobs_loop())
    sample_task = asyncio.create_task(sampler())
    # Half fresh inputs, half repeats of a warm set: both misses and hits.
    load = Load(target, workload="mix", rate=args.rate, seconds=duration_s, timeout_s=2.0, seed=7)
    run = await drive(load)
    job_task.cancel()
    sample_task.cancel()
    r.close()
    codes = {"OK": run.ok, **run.errors}
    sent = run.sent
    first = [s for s in samples if 60 <= s["t"] < 120] or samples[:1]
    last = [s for s in samples if s["t"] >= samples[-1]["t"] - 60] or samples[-1:]
    growth = {
        k: statistics.mean(s[k] for s in last) - statistics.mean(s[k] for s in first)
        for k in samples[0]
        if k != "t"
    }
    return {
        "sent": sent,
        "codes": codes,
        "generator": run.summary(),
        "error_rate": 1 - run.ok / max(1, sum(codes.values())),
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
    parser.add_argument(
        "--out", type=Path, help="JSON path (default bench/results/soak/<date>-<commit>.json)"
    )
    args = parser.parse_args()
    info = results.meta({k: str(v) for k, v in vars(args).items() if k != "out"})
    with LocalStack() as stack:  # as `make up` runs it, Flower included
        pids = {k: p for k, p in procs.find(stack.pid).items() if k in ("api", "worker", "flower", "redis")}
        result = asyncio.run(soak(stack.target, stack.redis_url, pids, args))
    print(
        f"\nsoak: {args.minutes:g} min at {args.rate:g} Classify/s plus a {args.job_items}-item job every "
        f"{args.job_every_s:g} s"
    )
    print(f"  calls {result['sent']:,}, codes {result['codes']}, error rate {result['error_rate']:.4%}")
    print(f"  bulk jobs by final state: {result['bulk_jobs']}")
    print("  growth, last minute vs second minute:")
    for k, v in result["growth_last_minute_vs_second_minute"].items():
        print(f"    {k:<18}{v:+10.2f}")
    print(f"\nwrote {results.write('soak', result, args.out, info)}")


if __name__ == "__main__":
    main()
