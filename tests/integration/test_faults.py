"""Stacks of their own: no worker yet (deadlines), and a Memcached that dies mid-test."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import redis
from grpc_health.v1 import health_pb2

from inferpool.client import Client
from inferpool.names import queue_name
from tests.servers import ApiThread, MemcachedServer, RedisServer, Worker, stack_settings, wait_until

pytestmark = pytest.mark.timeout(180)


def test_deadline_without_worker_and_late_worker_skips_it(
    fresh_redis: RedisServer, fresh_memcached: MemcachedServer, logdir: Path
) -> None:
    settings = stack_settings(fresh_redis, fresh_memcached)
    api = ApiThread(settings)
    r = redis.Redis.from_url(fresh_redis.url)
    try:
        with Client(api.target) as client:
            img = np.random.default_rng(7).random((1, 1, 28, 28), dtype=np.float32)
            assert client.health() == "SERVING"  # connected: the deadline is all the call's
            with pytest.raises(grpc.RpcError) as info:
                client.classify(img, "digits", timeout_s=1.0)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert r.llen(queue_name("digits")) == 1  # published, waiting for a worker
        worker = Worker(settings, logdir)
        try:
            wait_until(lambda: r.llen(queue_name("digits")) == 0, 30, "the worker to drain the queue")
            wait_until(
                lambda: worker.stats()["messages_expired"] + worker.stats()["items_expired"] >= 1,
                10,
                "the worker to discard the expired request",
            )
            stats = worker.stats()
            assert stats["items_computed"] == 0, stats
            assert stats["batches"] == 0, stats
        finally:
            worker.stop()
    finally:
        r.close()
        api.stop()


def test_memcached_killed_mid_test_keeps_answering(
    fresh_redis: RedisServer, fresh_memcached: MemcachedServer, logdir: Path
) -> None:
    settings = stack_settings(fresh_redis, fresh_memcached)
    worker = Worker(settings, logdir)
    api = ApiThread(settings)
    try:
        with Client(api.target) as client:
            img = np.random.default_rng(8).random((1, 1, 28, 28), dtype=np.float32)
            assert not client.classify(img, "digits").cached
            assert client.classify(img, "digits").cached
            fresh_memcached.kill()
            before = worker.stats()["items_computed"]
            # What this API process answered lately it still answers from its own cache.
            assert client.classify(img, "digits", timeout_s=5).cached
            t0 = time.perf_counter()
            for image in np.random.default_rng(9).random((10, 1, 1, 28, 28), dtype=np.float32):
                response = client.classify(image, "digits", timeout_s=5)
                assert not response.cached
            elapsed = time.perf_counter() - t0
            # Everything else goes to a worker: each new input is computed.
            assert worker.stats()["items_computed"] - before == 10
            assert client.health() == "SERVING"
            # Degraded, and visible as such (inferpool_cache_available reads this).
            assert api.call(lambda: api.server.cache.errors) > 0
            print(f"10 requests with memcached dead: {elapsed * 1000:.0f} ms")
    finally:
        api.stop()
        worker.stop()


def test_health_follows_redis_and_classify_fails_fast(
    fresh_redis: RedisServer, fresh_memcached: MemcachedServer
) -> None:
    api = ApiThread(stack_settings(fresh_redis, fresh_memcached, health_interval_s=0.2))
    try:
        with Client(api.target) as client:
            assert client.health() == "SERVING"
            fresh_redis.kill()
            wait_until(lambda: client.health() == "NOT_SERVING", 5, "health to turn NOT_SERVING")
            img = np.random.default_rng(9).random((1, 1, 28, 28), dtype=np.float32)
            t0 = time.perf_counter()
            with pytest.raises(grpc.RpcError) as info:
                client.classify(img, "digits", timeout_s=3)
            elapsed = time.perf_counter() - t0
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value.details()
        assert elapsed < 2.0, elapsed
    finally:
        api.stop()


@pytest.mark.timeout(120)
def test_redis_restart_fails_fast_then_recovers_by_itself(
    fresh_redis: RedisServer, fresh_memcached: MemcachedServer, logdir: Path
) -> None:
    settings = stack_settings(fresh_redis, fresh_memcached, health_interval_s=0.2)
    worker = Worker(settings, logdir)
    api = ApiThread(settings)
    restarted: RedisServer | None = None
    rng = np.random.default_rng(21)
    try:
        with Client(api.target) as client:
            assert not client.classify(rng.random((1, 1, 28, 28), dtype=np.float32), "digits").cached
            fresh_redis.kill()
            wait_until(lambda: client.health() == "NOT_SERVING", 5, "health to turn NOT_SERVING")
            t0 = time.perf_counter()
            with pytest.raises(grpc.RpcError) as info:
                client.classify(rng.random((1, 1, 28, 28), dtype=np.float32), "digits", timeout_s=3)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert time.perf_counter() - t0 < 2.0

            restarted = RedisServer(logdir, port=fresh_redis.port)
            wait_until(lambda: client.health() == "SERVING", 10, "health to recover")

            def answers() -> bool:
                try:
                    image = rng.random((1, 1, 28, 28), dtype=np.float32)
                    return not client.classify(image, "digits", timeout_s=2).cached
                except grpc.RpcError:
                    return False

            # API publisher, reply listener and the worker's consumer all reconnect on their own.
            wait_until(answers, 60, "Classify to be answered again", poll_s=0.2)
            # A few more in a row: recovered, not lucky.
            for _ in range(5):
                assert answers()
        # No request is left waiting, and every reply list has an expiry.
        assert api.call(lambda: api.server.replies.waiting) == 0
        r = redis.Redis.from_url(restarted.url)
        try:
            for key in r.scan_iter("inferpool:reply:*"):
                assert r.ttl(key) > 0, key
        finally:
            r.close()
    finally:
        api.stop()
        worker.stop()
        if restarted is not None:
            restarted.stop()


@pytest.mark.timeout(120)
def test_api_shutdown_drains_in_flight_calls_and_refuses_new_ones(
    fresh_redis: RedisServer, fresh_memcached: MemcachedServer, logdir: Path
) -> None:
    settings = stack_settings(fresh_redis, fresh_memcached)
    api = ApiThread(settings)
    worker: Worker | None = None
    rng = np.random.default_rng(33)
    try:
        with Client(api.target) as client:
            # No worker yet: this call is in flight, waiting, when shutdown begins.
            in_flight = client.classify_future(
                rng.random((1, 1, 28, 28), dtype=np.float32), "digits", timeout_s=30
            )
            wait_until(lambda: api.call(lambda: api.server.replies.waiting) == 1, 5, "the call to be waiting")
            health = client._health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=30)
            assert next(health).status == health_pb2.HealthCheckResponse.SERVING
            stopper = threading.Thread(target=api.stop, kwargs={"grace_s": 20.0})
            stopper.start()
            # Readiness goes first, while the server still runs.
            assert next(health).status == health_pb2.HealthCheckResponse.NOT_SERVING
            health.cancel()  # an open stream would itself hold the drain until the grace ends
            with Client(api.target) as late:
                with pytest.raises(grpc.RpcError) as refused:
                    late.classify(rng.random((1, 1, 28, 28), dtype=np.float32), "digits", timeout_s=5)
                assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            # The call that was in flight is still answered once a worker serves it.
            worker = Worker(settings, logdir)
            response = in_flight.result(timeout=30)
            assert response.classes and not response.cached
            stopper.join(30)
            assert not stopper.is_alive()
    finally:
        if worker is not None:
            worker.stop()
