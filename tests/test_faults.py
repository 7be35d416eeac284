"""Stacks of their own: no worker yet (deadlines), and a Memcached that dies mid-test."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import redis

from inferpool.client import Client
from inferpool.names import queue_name
from tests.servers import ApiThread, MemcachedServer, RedisServer, Worker, stack_settings, wait_until

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def fresh_redis(logdir: Path) -> Iterator[RedisServer]:
    server = RedisServer(logdir)
    yield server
    server.stop()


@pytest.fixture
def fresh_memcached(logdir: Path) -> Iterator[MemcachedServer]:
    server = MemcachedServer(logdir)
    yield server
    server.stop()


def test_deadline_without_worker_and_late_worker_skips_it(
    fresh_redis: RedisServer, fresh_memcached: MemcachedServer, logdir: Path
) -> None:
    settings = stack_settings(fresh_redis, fresh_memcached)
    api = ApiThread(settings)
    r = redis.Redis.from_url(fresh_redis.url)
    try:
        with Client(api.target) as client:
            img = np.random.default_rng(7).random((1, 1, 28, 28), dtype=np.float32)
            t0 = time.perf_counter()
            with pytest.raises(grpc.RpcError) as info:
                client.classify(img, "digits", timeout_s=0.3)
            elapsed = time.perf_counter() - t0
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert elapsed < 0.4, elapsed
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
            t0 = time.perf_counter()
            for _ in range(10):
                response = client.classify(img, "digits", timeout_s=5)
                assert not response.cached
            elapsed = time.perf_counter() - t0
            assert worker.stats()["items_computed"] - before == 10
            assert client.health() == "SERVING"
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
