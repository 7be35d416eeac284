"""Baseline servers for bench/harness.py, each run as its own process on a loopback port.

    python -m bench.baselines threadpool --port P --repository DIR [--threads 10] [--torch-threads 0]
    python -m bench.baselines fixed --port P
    python -m bench.baselines batcher --port P --repository DIR [--max-batch 64] [--window-ms 2]
    python -m bench.baselines raw --repository DIR --model NAME [--seconds 0.5] [--repeats 3]

- `threadpool` (baseline 2): the design most tutorials ship. A synchronous grpc server
  whose ThreadPoolExecutor runs the model once per request (batch 1, frozen TorchScript
  through workers.runtime.ModelRunner), no cache, no queue. It serves the same
  `inferpool.v1.InferenceService/Classify` contract, so the same load generator drives it.
- `fixed` (baseline 3): a bare grpc.aio server answering every Classify with one
  prebuilt response: the RPC floor of this machine (uvloop when installed, like the API).
- `batcher` (baseline 5): a grpc.aio server with an in-process dynamic batcher: each
  model's requests gather for up to `--window-ms` after the first, or until
  `--max-batch` are waiting, then run as one batch in a model thread (Triton's dynamic
  batcher's policy, without a queue or a second process).
- `raw` (baseline 1): the model alone, no RPC, by batch size (bench/modeltime.py);
  prints JSON. The best batch is the compute limit the bulk path is compared with.

b2 and b5 size torch's intra-op pool by the worker's own rule (`--torch-threads 0`: the
usable cores minus one), so the model runs as the pool's worker runs it; b1 uses every
core (the machine's compute limit).

The naive queue path (baseline 4) is no server of its own: bench/harness.py runs the
real stack with front-side coalescing turned as far off as settings allow.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from bench.modeltime import model_alone
from bench.stack import ROOT, free_port, wait_port
from inferpool.errors import InvalidInput
from inferpool.repository import ModelConfig, Repository, RepositoryError
from inferpool.v1 import inference_pb2, inference_pb2_grpc

Request = inference_pb2.ClassifyRequest
Response = inference_pb2.ClassifyResponse
# A batched request's answer: its probabilities and the size of the batch it ran in.
Answer = asyncio.Future[tuple[np.ndarray, int]]


def _answer(
    cfg: ModelConfig, probs: np.ndarray, top_k: int, request_id: str, ms: float, batch: int = 1
) -> Response:
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
        timings=inference_pb2.Timings(total_ms=ms, compute_ms=ms, batch_size=batch),
        request_id=request_id,
    )


class ThreadPoolServicer(inference_pb2_grpc.InferenceServiceServicer):
    """Classify = validate, run the model on this one input, answer: in the handler thread."""

    def __init__(self, repository: Path, torch_threads: int = 0) -> None:
        self.repository = Repository.load(repository)
        # One runner per model shared by the handler threads: on CPU ModelRunner
        # has no staging buffer, and a frozen TorchScript forward is reentrant.
        self.runners = _runners(self.repository, torch_threads)

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


def _runners(repository: Repository, torch_threads: int) -> dict[str, Any]:
    """A warmed ModelRunner per model; torch's pool sized as the worker sizes it."""
    from inferpool.workers.runtime import ModelRunner, configure_threads, pick_device

    configure_threads(torch_threads)
    runners = {}
    for name in repository.names:
        runner = ModelRunner(repository.resolve(name, 0), pick_device("cpu"))
        runner.warm_up()
        runners[name] = runner
    return runners


def serve_threadpool(port: int, repository: Path, threads: int, torch_threads: int) -> None:
    servicer = ThreadPoolServicer(repository, torch_threads)  # loads and warms before the port opens
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


class BatcherServicer(inference_pb2_grpc.InferenceServiceServicer):
    """Classify = validate, wait in the model's batch, answer: all on one event loop, the
    model in one thread of its own (the loop keeps receiving while a batch runs)."""

    def __init__(self, repository: Path, max_batch: int, window_ms: float, torch_threads: int = 0) -> None:
        self.repository = Repository.load(repository)
        self.runners = _runners(self.repository, torch_threads)
        self.max_batch = max_batch
        self.window_s = window_ms / 1000
        self.model_thread = futures.ThreadPoolExecutor(1, thread_name_prefix="model")
        # Per model: (input, its caller's future, arrival time on the loop's clock).
        self.waiting: dict[str, list[tuple[np.ndarray, Answer, float]]] = {}
        self.full: dict[str, asyncio.Event] = {}
        self.batchers: dict[str, asyncio.Task[None]] = {}

    async def Classify(self, request: Request, context: grpc.aio.ServicerContext) -> Response:
        t0 = time.perf_counter()
        try:
            cfg = self.repository.resolve(request.model, request.version)
        except RepositoryError as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        try:
            array = cfg.validate(request.input)
        except InvalidInput as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if cfg.name not in self.batchers:
            self.waiting[cfg.name], self.full[cfg.name] = [], asyncio.Event()
            self.batchers[cfg.name] = asyncio.create_task(self._batches(cfg.name))
        loop = asyncio.get_running_loop()
        future: Answer = loop.create_future()
        waiting = self.waiting[cfg.name]
        waiting.append((array, future, loop.time()))
        if len(waiting) == 1 or len(waiting) >= self.max_batch:
            self.full[cfg.name].set()  # the first wakes the batcher, the max_batch-th ends its window
        probs, batch = await future
        ms = (time.perf_counter() - t0) * 1000
        return _answer(cfg, probs, request.top_k, request.request_id, ms, batch)

    async def _batches(self, name: str) -> None:
        loop = asyncio.get_running_loop()
        waiting, full, runner = self.waiting[name], self.full[name], self.runners[name]
        while True:
            if not waiting:
                full.clear()
                await full.wait()
            # The window opens when the oldest waiting request arrived (Triton's
            # max_queue_delay): requests that queued behind a running batch go at once.
            left_s = waiting[0][2] + self.window_s - loop.time()
            if len(waiting) < self.max_batch and left_s > 0:
                full.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(full.wait(), left_s)
            batch = waiting[: self.max_batch]
            del waiting[: len(batch)]
            x = np.concatenate([a for a, _, _ in batch])
            probs = await loop.run_in_executor(self.model_thread, runner.run, x)
            for (_, future, _), p in zip(batch, probs, strict=True):
                if not future.done():  # the caller may have gone (deadline, cancel)
                    future.set_result((p, len(batch)))


async def _serve_aio(port: int, servicer: inference_pb2_grpc.InferenceServiceServicer) -> None:
    server = grpc.aio.server()
    inference_pb2_grpc.add_InferenceServiceServicer_to_server(servicer, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


def serve_aio(port: int, make: Any) -> None:
    """`make()` builds the servicer inside the loop (uvloop when installed, like the API)."""

    async def main() -> None:
        await _serve_aio(port, make())

    try:
        import uvloop
    except ImportError:
        asyncio.run(main())
    else:
        uvloop.run(main())


@dataclass
class Baseline:
    target: str
    proc: subprocess.Popen[bytes]


@contextmanager
def baseline_server(kind: str, repository: Path, *options: str) -> Iterator[Baseline]:
    """A baseline server process of this module on a free loopback port."""
    port = free_port()
    cmd = [sys.executable, "-m", "bench.baselines", kind, "--port", str(port), *options]
    if kind in ("threadpool", "batcher"):
        cmd += ["--repository", str(repository)]
    proc = subprocess.Popen(cmd, cwd=ROOT)
    try:
        wait_port(port, 120, proc)
        yield Baseline(f"127.0.0.1:{port}", proc)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


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
    bt = sub.add_parser("batcher", help="baseline 5: grpc.aio and an in-process dynamic batcher")
    bt.add_argument("--port", type=int, required=True)
    bt.add_argument("--repository", type=Path, required=True)
    bt.add_argument("--max-batch", type=int, default=64)
    bt.add_argument("--window-ms", type=float, default=2.0)
    for p in (tp, bt):
        p.add_argument("--torch-threads", type=int, default=0, help="0 = the worker's rule (cores - 1)")
    raw = sub.add_parser("raw", help="baseline 1: the model alone by batch size (JSON)")
    raw.add_argument("--repository", type=Path, required=True)
    raw.add_argument("--model", default="digits")
    raw.add_argument("--seconds", type=float, default=0.5, help="length of one timing")
    raw.add_argument("--repeats", type=int, default=3, help="timings per batch size (median)")
    args = parser.parse_args()
    if args.kind == "threadpool":
        serve_threadpool(args.port, args.repository, args.threads, args.torch_threads)
    elif args.kind == "fixed":
        serve_aio(args.port, FixedServicer)
    elif args.kind == "batcher":
        serve_aio(
            args.port,
            lambda: BatcherServicer(args.repository, args.max_batch, args.window_ms, args.torch_threads),
        )
    else:
        print(json.dumps(model_alone(args.repository, args.model, args.seconds, args.repeats)))


if __name__ == "__main__":
    main()
