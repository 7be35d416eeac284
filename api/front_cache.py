"""The API's one result cache: its own LRU in front of Memcached, read without blocking.

FrontCache is what Classify, KServe ModelInfer and bulk submissions look results up
in. It consults the process's LRU (LocalCache) first, then Memcached (CacheReader),
and keeps what Memcached had in the LRU; worker replies are put into the LRU too.

LocalCache: keys are content addresses (inferpool.cache.CacheKeys: model, version,
input bytes), so an entry never goes stale while it lives; it lives at most as long as
Memcached keeps the same result (`cache_ttl_s`). A hit here costs a dict lookup instead
of a Memcached round trip made on the event loop, and keeps hot inputs answered while
Memcached is down. Like Triton's local response cache it evicts the least recently
used, and it is bounded by bytes as well as entries: what it holds is charged by its
size, so no mix of models and keys grows it past `max_bytes`.

CacheReader: the blocking client (inferpool.cache) held the API's one thread for every lookup's
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
import time
from collections import OrderedDict
from collections.abc import Sequence

import aiomcache

from inferpool.cache import Cache
from inferpool.cache_nodes import split_host_port
from inferpool.v1 import envelope_pb2

log = logging.getLogger(__name__)

# What an entry costs besides its key's and scores' bytes: the dict slot, the tuple,
# the message object and the float (tracemalloc: ~360 bytes, plus the message's arena,
# which it does not see).
ENTRY_OVERHEAD_BYTES = 512
DEFAULT_MAX_BYTES = 64 * 1024 * 1024


class LocalCache:
    def __init__(self, max_items: int, ttl_s: float, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.max_items = max_items
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self.nbytes = 0
        # key -> (scores, when it expires on time.monotonic(), its charge in bytes); the
        # parsed message, so a hit does not parse it again. Callers only read it.
        self._entries: OrderedDict[str, tuple[envelope_pb2.Scores, float, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> envelope_pb2.Scores | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[1] <= time.monotonic():
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        return entry[0]

    def put(self, key: str, scores: envelope_pb2.Scores) -> None:
        if self.max_items <= 0:
            return
        size = len(key) + scores.ByteSize() + ENTRY_OVERHEAD_BYTES
        if size > self.max_bytes:
            return
        if key in self._entries:
            self._drop(key)
        self._entries[key] = (scores, time.monotonic() + self.ttl_s, size)
        self.nbytes += size
        while len(self._entries) > self.max_items or self.nbytes > self.max_bytes:
            _, (_, _, freed) = self._entries.popitem(last=False)
            self.nbytes -= freed

    def _drop(self, key: str) -> None:
        self.nbytes -= self._entries.pop(key)[2]


# Connections: a batch in flight and the next one's.
POOL_SIZE = 2
# Bound on one read when the loop keeps stalling: this many timeouts.
MAX_WINDOWS = 5


class CacheReader:
    """Reads the Memcached nodes that `cache` (the blocking client) is configured for,
    each key from the node its ring names (the workers write it there)."""

    def __init__(self, cache: Cache) -> None:
        self.cache = cache  # availability and the failure count, shared with the blocking client
        self.timeout_s = cache.timeout_ms / 1000
        conn_args = {"ssl": cache.tls_context} if cache.tls_context is not None else None
        self._clients = [
            aiomcache.Client(*split_host_port(node), pool_size=POOL_SIZE, conn_args=conn_args)
            for node in cache.ring.nodes
        ]
        # Keys asked for in this loop iteration by node, and who waits for each.
        self._asked: dict[int, dict[str, list[asyncio.Future[bytes | None]]]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def get(self, key: str) -> bytes | None:
        """The cached value, or None (a miss, Memcached down or slow)."""
        if not self._clients or not self.cache.available:
            return None
        return await self._ask(key)

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """The cached values of `keys`, in order (None: a miss), read with whatever else
        this loop iteration asks for."""
        if not self._clients or not self.cache.available or not keys:
            return [None] * len(keys)
        return list(await asyncio.gather(*(self._ask(key) for key in keys)))

    def _ask(self, key: str) -> asyncio.Future[bytes | None]:
        loop = asyncio.get_running_loop()
        found: asyncio.Future[bytes | None] = loop.create_future()
        node = self.cache.ring.node_of(key)
        if not self.cache.node_up(node):
            found.set_result(None)
            return found
        if not self._asked:
            task = loop.create_task(self._flush())
            # The loop keeps only weak references to tasks.
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        self._asked.setdefault(node, {}).setdefault(key, []).append(found)
        return found

    async def _flush(self) -> None:
        # Runs once the current loop iteration is over: every get() it made joins.
        await asyncio.sleep(0)
        asked, self._asked = self._asked, {}
        if len(asked) == 1:
            await self._read(*asked.popitem())
        else:  # one read per node, side by side
            await asyncio.gather(*(self._read(node, waiting) for node, waiting in asked.items()))

    async def _read(self, node: int, asked: dict[str, list[asyncio.Future[bytes | None]]]) -> None:
        keys = list(asked)
        client = self._clients[node]
        values: tuple[bytes | None, ...]
        read = asyncio.ensure_future(client.multi_get(*(key.encode() for key in keys)))
        await self._wait(read)
        try:
            if not read.done():
                read.cancel()
                raise TimeoutError(f"no answer in {self.timeout_s * 1000:.0f} ms")
            values = read.result()
        except Exception as exc:  # any client or socket failure, or the timeout, is a miss
            self.cache.record_failure("get", exc, node)
            values = (None,) * len(keys)
            await self._reset(client)
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

    async def _reset(self, client: aiomcache.Client) -> None:
        # A connection given up on mid-answer would hand that answer to the next read.
        try:
            await client.close()
        except Exception as exc:
            log.debug("closing memcached connections: %r", exc)

    async def close(self) -> None:
        for client in self._clients:
            await client.close()


class FrontCache:
    """Results by cache key: the LRU, then Memcached (misses, never errors)."""

    def __init__(self, cache: Cache, reader: CacheReader, local: LocalCache) -> None:
        self.cache = cache  # keys and availability
        self.reader = reader
        self.local = local

    def get_local(self, key: str) -> envelope_pb2.Scores | None:
        """The LRU alone: only inputs whose values passed validation are ever cached, so
        a hit here needs no further checks."""
        return self.local.get(key)

    async def get(self, key: str) -> envelope_pb2.Scores | None:
        """Memcached's entry (kept in the LRU from now on), or None."""
        if (value := await self.reader.get(key)) is None:
            return None
        scores = envelope_pb2.Scores()
        scores.ParseFromString(value)
        self.local.put(key, scores)
        return scores

    def put(self, key: str, scores: envelope_pb2.Scores) -> None:
        self.local.put(key, scores)

    async def get_many(self, keys: Sequence[str]) -> dict[str, bytes]:
        """Memcached's entries among `keys` (serialized Scores), in one read."""
        values = await self.reader.get_many(keys)
        return {key: value for key, value in zip(keys, values, strict=True) if value is not None}
