"""Model queues over two Redis instances (INFERPOOL_BROKER_SHARDS): each model's misses
travel on its own Redis, to the worker consuming there, and come back over it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import redis

from inferpool.client import Client
from tests.servers import ApiThread, MemcachedServer, RedisServer, Worker, stack_settings

pytestmark = pytest.mark.timeout(240)

# Two models of the repository: one on the main Redis, one on the shard.
ON_MAIN, ON_SHARD = "digits", "digits_onnx"


def _commands(server: RedisServer) -> dict[str, int]:
    """Calls per command so far, from INFO commandstats."""
    client = redis.Redis(port=server.port)
    try:
        stats = client.info("commandstats")
    finally:
        client.close()
    return {name.removeprefix("cmdstat_"): int(value["calls"]) for name, value in stats.items()}


def test_each_models_misses_travel_on_its_own_redis_and_are_answered(
    logdir: Path, fresh_redis: RedisServer, fresh_memcached: MemcachedServer
) -> None:
    shard = RedisServer(logdir)
    try:
        settings = dataclasses.replace(
            stack_settings(fresh_redis, fresh_memcached, shed_loop_lag_ms=0, local_cache_items=0),
            broker_shards=f"{ON_SHARD}={shard.url}",
        )
        # A worker per shard: a Celery worker has one broker.
        on_main = Worker(dataclasses.replace(settings, worker_models=ON_MAIN), logdir)
        on_shard = Worker(dataclasses.replace(settings, worker_models=ON_SHARD), logdir)
        api = ApiThread(settings)
        try:
            images = np.random.default_rng((0x5A4D, 1)).random((8, 1, 1, 28, 28), dtype=np.float32)
            shard_before = _commands(shard)
            with Client(api.target) as client:
                main_answers = [client.classify(x, ON_MAIN, timeout_s=30) for x in images[:4]]
                shard_answers = [client.classify(x, ON_SHARD, timeout_s=30) for x in images[4:]]
            assert not any(r.cached for r in main_answers + shard_answers)
            # The same weights: both models give the digits' labels.
            assert all(r.classes for r in main_answers + shard_answers)
            # Each worker computed only its own model's requests, which it could only have
            # received over its own broker.
            assert on_main.stats()["items_computed"] == 4
            assert on_shard.stats()["items_computed"] == 4
            # The shard carried the pushes (envelope and flight locks, one script each) and
            # the replies; the main Redis's model queue never saw the shard's model.
            shard_after = _commands(shard)
            assert shard_after.get("eval", 0) - shard_before.get("eval", 0) >= 4
            assert shard_after.get("rpush", 0) - shard_before.get("rpush", 0) >= 4
            main = redis.Redis(port=fresh_redis.port)
            try:
                assert not main.exists(f"inferpool.{ON_SHARD}")
            finally:
                main.close()
        finally:
            api.stop()
            on_shard.stop()
            on_main.stop()
    finally:
        shard.stop()


def test_queue_depth_reads_each_models_queue_on_its_own_redis(logdir: Path, fresh_redis: RedisServer) -> None:
    from prometheus_client import CollectorRegistry

    from inferpool.api.metrics import register_queue_depth
    from inferpool.names import queue_name

    shard = RedisServer(logdir)
    try:
        client = redis.Redis(port=shard.port)
        client.lpush(queue_name(ON_SHARD), b"a", b"b")
        client.close()
        registry = CollectorRegistry()
        register_queue_depth(
            fresh_redis.url, [queue_name(ON_MAIN)], registry, shards=[(shard.url, [queue_name(ON_SHARD)])]
        )
        depth = {
            queue: registry.get_sample_value("inferpool_queue_messages", {"queue": queue_name(queue)})
            for queue in (ON_MAIN, ON_SHARD)
        }
        assert depth == {ON_MAIN: 0, ON_SHARD: 2}
        assert registry.get_sample_value("inferpool_backlog_messages") == 2
        assert registry.get_sample_value("inferpool_broker_up") == 1
        shard.kill()
        assert registry.get_sample_value("inferpool_broker_up") == 0
    finally:
        shard.stop()
