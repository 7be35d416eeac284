"""Overload: an open-loop burst far past the pool's capacity, then recovery.

Starts the stack on loopback (or targets `--target`), measures capacity (closed loop
at 64 in flight on fresh inputs), then offers `--factor` x that rate for `--burst-s`
seconds with a `--deadline-ms` deadline per call, then a calm phase at half the
capacity. Reports: how fast rejections (RESOURCE_EXHAUSTED) come back, whether
accepted calls met their deadline, the API and worker RSS over time, and the calm
phase's latency per second (recovery). The generator is one asyncio process: when it
cannot offer the requested rate, the table says what it did offer.

`--model resnet28` drives a heavier net behind digits-sized inputs (bench/heavy.py, made
in a temporary model repository): its pool capacity is low enough that one generator
process on a 2-core machine can offer 10x of it, which it cannot for the digits model.
(resnet64 is there too, but its 48 KB requests make the API's receiving, not the pool,
the limit under a 10x burst.)

On one small machine the burst's generator and the API's rejecting would take the
worker's CPU, so capacity would collapse during the burst for a reason a deployment
(workers on their own machines) does not have. `--pin` (the default with >= 2 CPUs)
gives the worker its own core with one torch thread and keeps everything else,
generator included, on the others: capacity is then measured and overloaded under the
same split.

    python -m bench.overload [--model digits|resnet28|resnet64] [--factor 10] [--burst-s 30]
                             [--deadline-ms 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import subprocess
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from bench.heavy import HEAVY_MODEL, HEAVY_SHAPE, OVERLOAD_MODEL, OVERLOAD_SHAPE, make_repository
from bench.load import SHAPE, closed_loop, unique_images
from bench.stack import ROOT, LocalStack
from inferpool.client import AsyncClient

RESULTS = ROOT / "bench" / "results"


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def pin(pid: int, cpus: set[int]) -> None:
    """Every thread of `pid` onto `cpus` (threads it starts later inherit it)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.sched_setaffinity(int(tid), cpus)


def all_pids(root_pid: int) -> list[int]:
    """`root_pid` and every process below it."""
    pids, todo = [], [root_pid]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
        todo.extend(map(int, out))
    return pids


def stack_pids(root_pid: int) -> dict[str, int]:
    """The API and worker processes under honcho, by their command lines."""
    found: dict[str, int] = {}
    for pid in all_pids(root_pid)[1:]:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv[1:3] == [b"-m", b"api"]:
            found["api"] = pid
        elif argv[1:3] == [b"-m", b"workers.main"]:
            found["worker"] = pid
    return found


SHAPES = {"digits": SHAPE, HEAVY_MODEL: (1, *HEAVY_SHAPE), OVERLOAD_MODEL: (1, *OVERLOAD_SHAPE)}


async def open_loop(
    target: str,
    rate: float,
    seconds: float,
    deadline_s: float,
    seed: int,
    max_outstanding: int = 512,
    model: str = "digits",
) -> tuple[list[tuple[float, str, float]], float]:
    """Starts one call every 1/rate s regardless of answers; returns (start offset,
    status, latency s) per call and the rate actually offered."""
    results: list[tuple[float, str, float]] = []
    next_image = unique_images(seed, SHAPES[model])
    async with AsyncClient(target) as client:
        tasks: set[asyncio.Task[None]] = set()

        async def one(offset: float) -> None:
            t0 = time.perf_counter()
            try:
                await client.classify(next_image(0), model, timeout_s=deadline_s)
                status = "OK"
            except grpc.aio.AioRpcError as exc:
                status = exc.code().name
            results.append((offset, status, time.perf_counter() - t0))

        start = time.perf_counter()
        sent = skipped = 0
        while (now := time.perf_counter() - start) < seconds:
            due = int(now * rate) + 1
            while sent + skipped < due:
                if len(tasks) >= max_outstanding:
                    # The generator itself is saturated: past this its own queueing, not
                    # the server, would dominate every latency it records.
                    skipped += 1
                    continue
                task = asyncio.create_task(one(now))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                sent += 1
            await asyncio.sleep(0.002)
        offered = sent / (time.perf_counter() - start)
        if tasks:
            await asyncio.wait(tasks)
    return results, offered


_BUCKET = re.compile(
    r"^inferpool_request_duration_seconds_bucket"
    r'\{code="(?P<code>[A-Z_]+)",le="(?P<le>[^"]+)",rpc="Classify"\} (?P<n>\S+)$'
)


def server_histograms(metrics_url: str | None) -> dict[str, dict[float, float]]:
    """Cumulative Classify latency buckets by status code, from the API's /metrics."""
    if not metrics_url:
        return {}
    text = urllib.request.urlopen(metrics_url, timeout=5).read().decode()
    out: dict[str, dict[float, float]] = {}
    for line in text.splitlines():
        m = _BUCKET.match(line)
        if m:
            out.setdefault(m["code"], {})[float(m["le"])] = float(m["n"])
    return out


def server_quantiles(
    before: dict[str, dict[float, float]], after: dict[str, dict[float, float]]
) -> dict[str, dict[str, float | None]]:
    """Per status code: calls, and the bucket bounds holding p50 and p99 (server side)."""
    result: dict[str, dict[str, float | None]] = {}
    for code, buckets in after.items():
        delta = {le: n - before.get(code, {}).get(le, 0.0) for le, n in sorted(buckets.items())}
        total = delta.get(float("inf"), 0.0)
        if total <= 0:
            continue

        def bound(q: float, delta: dict[float, float] = delta, total: float = total) -> float | None:
            for le, n in delta.items():
                if n >= q * total:
                    return le * 1000
            return None

        result[code] = {"calls": total, "p50_ms_at_most": bound(0.5), "p99_ms_at_most": bound(0.99)}
    return result


def summarize(results: list[tuple[float, str, float]], deadline_s: float) -> dict[str, Any]:
    codes = Counter(status for _, status, _ in results)
    ok = np.array([lat for _, s, lat in results if s == "OK"]) * 1000
    rejected = np.array([lat for _, s, lat in results if s == "RESOURCE_EXHAUSTED"]) * 1000

    def pct(a: np.ndarray, q: float) -> float | None:
        return float(np.percentile(a, q)) if len(a) else None

    return {
        "calls": len(results),
        "codes": dict(codes),
        "ok_p50_ms": pct(ok, 50),
        "ok_p99_ms": pct(ok, 99),
        "ok_over_deadline": int((ok > deadline_s * 1000).sum()),
        "rejected_p50_ms": pct(rejected, 50),
        "rejected_p99_ms": pct(rejected, 99),
    }


async def measure(
    target: str, pids: dict[str, int], args: argparse.Namespace, metrics_url: str | None = None
) -> dict[str, Any]:
    model, shape = args.model, SHAPES[args.model]
    await closed_loop(target, unique_images(1, shape), 16, 1.0, model=model)  # warm-up
    capacity_run = await closed_loop(target, unique_images(2, shape), 64, 3.0, model=model)
    capacity = capacity_run.rps
    rss: list[dict[str, float]] = []
    stop = asyncio.Event()

    async def sample() -> None:
        t0 = time.perf_counter()
        while not stop.is_set():
            rss.append({"t": time.perf_counter() - t0, **{k: rss_mb(p) for k, p in pids.items()}})
            await asyncio.sleep(1.0)

    sampler = asyncio.create_task(sample())
    deadline_s = args.deadline_ms / 1000
    before = server_histograms(metrics_url)
    burst, offered = await open_loop(
        target, capacity * args.factor, args.burst_s, deadline_s, 3, args.max_outstanding, model
    )
    server_burst = server_quantiles(before, server_histograms(metrics_url))
    calm, calm_offered = await open_loop(
        target, capacity * 0.5, args.calm_s, deadline_s, 4, args.max_outstanding, model
    )
    stop.set()
    await sampler
    per_second = []
    for second in range(int(args.calm_s)):
        lat = [lat * 1000 for t, s, lat in calm if s == "OK" and second <= t < second + 1]
        errors = sum(1 for t, s, _ in calm if s != "OK" and second <= t < second + 1)
        per_second.append(
            {
                "second": second,
                "ok": len(lat),
                "errors": errors,
                "p50_ms": float(np.median(lat)) if lat else None,
            }
        )
    return {
        "capacity_rps": capacity,
        "capacity_p50_ms": capacity_run.p50_ms,
        "burst": {
            "target_rps": capacity * args.factor,
            "offered_rps": offered,
            **summarize(burst, deadline_s),
            "server_side": server_burst,
        },
        "calm": {"target_rps": capacity * 0.5, "offered_rps": calm_offered, **summarize(calm, deadline_s)},
        "calm_per_second": per_second,
        "rss_mb": rss,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=sorted(SHAPES), default="digits", help="the model to overload")
    parser.add_argument("--factor", type=float, default=10.0, help="burst rate as a multiple of capacity")
    parser.add_argument("--burst-s", type=float, default=30.0)
    parser.add_argument("--calm-s", type=float, default=10.0)
    parser.add_argument("--deadline-ms", type=float, default=1000.0)
    parser.add_argument(
        "--max-outstanding", type=int, default=2048, help="calls the generator keeps in flight at most"
    )
    parser.add_argument("--target", help="host:port of a running API (no RSS then); default starts a stack")
    parser.add_argument(
        "--pin",
        action=argparse.BooleanOptionalAction,
        default=(os.cpu_count() or 1) >= 2,
        help="the worker alone on the last CPU, everything else on the others",
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "overload.json")
    args = parser.parse_args()
    if args.target:
        result = asyncio.run(measure(args.target, {}, args))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            repository = make_repository(Path(tmp), models=(args.model,)) if args.model != "digits" else None
            # One torch thread for the worker's one core: more would only contend.
            env = {"INFERPOOL_TORCH_THREADS": "1"} if args.pin else {}
            with LocalStack(flower=False, model_repository=repository, extra_env=env) as stack:
                assert stack.proc is not None
                pids = stack_pids(stack.proc.pid)
                if args.pin:
                    cpus = sorted(os.sched_getaffinity(0))
                    worker_cpus, rest = set(cpus[-1:]), set(cpus[:-1])
                    for pid in [os.getpid(), *all_pids(stack.proc.pid)]:
                        pin(pid, worker_cpus if pid == pids["worker"] else rest)
                    print(f"pinned: worker on CPU {sorted(worker_cpus)}, the rest on {sorted(rest)}")
                result = asyncio.run(measure(stack.target, pids, args, stack.metrics_urls.get("api")))

    b, c = result["burst"], result["calm"]
    print(f"\n{args.model}: capacity (closed loop, 64 in flight): {result['capacity_rps']:,.0f} req/s")
    print(f"{'phase':<7}{'target/s':>10}{'offered/s':>11}{'calls':>8}  codes")
    for name, phase in (("burst", b), ("calm", c)):
        print(
            f"{name:<7}{phase['target_rps']:>10,.0f}{phase['offered_rps']:>11,.0f}{phase['calls']:>8}"
            f"  {phase['codes']}"
        )

    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f}"

    print(
        f"\nburst: rejections p50 {ms(b['rejected_p50_ms'])} ms, p99 {ms(b['rejected_p99_ms'])} ms; "
        f"accepted p50 {ms(b['ok_p50_ms'])} ms, p99 {ms(b['ok_p99_ms'])} ms, "
        f"{b['ok_over_deadline']} answered past the deadline"
    )
    for code, q in b.get("server_side", {}).items():
        print(
            f"  server side {code}: {q['calls']:.0f} calls, p50 <= {ms(q['p50_ms_at_most'])} ms, "
            f"p99 <= {ms(q['p99_ms_at_most'])} ms (histogram bucket bounds)"
        )
    print(
        "calm, per second (ok / errors / p50 ms): "
        + ", ".join(f"{s['ok']}/{s['errors']}/{ms(s['p50_ms'])}" for s in result["calm_per_second"])
    )
    if result["rss_mb"]:
        first, peak, last = result["rss_mb"][0], {}, result["rss_mb"][-1]
        for k in first:
            if k != "t":
                peak[k] = max(r[k] for r in result["rss_mb"])
        print(
            "RSS MB (start / peak / end): "
            + ", ".join(f"{k} {first[k]:.0f} / {peak[k]:.0f} / {last[k]:.0f}" for k in peak)
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        **{k: v for k, v in vars(args).items() if k != "out"},
    }
    args.out.write_text(json.dumps({"meta": meta, **result}, indent=2, default=str))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
