"""Baseline servers for bench/harness.py, each run as its own process on a loopback port.

    python -m bench.baselines threadpool --port P --repository DIR [--threads 10]
    python -m bench.baselines fixed --port P
    python -m bench.baselines raw --repository DIR --model NAME [--seconds 0.5] [--repeats 3]

- `threadpool` (baseline 2): the design most tutorials ship. A synchronous grpc server
  whose ThreadPoolExecutor runs the model once per request (batch 1, frozen TorchScript
  through workers.runtime.ModelRunner), no cache, no queue. It serves the same
  `inferpool.v1.InferenceService/Classify` contract, so the same load generator drives it.
- `fixed` (baseline 3): a bare grpc.aio server answering every Classify with one
  prebuilt response: the RPC floor of this machine (uvloop when installed, like the API).
- `raw` (baseline 1): the model alone, no RPC, by batch size; prints JSON. The best
  batch is the compute limit the bulk path is compared with.

The naive queue path (baseline 4) is no server of its own: bench/harness.py runs the
real stack with front-side coalescing turned as far off as settings allow.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np

from inferpool.errors import InvalidInput
from inferpool.repository import ModelConfig, Repository, RepositoryError
from inferpool.v1 import inference_pb2, inference_pb2_grpc

Request = inference_pb2.ClassifyRequest
Response = inference_pb2.ClassifyResponse


def _answer(cfg: ModelConfig, probs: np.ndarray, top_k: int, request_id: str, ms: float) -> Response:
    k = min(max(1, top_k), probs.shape[-1])
    best = np.argsort(-probs)[:k]
    return Response(
        classes=[
            inference_pb2.ClassScore(index=int(i), label=cfg.label(int(i)), score=float(probs[i]))
            for i in best
        ],
        model=cfg.name,
        version=cfg.version,
        cached=False,
        timings=inference_pb2.Timings(total_ms=ms, compute_ms=ms, batch_size=1),
        request_id=request_id,
    )


class ThreadPoolServicer(inference_pb2_grpc.InferenceServiceServicer):
    """Classify = validate, run the model on this one input, answer: in the handler thread."""

    def __init__(self, repository: Path) -> None:
        from workers.runtime import ModelRunner, configure_threads, pick_device, usable_cores

        # Every core: the baseline at its best (the worker leaves one to its own threads).
        configure_threads(usable_cores())
        self.repository = Repository.load(repository)
        self.runners: dict[str, ModelRunner] = {}
        for name in self.repository.names:
            cfg = self.repository.resolve(name, 0)
            # One runner per model shared by the handler threads: on CPU ModelRunner
            # has no staging buffer, and a frozen TorchScript forward is reentrant.
            runner = ModelRunner(cfg, pick_device("cpu"))
            runner.warm_up()
            self.runners[name] = runner

    def Classify(self, request: Request, context: grpc.ServicerContext) -> Response:
        t0 = time.perf_counter()
        try:
            cfg = self.repository.resolve(request.model, request.version)
        except RepositoryError as exc:
            context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        try:
            array = cfg.validate(request.input)
        except InvalidInput as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        # validate() returns a read-only view of the request bytes; torch wants its own.
        probs = self.runners[cfg.name].run(array.copy())[0]
        return _answer(cfg, probs, request.top_k, request.request_id, (time.perf_counter() - t0) * 1000)


def serve_threadpool(port: int, repository: Path, threads: int) -> None:
    servicer = ThreadPoolServicer(repository)  # loads and warms before the port opens
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=threads))
    inference_pb2_grpc.add_InferenceServiceServicer_to_server(servicer, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    server.wait_for_termination()


class FixedServicer(inference_pb2_grpc.InferenceServiceServicer):
    """Parses nothing beyond what grpc does and answers at once: the RPC floor."""

    def __init__(self) -> None:
        self.response = Response(
            classes=[inference_pb2.ClassScore(index=3, label="3", score=0.99)],
            model="digits",
            version=1,
            cached=True,
        )

    async def Classify(self, request: Request, context: grpc.aio.ServicerContext) -> Response:
        return self.response


async def _serve_fixed(port: int) -> None:
    server = grpc.aio.server()
    inference_pb2_grpc.add_InferenceServiceServicer_to_server(FixedServicer(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


def serve_fixed(port: int) -> None:
    try:
        import uvloop
    except ImportError:
        asyncio.run(_serve_fixed(port))
    else:
        uvloop.run(_serve_fixed(port))


def raw_throughput(repository: Path, model: str, seconds: float, repeats: int = 3) -> dict[str, float]:
    """Items/s of `model` alone in this process by batch size (all cores), up to its
    max_batch_size: the median of `repeats` timings of `seconds` each."""
    from workers.runtime import ModelRunner, configure_threads, pick_device, usable_cores

    configure_threads(usable_cores())
    cfg = Repository.load(repository).resolve(model, 0)
    runner = ModelRunner(cfg, pick_device("cpu"))
    runner.warm_up()
    batches = sorted({b for b in (1, 8, 16, 32, 64, 128) if b <= cfg.max_batch_size} | {cfg.max_batch_size})
    rates: dict[str, float] = {}
    for batch in batches:
        x = np.random.default_rng(batch).random((batch, *cfg.input_shape), dtype=np.float32)
        runner.run(x)  # a first call per shape lets the JIT settle
        timings = []
        for _ in range(repeats):
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                runner.run(x)
                n += batch
            timings.append(n / (time.perf_counter() - t0))
        rates[str(batch)] = statistics.median(timings)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="kind", required=True)
    tp = sub.add_parser("threadpool", help="baseline 2: model per request in a thread pool")
    tp.add_argument("--port", type=int, required=True)
    tp.add_argument("--repository", type=Path, required=True)
    # grpc's own examples and most tutorials use futures.ThreadPoolExecutor(max_workers=10).
    tp.add_argument("--threads", type=int, default=10)
    fx = sub.add_parser("fixed", help="baseline 3: bare grpc.aio server, fixed response")
    fx.add_argument("--port", type=int, required=True)
    raw = sub.add_parser("raw", help="baseline 1: the model alone by batch size (JSON)")
    raw.add_argument("--repository", type=Path, required=True)
    raw.add_argument("--model", default="digits")
    raw.add_argument("--seconds", type=float, default=0.5, help="length of one timing")
    raw.add_argument("--repeats", type=int, default=3, help="timings per batch size (median)")
    args = parser.parse_args()
    if args.kind == "threadpool":
        serve_threadpool(args.port, args.repository, args.threads)
    elif args.kind == "fixed":
        serve_fixed(args.port)
    else:
        print(json.dumps(raw_throughput(args.repository, args.model, args.seconds, args.repeats)))


if __name__ == "__main__":
    main()
