"""The key -> Memcached node mapping the API's reader and the workers' writer share."""

from __future__ import annotations

import pytest

from inferpool.cache import Cache
from inferpool.cache_nodes import NodeRing, parse_nodes
from inferpool.settings import Settings, SettingsError

NODES = ["10.0.0.1:11211", "10.0.0.2:11211", "10.0.0.3:11211"]
KEYS = [f"v2:digits:1::{i:032x}" for i in range(3000)]


def _placement(ring: NodeRing) -> dict[str, str]:
    return {key: ring.nodes[ring.node_of(key)] for key in KEYS}


def test_keys_spread_evenly_over_the_nodes() -> None:
    counts = {node: 0 for node in NODES}
    for node in _placement(NodeRing(NODES)).values():
        counts[node] += 1
    assert all(800 <= n <= 1200 for n in counts.values()), counts


def test_the_node_of_a_key_does_not_depend_on_the_order_nodes_are_listed() -> None:
    assert _placement(NodeRing(NODES)) == _placement(NodeRing(reversed(NODES)))


def test_removing_a_node_moves_only_its_keys() -> None:
    before = _placement(NodeRing(NODES))
    after = _placement(NodeRing(NODES[:2]))
    moved = [key for key in KEYS if before[key] != after[key]]
    assert moved and all(before[key] == NODES[2] for key in moved)


def test_group_keeps_each_nodes_keys_in_order() -> None:
    ring = NodeRing(NODES)
    groups = ring.group(KEYS[:50])
    assert sorted(k for keys in groups.values() for k in keys) == sorted(KEYS[:50])
    for node, keys in groups.items():
        assert keys == [k for k in KEYS[:50] if ring.node_of(k) == node]


def test_one_node_is_node_zero_and_a_node_listed_twice_is_refused() -> None:
    assert NodeRing(["127.0.0.1:1"]).node_of("anything") == 0
    with pytest.raises(ValueError):
        NodeRing(["a:1", "a:1"])


def test_the_setting_takes_a_list_of_nodes() -> None:
    settings = Settings.from_env({"INFERPOOL_MEMCACHED": " a:1, b:2 ,"})
    assert settings.memcached == "a:1,b:2" and parse_nodes(settings.memcached) == ["a:1", "b:2"]
    assert Settings.from_env({"INFERPOOL_MEMCACHED": ""}).memcached == ""
    for bad in ("a:1,b", "a:1,a:1", "a:1,b:70000"):
        with pytest.raises(SettingsError, match="INFERPOOL_MEMCACHED"):
            Settings.from_env({"INFERPOOL_MEMCACHED": bad})


def test_the_blocking_client_places_keys_by_the_ring() -> None:
    # Nothing listens there: construction connects lazily.
    cache = Cache(",".join(NODES), timeout_ms=10, ttl_s=60)
    assert cache.ring.nodes == NODES and cache.enabled
    key = KEYS[0]
    node = cache.ring.node_of(key)
    cache.record_failure("get", OSError("down"), node)
    assert not cache.available_for(key) and cache.available
    assert cache.get(key) is None and cache.errors == 1  # skipped, not tried again
    cache.close()
