"""The API process's own small cache of results, in front of Memcached.

Keys are content addresses (inferpool.cache.CacheKeys: model, version, input bytes),
so an entry never goes stale while it lives; it lives at most as long as Memcached
keeps the same result (`cache_ttl_s`). A hit here costs a dict lookup instead of a
Memcached round trip made on the event loop, and keeps hot inputs answered while
Memcached is down. Like Triton's local response cache it evicts the least recently
used, and it is bounded by bytes as well as entries: what it holds is charged by its
size, so no mix of models and keys grows it past `max_bytes`.
"""

from __future__ import annotations

import time
from collections import OrderedDict

from inferpool.v1 import envelope_pb2

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
