"""The API process's own small cache of results, in front of Memcached.

Keys are content addresses (model, version, input bytes: inferpool.cache.input_key),
so an entry never goes stale while it lives; it lives at most as long as Memcached
keeps the same result (`cache_ttl_s`). A hit here costs a dict lookup instead of a
Memcached round trip made on the event loop, and keeps hot inputs answered while
Memcached is down. Like Triton's local response cache, it is bounded by entries and
evicts the least recently used.
"""

from __future__ import annotations

import time
from collections import OrderedDict

from inferpool.v1 import envelope_pb2


class LocalCache:
    def __init__(self, max_items: int, ttl_s: float) -> None:
        self.max_items = max_items
        self.ttl_s = ttl_s
        # key -> (scores, when it expires on time.monotonic()); the parsed message, so
        # a hit does not parse it again. Callers only read it.
        self._entries: OrderedDict[str, tuple[envelope_pb2.Scores, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> envelope_pb2.Scores | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[1] <= time.monotonic():
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return entry[0]

    def put(self, key: str, scores: envelope_pb2.Scores) -> None:
        if self.max_items <= 0:
            return
        self._entries[key] = (scores, time.monotonic() + self.ttl_s)
        self._entries.move_to_end(key)
        if len(self._entries) > self.max_items:
            self._entries.popitem(last=False)
