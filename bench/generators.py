"""The load generator (bench/loadgen.py) in processes of its own: `Generators(n)`.

The processes form a session and process group of their own: signals sent to the
benchmark's group do not reach them, they are in no server tree a benchmark measures, and
their CPU is their own. The first one leads the group and starts the others there (a
process may only join a group of its own session); each talks with the benchmark over a
pipe pair of its own, one pickled `Load` in, one `Run` (or the exception) out.
"""

from __future__ import annotations

import os
import pickle
import select
import signal
import struct
import subprocess
import sys
import time
from collections import Counter
from dataclasses import replace
from typing import IO, Any

import numpy as np

from bench.loadgen import Load, Run, run
from bench.stack import ROOT

# Seconds between handing a run to the generator processes and its start, for each
# one's channel to connect first (connection set-up is not what is measured).
START_DELAY_S = 0.4


def merge(parts: list[Run]) -> Run:
    """The runs of several generator processes as one: counts add up, latencies pool,
    the lag is the worst generator's."""
    errors: Counter[str] = Counter()
    for p in parts:
        errors.update(p.errors)
    out = Run(
        ok=sum(p.ok for p in parts),
        errors=dict(errors),
        cached=sum(p.cached for p in parts),
        sent=sum(p.sent for p in parts),
        seen=set().union(*(p.seen for p in parts)),
        shed=sum(p.shed for p in parts),
        elapsed_s=max((p.elapsed_s for p in parts), default=0.0),
        cpu_s=sum(p.cpu_s for p in parts),
        lag_p50_ms=max((p.lag_p50_ms for p in parts), default=float("nan")),
        lag_p99_ms=max((p.lag_p99_ms for p in parts), default=float("nan")),
        lat_ms=np.concatenate([p.lat_ms for p in parts]) if parts else np.zeros(0),
        refused_ms=np.concatenate([p.refused_ms for p in parts]) if parts else np.zeros(0),
        refused_by_rpc_limit=sum(p.refused_by_rpc_limit for p in parts),
    )
    out.distinct = len(out.seen)
    # Each process's own rate, summed: their runs end a few ms apart.
    rps = sum(p.rps for p in parts)
    out.elapsed_s = out.ok / rps if rps else out.elapsed_s
    return out


def _send(stream: IO[bytes], obj: Any) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(struct.pack("<Q", len(data)) + data)
    stream.flush()


def _recv(stream: IO[bytes]) -> Any:
    head = stream.read(8)
    if len(head) < 8:
        raise EOFError("generator process closed its pipe")
    return pickle.loads(stream.read(struct.unpack("<Q", head)[0]))


def _serve(fds: str) -> None:
    """A generator process: runs each Load it reads from its pipe, writes back its Run."""
    read_fd, write_fd = (int(f) for f in fds.split(","))
    with os.fdopen(read_fd, "rb") as inp, os.fdopen(write_fd, "wb") as out:
        _send(out, os.getpid())  # ready
        while True:
            try:
                load = _recv(inp)
            except EOFError:
                return
            if load is None:
                return
            try:
                _send(out, run(load))
            except Exception as exc:
                _send(out, RuntimeError(f"load generator failed: {exc!r}"))


def _lead(pairs: list[str]) -> None:
    """The first generator process, leader of the generators' own session and process
    group: starts the others there (a process may only join a group of its own
    session), serves the first pipe pair itself, then waits for them."""
    others = [
        subprocess.Popen(
            [sys.executable, "-m", "bench.generators", pair],
            pass_fds=[int(f) for f in pair.split(",")],
            cwd=ROOT,
        )
        for pair in pairs[1:]
    ]
    for pair in pairs[1:]:
        for fd in pair.split(","):
            os.close(int(fd))
    _serve(pairs[0])
    for proc in others:
        proc.wait()


class Generators:
    """`count` generator processes in one process group of their own (a new session):
    signals to the benchmark's group do not reach them, and they are in no server tree.
    `run(load)` splits the callers (or the rate) across them and merges the results."""

    def __init__(self, count: int = 1) -> None:
        self.streams: list[tuple[IO[bytes], IO[bytes]]] = []
        pairs, child_fds = [], []
        for _ in range(count):
            to_read, to_write = os.pipe()
            from_read, from_write = os.pipe()
            pairs.append(f"{to_read},{from_write}")
            child_fds += [to_read, from_write]
            self.streams.append((os.fdopen(to_write, "wb"), os.fdopen(from_read, "rb")))
        self.leader = subprocess.Popen(
            [sys.executable, "-m", "bench.generators", "--lead", *pairs],
            pass_fds=child_fds,
            cwd=ROOT,
            start_new_session=True,
        )
        for fd in child_fds:
            os.close(fd)
        self.runs = 0
        # Each says its pid once started: the group is whole when this returns.
        self.pids: list[int] = [self._receive(from_gen, 60, int) for _, from_gen in self.streams]

    @property
    def count(self) -> int:
        return len(self.streams)

    def run(self, load: Load, seed_base: int = 0) -> Run:
        self.runs += 1
        n = self.count
        start_at = time.time() + START_DELAY_S
        sent: list[IO[bytes]] = []
        for g, (to_gen, from_gen) in enumerate(self.streams):
            share_c = load.concurrency // n + (g < load.concurrency % n)
            if (load.concurrency and not share_c) or (load.rate and g > 0 and load.rate < 50):
                continue  # a lone caller, or a rate too low to split, stays on one process
            part = replace(
                load,
                concurrency=share_c,
                rate=load.rate / n if load.rate >= 50 else load.rate,
                max_requests=-(-load.max_requests // n) if load.max_requests else 0,
                start_at=start_at,
                # Unique per run and generator, so miss inputs never repeat in a session.
                seed=(self.runs * 1000 + g) * 7919 + seed_base,
                pool_seed=self.runs * 1000 + seed_base,
            )
            _send(to_gen, part)
            sent.append(from_gen)
        parts = [self._result(stream, load.seconds + load.timeout_s + 30) for stream in sent]
        return merge(parts)

    def _result(self, stream: IO[bytes], timeout_s: float) -> Run:
        result: Run = self._receive(stream, timeout_s, Run)
        return result

    def _receive(self, stream: IO[bytes], timeout_s: float, kind: type) -> Any:
        ready, _, _ = select.select([stream], [], [], timeout_s)
        if not ready:
            self.close()
            raise TimeoutError(f"a load generator said nothing in {timeout_s:.0f}s")
        result = _recv(stream)
        if isinstance(result, BaseException):
            raise result
        if not isinstance(result, kind):
            raise TypeError(f"a load generator sent {type(result).__name__}, not {kind.__name__}")
        return result

    def close(self) -> None:
        if self.leader.returncode is not None:
            return
        for to_gen, from_gen in self.streams:
            try:
                _send(to_gen, None)
                to_gen.close()
            except (OSError, ValueError):
                pass  # gone, or closed already
            from_gen.close()
        try:
            self.leader.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.leader.pid, signal.SIGKILL)  # the generators' own group only
            self.leader.wait()

    def __enter__(self) -> Generators:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


if __name__ == "__main__":
    # Through the package, so what the module defines pickles under its own name.
    from bench import generators

    if sys.argv[1] == "--lead":
        generators._lead(sys.argv[2:])
    else:
        generators._serve(sys.argv[1])
