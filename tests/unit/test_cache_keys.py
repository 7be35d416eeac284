"""The front's local cache of answers, without servers (the keys against real servers:
tests/integration/test_cache_keys.py)."""

from __future__ import annotations

import pytest

from inferpool.api.front_cache import ENTRY_OVERHEAD_BYTES, LocalCache
from inferpool.v1 import envelope_pb2

pytestmark = pytest.mark.timeout(180)


def test_the_local_cache_is_bounded_by_bytes() -> None:
    values = envelope_pb2.Scores(values=[0.1] * 10)
    entry = len("k" * 40) + values.ByteSize() + ENTRY_OVERHEAD_BYTES
    cache = LocalCache(max_items=1000, ttl_s=60, max_bytes=3 * entry)
    for i in range(10):
        cache.put(f"{i:040d}", values)
    assert len(cache) == 3 and cache.nbytes == 3 * entry
    assert cache.get(f"{9:040d}") is values and cache.get(f"{0:040d}") is None
    cache.put(f"{9:040d}", values)  # a repeat replaces, never double-counts
    assert len(cache) == 3 and cache.nbytes == 3 * entry
    huge = envelope_pb2.Scores(values=[0.1] * (4 * entry))
    cache.put("huge", huge)
    assert cache.get("huge") is None and len(cache) == 3
