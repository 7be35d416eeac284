"""The API's non-blocking Memcached reads against a server that never answers: the
tests that need no memcached (the rest: tests/integration/test_cache_reads.py)."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from inferpool.api.front_cache import CacheReader
from inferpool.cache import Cache

pytestmark = pytest.mark.timeout(30)


def _pair(address: str, timeout_ms: float = 500) -> tuple[Cache, CacheReader]:
    cache = Cache(address, timeout_ms=timeout_ms, ttl_s=60, retry_after_s=30)
    return cache, CacheReader(cache)


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
