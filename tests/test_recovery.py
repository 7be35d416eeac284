"""Recovery times: how soon the stack answers again after Redis restarts, and how soon a
dead worker's bulk chunks are back on their queue."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import redis

from inferpool.client import Client
from tests.servers import ApiThread, RedisServer, Worker, stack_settings, wait_until

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning"),
]

# How long Redis stays down. Long enough that a client backing off in steps of seconds
# (kombu's stock reconnect waits 2, 4, 6 ... s) is asleep when Redis comes back.
OUTAGE_S = 3.0
# From Redis answering PING again to the first Classify answered (measured on a loaded
# 2-core machine: 0.13-0.24 s; 2.8-3.1 s while workers reconnected at kombu's stock pace).
FIRST_OK_BOUND_S = 1.0
# Classify calls are sent this often while waiting for the first OK: the resolution of
# the measurement.
PROBE_EVERY_S = 0.05


def _answers_ping(url: str) -> bool:
    r = redis.Redis.from_url(url, socket_connect_timeout=0.2, socket_timeout=0.2, retry=None)
    try:
        return bool(r.ping())
    except redis.RedisError:
        return False
    finally:
        r.close()


def test_first_ok_soon_after_redis_restarts(fresh_redis: RedisServer, logdir: Path) -> None:
    # No Memcached: every probe is a new input that only a worker can answer.
    settings = stack_settings(fresh_redis, None, health_interval_s=0.2)
    worker = Worker(settings, logdir)
    api = ApiThread(settings)
    restarted: RedisServer | None = None
    rng = np.random.default_rng(5)
    try:
        with Client(api.target) as client:
            first = client.classify(rng.random((1, 1, 28, 28), dtype=np.float32), "digits", timeout_s=10)
            assert first.classes and not first.cached
            fresh_redis.kill()
            wait_until(lambda: client.health() == "NOT_SERVING", 5, "health to turn NOT_SERVING")
            # Redis stays down for the outage: the scenario, not an ordering.
            time.sleep(OUTAGE_S)
            restarted = RedisServer(logdir, port=fresh_redis.port)
            wait_until(lambda: _answers_ping(restarted.url), 10, "the restarted Redis to answer PING")
            t_up = time.monotonic()
            # A new call every PROBE_EVERY_S, each with a deadline long enough to be
            # answered once the path is back: the first to complete OK marks recovery.
            calls: list[grpc.Future] = []
            answered_at: list[float] = []

            def record(call: grpc.Future) -> None:
                if call.exception() is None:
                    answered_at.append(time.monotonic())

            deadline = t_up + 30
            while not answered_at and time.monotonic() < deadline:
                image = rng.random((1, 1, 28, 28), dtype=np.float32)
                call = client.classify_future(image, "digits", timeout_s=2.0)
                call.add_done_callback(record)
                calls.append(call)
                time.sleep(PROBE_EVERY_S)  # the probing rate, not an ordering
            first_ok = min(answered_at, default=None)
            assert first_ok is not None, "no Classify answered within 30 s of Redis answering again"
            elapsed = first_ok - t_up
            print(f"first OK {elapsed * 1000:.0f} ms after Redis answered PING again")
            for call in calls:  # none is left running past the test
                with contextlib.suppress(grpc.RpcError):
                    call.result()
            assert elapsed <= FIRST_OK_BOUND_S, f"first OK {elapsed:.2f}s after Redis answered again"
            # Recovered, not lucky: the next ones are answered too.
            for _ in range(3):
                again = client.classify(rng.random((1, 1, 28, 28), dtype=np.float32), "digits", timeout_s=2)
                assert again.classes and not again.cached
    finally:
        api.stop()
        worker.stop()
        if restarted is not None:
            restarted.stop()
