"""What tracing costs: off (the default) and on at 100% sampling.

1. `micro`: the tracing calls one Classify miss makes on the API and the worker, timed
   in this process: off (no SDK: each helper returns a shared no-op), and on (the real
   SDK, batch span processor and OTLP exporter to an in-process receiver).
2. `stack` (unless --micro-only): the Procfile stack twice on free loopback ports,
   without tracing and with OTEL_EXPORTER_OTLP_ENDPOINT pointing at an in-process OTLP
   receiver (every span sampled), each driven closed-loop on the miss and hit paths;
   throughput and latency side by side, and the spans the receiver got.

    python -m bench.tracing [--seconds 5] [--micro-only]

Writes bench/results/tracing/<date>-<commit>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import time
from concurrent import futures
from typing import Any

import grpc

from bench import results
from bench.load import closed_loop
from bench.stack import LocalStack, free_port, wait_port
from inferpool import tracing

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def _receive(port: int, count: Any, stop: Any) -> None:
    """An OTLP/gRPC trace receiver that counts what it is sent (its own process)."""
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

    class Service(trace_service_pb2_grpc.TraceServiceServicer):
        def Export(self, request: Any, context: Any) -> Any:
            n = sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)
            with count.get_lock():
                count.value += n
            return trace_service_pb2.ExportTraceServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Service(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    stop.wait()
    server.stop(0)


class Sink:
    """The receiver in a process of its own, so that decoding the spans takes no CPU
    from the load generator (nor from the traced code in the micro-benchmark)."""

    def __init__(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._count = ctx.Value("q", 0)
        self._stop = ctx.Event()
        self.port = free_port()
        self._proc = ctx.Process(target=_receive, args=(self.port, self._count, self._stop), daemon=True)
        self._proc.start()
        wait_port(self.port, 30)

    @property
    def spans(self) -> int:
        return int(self._count.value)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self._stop.set()
        self._proc.join(10)
        if self._proc.is_alive():
            self._proc.kill()


class _Item:
    """Stands in for the batcher's Pending: what batch_scope reads of it."""

    class _I:
        traceparent = TRACEPARENT

    class _T:
        enqueued_unix_ns = 0

    item = _I()
    ticket = _T()


def _one_miss(metadata: tuple[tuple[str, str], ...]) -> None:
    """The tracing calls of one Classify miss, API and worker (a batch of one)."""
    with tracing.server_span("/inferpool.v1.InferenceService/Classify", metadata) as server:
        with tracing.span("inferpool.cache_lookup") as lookup:
            with tracing.span("inferpool.validate"):
                pass
            lookup.set_attribute("inferpool.cache.hit", False)
        with tracing.span("inferpool.single_flight", {"inferpool.flight.role": "leader"}):
            with tracing.span("inferpool.admission"):
                pass
            tracing.traceparent()
            with tracing.span("inferpool.publish") as publish:
                tracing.published(publish, None)
            with tracing.span("inferpool.reply_wait"):
                pass
            tracing.exemplar()
        tracing.set_rpc_code(server, "OK")
        tracing.exemplar()
    started = time.time_ns()
    with tracing.batch_scope([_Item()], dict, started):
        for name in ("worker.model", "worker.cache_write", "worker.reply"):
            with tracing.batch_child(name):
                pass
        tracing.exemplar()


def _time_per_call(n: int, metadata: tuple[tuple[str, str], ...]) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        _one_miss(metadata)
    return (time.perf_counter() - t0) / n * 1e6


def micro(n: int) -> dict[str, float]:
    tracing.shutdown()
    out = {
        "off_us_per_miss": _time_per_call(n, ()),
        "off_with_caller_context_us_per_miss": _time_per_call(n, (("traceparent", TRACEPARENT),)),
    }
    sink = Sink()
    try:
        tracing.setup("bench", {"OTEL_EXPORTER_OTLP_ENDPOINT": sink.endpoint})
        out["on_us_per_miss"] = _time_per_call(max(1, n // 10), ())
        tracing.force_flush()
    finally:
        tracing.shutdown()
        sink.stop()
    return out


async def _paths(target: str, seconds: float) -> list[dict[str, Any]]:
    await closed_loop(target, "miss", 16, min(seconds, 2.0))  # warm-up
    rows = []
    for path, concurrency in (("miss", 1), ("miss", 64), ("hit", 64)):
        run = await closed_loop(target, path, concurrency, seconds, seed=77 + concurrency)
        rows.append({"path": path, "concurrency": concurrency, **run})
    return rows


def stack(seconds: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with LocalStack(flower=False) as off:
        out["off"] = asyncio.run(_paths(off.target, seconds))
    sink = Sink()
    try:
        # Spans leave each process every 100 ms; every one is sampled (the default).
        env = {"OTEL_EXPORTER_OTLP_ENDPOINT": sink.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "100"}
        with LocalStack(extra_env=env, flower=False) as on:
            out["on"] = asyncio.run(_paths(on.target, seconds))
        out["spans_received"] = sink.spans
    finally:
        sink.stop()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each closed-loop run")
    parser.add_argument("--calls", type=int, default=20000, help="iterations of the micro-benchmark (off)")
    parser.add_argument("--micro-only", action="store_true", help="skip the two stacks")
    args = parser.parse_args()
    data: dict[str, Any] = {"micro": micro(args.calls)}
    print(
        "micro: tracing calls of one miss: off {off_us_per_miss:.2f} us, off with a caller's "
        "traceparent {off_with_caller_context_us_per_miss:.2f} us, on {on_us_per_miss:.1f} us".format(
            **data["micro"]
        )
    )
    if not args.micro_only:
        data["stack"] = stack(args.seconds)
        head = " | ".join(f"{f'{mode}: rps':>9} {'p50':>7} {'p99':>7}" for mode in ("off", "on"))
        print(f"{'path':>6} {'conc':>5} | {head}")
        for off, on in zip(data["stack"]["off"], data["stack"]["on"], strict=True):
            print(
                f"{off['path']:>6} {off['concurrency']:>5} | "
                + " | ".join(f"{r['rps']:>9.0f} {r['p50_ms']:>7.2f} {r['p99_ms']:>7.2f}" for r in (off, on))
            )
        print(f"spans received with tracing on: {data['stack']['spans_received']}")
    path = results.write("tracing", data)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
