"""The API's non-blocking Memcached reads, against a real memcached: values the
blocking client wrote, concurrent lookups answered together, and failures that stay
misses (a dead server, one that never answers)."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from api.front_cache import CacheReader
from inferpool.cache import Cache
from tests.servers import MemcachedServer

pytestmark = pytest.mark.timeout(30)


def _pair(address: str, timeout_ms: float = 500) -> tuple[Cache, CacheReader]:
    cache = Cache(address, timeout_ms=timeout_ms, ttl_s=60, retry_after_s=30)
    return cache, CacheReader(cache)


def test_concurrent_reads_see_what_was_written(memcached_server: MemcachedServer) -> None:
    cache, reader = _pair(memcached_server.address)
    values = {f"test:cache-reads:{i}": f"value {i}".encode() for i in range(20)}
    cache.set_many(values)

    async def main() -> list[bytes | None]:
        try:
            # Asked in one loop iteration, a key twice and one never written among them.
            keys = [*values, "test:cache-reads:0", "test:cache-reads:absent"]
            return list(await asyncio.gather(*(reader.get(k) for k in keys)))
        finally:
            await reader.close()

    found = asyncio.run(main())
    assert found == [*values.values(), b"value 0", None]
    assert cache.errors == 0
    cache.close()


def test_a_dead_server_is_a_miss_and_is_skipped(fresh_memcached: MemcachedServer) -> None:
    cache, reader = _pair(fresh_memcached.address)
    cache.set_many({"test:dead": b"x"})

    async def main() -> tuple[bytes | None, ...]:
        try:
            first = await reader.get("test:dead")
            fresh_memcached.kill()
            second = await reader.get("test:dead")
            errors = cache.errors
            third = await reader.get("test:dead")  # not even tried: the cache backs off
            assert cache.errors == errors
            return first, second, third
        finally:
            await reader.close()

    assert asyncio.run(main()) == (b"x", None, None)
    assert cache.errors == 1 and not cache.available
    cache.close()


def test_a_server_that_never_answers_costs_one_timeout() -> None:
    # Accepts connections (the kernel's backlog) and never reads or answers.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        cache, reader = _pair(f"127.0.0.1:{silent.getsockname()[1]}", timeout_ms=200)

        async def main() -> tuple[bytes | None, float]:
            try:
                t0 = time.perf_counter()
                value = await reader.get("test:silent")
                return value, time.perf_counter() - t0
            finally:
                await reader.close()

        value, elapsed_s = asyncio.run(main())
    assert value is None and cache.errors == 1
    assert 0.15 <= elapsed_s < 1.0, elapsed_s
    cache.close()


def test_an_answer_that_came_while_the_loop_was_busy_is_not_a_failure(
    memcached_server: MemcachedServer,
) -> None:
    # A busy API loop (a long callback, GIL contention) can outlast the timeout while the
    # answer sits in the socket: that is the API's stall, not Memcached's, and must not
    # make every reader skip the cache for the retry period.
    cache, reader = _pair(memcached_server.address, timeout_ms=20)
    cache.set_many({"test:busy-loop": b"answer"})

    async def main() -> list[bytes | None]:
        try:
            assert await reader.get("test:busy-loop") == b"answer"  # the connection is open
            found = []
            # The stall starts after 0, 1, ... loop iterations: one of them falls between
            # the lookup being written and its answer being read.
            for iterations in range(10):
                asked = asyncio.ensure_future(reader.get("test:busy-loop"))
                for _ in range(iterations):
                    await asyncio.sleep(0)
                time.sleep(0.1)  # noqa: ASYNC251 (the stall: five timeouts; the answer arrives meanwhile)
                found.append(await asked)
            return found
        finally:
            await reader.close()

    assert asyncio.run(main()) == [b"answer"] * 10
    assert cache.errors == 0 and cache.available
    cache.close()
