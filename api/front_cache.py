"""Memcached reads for the event loop, which never wait on a socket.

The blocking client (inferpool.cache) held the API's one thread for every lookup's
round trip: on a busy machine the wait includes Memcached being scheduled, and the
loop did nothing meanwhile. Here the keys asked for in one loop iteration go out as
one `get` on an asyncio connection (aiomcache), and the loop serves other calls until
the answer comes. Failures stay misses, never errors: a lookup is bounded by the
cache timeout, and a failure (counted on the shared Cache) makes every reader skip
Memcached for its retry period, as the blocking client does. After a failure the
connections are dropped, so a late answer can never be read as the next one's.
"""

from __future__ import annotations

import asyncio
import logging

import aiomcache

from inferpool.cache import Cache

log = logging.getLogger(__name__)

# Connections: a batch in flight and the next one's.
POOL_SIZE = 2
# Bound on one read when the loop keeps stalling: this many timeouts.
MAX_WINDOWS = 5


class CacheReader:
    """Reads the Memcached that `cache` (the blocking client) is configured for."""

    def __init__(self, cache: Cache) -> None:
        self.cache = cache  # availability and the failure count, shared with the blocking client
        self.timeout_s = cache.timeout_ms / 1000
        self._client: aiomcache.Client | None = None
        if cache.enabled:
            host, _, port = cache.address.rpartition(":")
            conn_args = {"ssl": cache.tls_context} if cache.tls_context is not None else None
            self._client = aiomcache.Client(host, int(port), pool_size=POOL_SIZE, conn_args=conn_args)
        # Keys asked for in this loop iteration, and who waits for each.
        self._asked: dict[str, list[asyncio.Future[bytes | None]]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def get(self, key: str) -> bytes | None:
        """The cached value, or None (a miss, Memcached down or slow)."""
        if self._client is None or not self.cache.available:
            return None
        found: asyncio.Future[bytes | None] = asyncio.get_running_loop().create_future()
        if not self._asked:
            task = asyncio.get_running_loop().create_task(self._flush())
            # The loop keeps only weak references to tasks.
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        self._asked.setdefault(key, []).append(found)
        return await found

    async def _flush(self) -> None:
        # Runs once the current loop iteration is over: every get() it made joins.
        await asyncio.sleep(0)
        asked, self._asked = self._asked, {}
        keys = list(asked)
        assert self._client is not None
        values: tuple[bytes | None, ...]
        read = asyncio.ensure_future(self._client.multi_get(*(key.encode() for key in keys)))
        await self._wait(read)
        try:
            if not read.done():
                read.cancel()
                raise TimeoutError(f"no answer in {self.timeout_s * 1000:.0f} ms")
            values = read.result()
        except Exception as exc:  # any client or socket failure, or the timeout, is a miss
            self.cache.record_failure("get", exc)
            values = (None,) * len(keys)
            await self._reset()
        for key, value in zip(keys, values, strict=True):
            for found in asked[key]:
                if not found.done():  # its caller may have gone
                    found.set_result(value)

    async def _wait(self, read: asyncio.Future[tuple[bytes | None, ...]]) -> None:
        """Waits for `read` until Memcached had `timeout_s` of the loop's time to answer.

        A wait that ends late means the loop was busy elsewhere (a long callback, the GIL
        held by another thread) while the answer may have come in: that stall is the
        API's, not Memcached's, and counting it as a failure would make every reader skip
        the cache for the retry period. So a late wait gives the read another window, up
        to MAX_WINDOWS in all. (Not asyncio.timeout either: its timer cancels a read
        whose answer is already in, when both become ready in one loop iteration.)
        """
        loop = asyncio.get_running_loop()
        for _ in range(MAX_WINDOWS):
            due = loop.time() + self.timeout_s
            await asyncio.wait((read,), timeout=self.timeout_s)
            if read.done() or loop.time() - due < self.timeout_s / 4:
                return

    async def _reset(self) -> None:
        # A connection given up on mid-answer would hand that answer to the next read.
        assert self._client is not None
        try:
            await self._client.close()
        except Exception as exc:
            log.debug("closing memcached connections: %r", exc)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
