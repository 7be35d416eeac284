"""The one load generator every benchmark drives Classify with.

`drive(Load(...))` is a coroutine (await it in any event loop, or `run(load)`): a closed
loop of `concurrency` callers, or an open loop at `rate` requests/s whose latency counts
from each call's scheduled time (a server that falls behind cannot hide its queueing).
Workloads, and how many distinct inputs each draws from:

- `miss`: a fresh random tensor per request from a seed of its own (distinct inputs =
  requests sent); the replies' `cached` count proves each was a miss;
- `hit`: a set of `HOT_ITEMS` inputs, warmed into the cache beforehand (`warm_hits`);
- `zipf`: `ZIPF_ITEMS` inputs drawn Zipf(`ZIPF_S`), a fresh pool per run (starts cold);
- `mix`: fresh and hot inputs alternating (half misses, half hits).

Each run also reports the generator's own CPU time and its event-loop lag (the lateness
of a task that wakes every `LAG_TICK_S`): a busy generator delays sends and replies and
reads as a slow server, so a benchmark marks runs whose lag p99 passes `MAX_LAG_P99_MS`.

bench/generators.py runs it in processes of their own process group (a new session,
apart from the benchmark and from any server tree it measures).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
import xxhash

from bench.heavy import HEAVY_MODEL, HEAVY_SHAPE, OVERLOAD_MODEL, OVERLOAD_SHAPE

# One input's shape per model, without the batch dimension of 1.
SHAPES: dict[str, tuple[int, ...]] = {
    "digits": (1, 28, 28),
    HEAVY_MODEL: HEAVY_SHAPE,
    OVERLOAD_MODEL: OVERLOAD_SHAPE,
}
WORKLOADS = ("miss", "hit", "zipf", "mix")
HOT_ITEMS = 256
HOT_SEED = 12345
ZIPF_ITEMS = 4096
ZIPF_S = 1.1
LAG_TICK_S = 0.005
MAX_LAG_P99_MS = 20.0


@dataclass
class Load:
    target: str
    model: str = "digits"
    workload: str = "miss"
    concurrency: int = 0  # closed-loop callers; 0 = an open loop at `rate`
    rate: float = 0.0
    seconds: float = 1.0
    max_requests: int = 0  # closed loop: stop after this many sent (0 = none)
    seed: int = 0  # unique per run and generator: miss inputs never repeat
    pool_seed: int = 0  # zipf: the pool every generator of a run shares
    timeout_s: float = 5.0
    max_outstanding: int = 4096  # open loop: past it sends are counted as `shed`
    start_at: float = 0.0  # wall clock to start at (lines processes up); 0 = now
    record_calls: bool = False  # keep (scheduled offset s, status, latency s) per call
    backoff_s: float = 0.0  # closed loop: a refused (RESOURCE_EXHAUSTED) caller's pause


@dataclass
class Run:
    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    cached: int = 0
    sent: int = 0
    distinct: int = 0
    shed: int = 0
    elapsed_s: float = 0.0
    cpu_s: float = 0.0  # the generator's own CPU (every thread of its process)
    lag_p50_ms: float = float("nan")
    lag_p99_ms: float = float("nan")
    lat_ms: np.ndarray = field(default_factory=lambda: np.zeros(0))
    # RESOURCE_EXHAUSTED calls: their latencies, and how many the server's concurrent-RPC bound refused.
    refused_ms: np.ndarray = field(default_factory=lambda: np.zeros(0))
    refused_by_rpc_limit: int = 0
    calls: list[tuple[float, str, float]] | None = None
    # A 64-bit digest of each input sent (the same in every process): runs merge by union.
    seen: set[int] = field(default_factory=set)

    @property
    def rps(self) -> float:
        return self.ok / self.elapsed_s if self.elapsed_s else 0.0

    def pct(self, q: float) -> float:
        return float(np.percentile(self.lat_ms, q)) if len(self.lat_ms) else float("nan")

    @property
    def p50_ms(self) -> float:
        return self.pct(50)

    @property
    def p99_ms(self) -> float:
        return self.pct(99)

    def summary(self) -> dict[str, Any]:
        """The figures of this run, without the raw latencies."""
        return {
            "rps": self.rps,
            "p50_ms": self.p50_ms,
            "p99_ms": self.p99_ms,
            "ok": self.ok,
            "errors": self.errors,
            "cached": self.cached,
            "sent": self.sent,
            "distinct_inputs": self.distinct,
            "shed": self.shed,
            "elapsed_s": self.elapsed_s,
            "gen_cpu_s": self.cpu_s,
            "gen_cpu_ms_per_request": self.cpu_s * 1000 / self.ok if self.ok else float("nan"),
            "gen_lag_p50_ms": self.lag_p50_ms,
            "gen_lag_p99_ms": self.lag_p99_ms,
        }


def hot_set(model: str, seed: int = HOT_SEED) -> np.ndarray:
    return np.random.default_rng(seed).random((HOT_ITEMS, 1, *SHAPES[model]), dtype=np.float32)


def inputs(load: Load) -> Iterator[np.ndarray]:
    """The endless input stream of `load`'s workload, each [1, *shape]."""
    shape = (1, *SHAPES[load.model])
    rng = np.random.default_rng(load.seed)
    if load.workload == "miss":
        while True:
            yield rng.random(shape, dtype=np.float32)
    if load.workload in ("hit", "mix"):
        hot = hot_set(load.model)
        i = load.seed
        while True:
            i += 1
            yield hot[i % HOT_ITEMS]
            if load.workload == "mix":
                yield rng.random(shape, dtype=np.float32)
    if load.workload != "zipf":
        raise ValueError(f"unknown workload {load.workload!r}; expected one of {WORKLOADS}")
    pool = np.random.default_rng(load.pool_seed).random((ZIPF_ITEMS, *shape), dtype=np.float32)
    weights = 1.0 / np.arange(1, ZIPF_ITEMS + 1) ** ZIPF_S
    while True:
        for index in rng.choice(ZIPF_ITEMS, size=4096, p=weights / weights.sum()):
            yield pool[index]


async def _lag_monitor(lags: list[float], stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        t0 = loop.time()
        await asyncio.sleep(LAG_TICK_S)
        lags.append(loop.time() - t0 - LAG_TICK_S)


async def drive(load: Load) -> Run:
    """One measured run of `load` from this process's event loop."""
    from inferpool import tensor
    from inferpool.v1 import inference_pb2, inference_pb2_grpc

    run = Run(calls=[] if load.record_calls else None)
    latencies: list[float] = []
    refused: list[float] = []
    errors: Counter[str] = Counter()
    source = inputs(load)

    def request() -> inference_pb2.ClassifyRequest:
        x = next(source)
        run.seen.add(xxhash.xxh3_64_intdigest(x.data))
        run.sent += 1
        return inference_pb2.ClassifyRequest(model=load.model, input=tensor.to_proto(x))

    from inferpool.client import service_config

    # round_robin over every address of the target (`ipv4:a,b`: several replicas, no
    # proxy); no retries: a benchmark counts each failure.
    options = [("grpc.service_config", service_config(1))]
    async with grpc.aio.insecure_channel(load.target, options=options) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        await asyncio.wait_for(channel.channel_ready(), 10)
        if load.start_at:
            await asyncio.sleep(max(0.0, load.start_at - time.time()))
        lags: list[float] = []
        stop = asyncio.Event()
        monitor = asyncio.create_task(_lag_monitor(lags, stop))
        cpu0, t_start = time.process_time(), time.perf_counter()
        t_stop = t_start + load.seconds

        async def one(req: inference_pb2.ClassifyRequest, t0: float) -> str:
            try:
                response = await stub.Classify(req, timeout=load.timeout_s)
                status = "OK"
            except grpc.aio.AioRpcError as exc:
                status = exc.code().name
                errors[status] += 1
                if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    refused.append(time.perf_counter() - t0)
                    # grpc's own words when the server's concurrent-RPC bound refused it.
                    run.refused_by_rpc_limit += "Concurrent RPC limit" in (exc.details() or "")
            else:
                latencies.append(time.perf_counter() - t0)
                run.cached += response.cached
            if run.calls is not None:
                run.calls.append((t0 - t_start, status, time.perf_counter() - t0))
            return status

        if load.concurrency:

            async def caller() -> None:
                while time.perf_counter() < t_stop and not (
                    load.max_requests and run.sent >= load.max_requests
                ):
                    status = await one(request(), time.perf_counter())
                    if status == "RESOURCE_EXHAUSTED" and load.backoff_s:
                        await asyncio.sleep(load.backoff_s)

            await asyncio.gather(*(caller() for _ in range(load.concurrency)))
        else:
            await _open_loop(load, one, request, t_start, t_stop, run)
        run.elapsed_s = time.perf_counter() - t_start
        run.cpu_s = time.process_time() - cpu0
        stop.set()
        await monitor
    run.ok, run.errors, run.distinct = len(latencies), dict(errors), len(run.seen)
    run.lat_ms = np.asarray(latencies, dtype=np.float64) * 1000
    run.refused_ms = np.asarray(refused, dtype=np.float64) * 1000
    if lags:
        lag_ms = np.asarray(lags) * 1000
        run.lag_p50_ms, run.lag_p99_ms = float(np.percentile(lag_ms, 50)), float(np.percentile(lag_ms, 99))
    return run


async def _open_loop(load: Load, one: Any, request: Any, t_start: float, t_stop: float, run: Run) -> None:
    interval = 1.0 / load.rate
    tasks: set[asyncio.Task[None]] = set()
    i = 0
    while (scheduled := t_start + i * interval) < t_stop:
        i += 1
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if len(tasks) >= load.max_outstanding:
            run.shed += 1
            continue
        # Latency from the scheduled time: a late send counts against the server.
        task = asyncio.create_task(one(request(), scheduled))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.wait(tasks)


def run(load: Load) -> Run:
    """`drive(load)` on a fresh event loop (uvloop when installed: less client CPU)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(drive(load))
    return uvloop.run(drive(load))
