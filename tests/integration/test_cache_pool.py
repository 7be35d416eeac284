"""Several Memcached nodes against real memcached servers: what the workers' writer
(pymemcache) puts on a node is what the API's reader (aiomcache) looks for there,
keys spread over the nodes, and a node that dies costs misses for its keys only."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from pymemcache.client.base import Client as NodeClient

from inferpool.api.front_cache import CacheReader
from inferpool.cache import Cache
from inferpool.client import Client
from tests.servers import ApiThread, MemcachedServer, RedisServer, Worker, stack_settings

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def nodes(logdir: Path) -> Iterator[list[MemcachedServer]]:
    servers = [MemcachedServer(logdir), MemcachedServer(logdir)]
    yield servers
    for server in servers:
        server.stop()


def _stored(server: MemcachedServer, keys: list[str]) -> set[str]:
    """The keys among `keys` that this one server holds, read with a client of its own."""
    client = NodeClient(("127.0.0.1", server.port), timeout=2)
    try:
        return set(client.get_many(keys))
    finally:
        client.close()


def _item_count(server: MemcachedServer) -> int:
    client = NodeClient(("127.0.0.1", server.port), timeout=2)
    try:
        return int(client.stats()[b"curr_items"])
    finally:
        client.close()


def _read(reader: CacheReader, keys: list[str]) -> list[bytes | None]:
    async def main() -> list[bytes | None]:
        try:
            return await reader.get_many(keys)
        finally:
            await reader.close()

    return asyncio.run(main())


def test_the_api_reads_each_key_from_the_node_the_workers_wrote_it_to(
    nodes: list[MemcachedServer],
) -> None:
    pool = ",".join(server.address for server in nodes)
    writer = Cache(pool, timeout_ms=500, ttl_s=60)
    values = {f"test:pool:{i}": f"value {i}".encode() for i in range(200)}
    writer.set_many(values)
    keys = list(values)
    held = [_stored(server, keys) for server in nodes]
    # Spread over both, each key on one node only: the one the ring names.
    assert all(len(h) >= 60 for h in held), [len(h) for h in held]
    assert held[0].isdisjoint(held[1]) and held[0] | held[1] == set(keys)
    for key in keys:
        assert key in held[writer.ring.node_of(key)]
    # The API's reader, a process of its own in production: its own ring, same list.
    reader = CacheReader(Cache(pool, timeout_ms=500, ttl_s=60))
    assert _read(reader, [*keys, "test:pool:absent"]) == [*values.values(), None]
    assert reader.cache.errors == 0
    writer.close()


def test_a_dead_node_costs_misses_for_its_keys_and_no_errors(nodes: list[MemcachedServer]) -> None:
    pool = ",".join(server.address for server in nodes)
    writer = Cache(pool, timeout_ms=500, ttl_s=60, retry_after_s=30)
    values = {f"test:pool-dead:{i}": f"value {i}".encode() for i in range(100)}
    writer.set_many(values)
    nodes[1].kill()
    reader = CacheReader(Cache(pool, timeout_ms=500, ttl_s=60, retry_after_s=30))
    found = _read(reader, list(values))
    for (key, value), got in zip(values.items(), found, strict=True):
        assert got == (value if writer.ring.node_of(key) == 0 else None), key
    # One failure, on the dead node: the live one is still used, for reads and writes.
    assert reader.cache.errors == 1 and reader.cache.available
    assert reader.cache.node_up(0) and not reader.cache.node_up(1)
    writer.set_many({"test:pool-dead:new": b"x"})  # a write to either node: no exception
    assert writer.get_many(list(values)) == {k: v for k, v in values.items() if writer.ring.node_of(k) == 0}
    writer.close()


def test_a_stack_on_two_nodes_answers_repeats_from_memcached(
    logdir: Path, fresh_redis: RedisServer, nodes: list[MemcachedServer]
) -> None:
    # A worker and an API of their own, both told of the two nodes; no local LRU, so every
    # repeat is read from whichever node the worker wrote it to.
    settings = dataclasses.replace(
        stack_settings(fresh_redis, nodes[0], local_cache_items=0, shed_loop_lag_ms=0),
        memcached=",".join(server.address for server in nodes),
    )
    worker = Worker(settings, logdir)
    api = ApiThread(settings)
    try:
        images = np.random.default_rng((0x9001, 2)).random((24, 1, 1, 28, 28), dtype=np.float32)
        with Client(api.target) as client:
            first = [client.classify(image, "digits", timeout_s=30) for image in images]
            computed = worker.stats()["items_computed"]
            second = [client.classify(image, "digits", timeout_s=30) for image in images]
        assert not any(r.cached for r in first) and all(r.cached for r in second)
        assert [r.classes[0].index for r in second] == [r.classes[0].index for r in first]
        assert worker.stats()["items_computed"] == computed
        items = [_item_count(server) for server in nodes]
        assert all(n > 0 for n in items) and sum(items) == len(images), items
        assert api.call(lambda: api.server.cache.errors) == 0
    finally:
        api.stop()
        worker.stop()
