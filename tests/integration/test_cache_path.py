"""The Memcached read path: a hit the API's in-process cache cannot serve (another
replica computed it, or the local cache is off or evicted it) is answered from
Memcached, and nothing is published or computed again."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np
import pytest

from inferpool.client import Client
from tests.servers import ApiThread, MemcachedServer, RedisServer, Worker, stack_settings

pytestmark = pytest.mark.timeout(120)


def _input(seed: int) -> np.ndarray:
    # Its own seed space: no other test may have put this input in the shared cache.
    return np.random.default_rng((0xCAC4E, seed)).random((1, 1, 28, 28), dtype=np.float32)


@pytest.fixture
def replica(
    redis_server: RedisServer, memcached_server: MemcachedServer, worker: Worker
) -> Iterator[ApiThread]:
    """A second API replica on the session's Redis and Memcached."""
    server = ApiThread(stack_settings(redis_server, memcached_server))
    yield server
    server.stop()


def _published(api: ApiThread) -> tuple[int, int]:
    return api.call(lambda: (api.server.publisher.messages, api.server.publisher.items))


def test_memcached_hit_from_another_replica(
    client: Client, api: ApiThread, replica: ApiThread, worker: Worker
) -> None:
    image = _input(1)
    first = client.classify(image, "digits", top_k=3, timeout_s=30)
    assert not first.cached
    computed = worker.stats()["items_computed"]
    with Client(replica.target) as other:
        second = other.classify(image, "digits", top_k=3, timeout_s=30)
    assert second.cached
    assert [(c.index, c.label) for c in second.classes] == [(c.index, c.label) for c in first.classes]
    assert [c.score for c in second.classes] == pytest.approx([c.score for c in first.classes], abs=1e-6)
    # Served from Memcached: the replica published nothing and the worker computed nothing.
    assert _published(replica) == (0, 0)
    counters = replica.call(lambda: dataclasses.replace(replica.server.plane.counters))
    assert (counters.requests, counters.hits, counters.misses) == (1, 1, 0)
    assert worker.stats()["items_computed"] == computed


def test_with_the_local_cache_off_a_repeat_is_read_from_memcached(
    redis_server: RedisServer, memcached_server: MemcachedServer, worker: Worker
) -> None:
    api = ApiThread(stack_settings(redis_server, memcached_server, local_cache_items=0))
    try:
        with Client(api.target) as client:
            image = _input(2)
            first = client.classify(image, "digits", timeout_s=30)
            assert not first.cached
            published = _published(api)
            assert published == (1, 1)
            computed = worker.stats()["items_computed"]
            second = client.classify(image, "digits", timeout_s=30)
        assert second.cached
        assert second.classes[0].index == first.classes[0].index
        assert second.classes[0].score == pytest.approx(first.classes[0].score, abs=1e-6)
        assert _published(api) == published
        assert worker.stats()["items_computed"] == computed
    finally:
        api.stop()
