"""Which Memcached node holds a key: the one function the API's reader (aiomcache) and
the workers' writer (pymemcache) share, so that both always map a key to the same node.

Rendezvous (highest random weight) hashing: a key lives on the node whose hash of
(node, key) is highest. Removing or adding a node moves only the keys that node held
or takes, with no ring of virtual nodes to size. Every process must list the same
nodes (their order does not matter); a node that is down is not taken out of the
mapping, so its keys are misses until it is back rather than being written
elsewhere by some processes and looked for in the old place by others.

blake2b from hashlib rather than pymemcache's RendezvousHash: that one hashes with
murmur3 in pure Python (tens of microseconds a key on the API's one thread), and
aiomcache has no hashing of its own to agree with.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable


def parse_nodes(setting: str) -> list[str]:
    """The host:port entries of a comma-separated setting, in order, blanks dropped."""
    return [node.strip() for node in setting.split(",") if node.strip()]


def split_host_port(node: str) -> tuple[str, int]:
    host, _, port = node.rpartition(":")
    return host, int(port)


class NodeRing:
    """Maps keys to indexes into `nodes`."""

    def __init__(self, nodes: Iterable[str]) -> None:
        self.nodes = list(nodes)
        if len(set(self.nodes)) != len(self.nodes):
            raise ValueError(f"a Memcached node is listed twice: {self.nodes}")
        # Hashed as "node\0key": \0 never occurs in a host:port, so no two (node, key)
        # pairs hash the same bytes.
        self._prefixes = [node.encode() + b"\0" for node in self.nodes]

    def __len__(self) -> int:
        return len(self.nodes)

    def node_of(self, key: str) -> int:
        """The index of the node that holds `key` (0 with a single node, unhashed)."""
        if len(self._prefixes) <= 1:
            return 0
        data = key.encode()
        best, best_score = 0, b""
        for index, prefix in enumerate(self._prefixes):
            score = hashlib.blake2b(prefix + data, digest_size=8).digest()
            if score > best_score:
                best, best_score = index, score
        return best

    def group(self, keys: Iterable[str]) -> dict[int, list[str]]:
        """`keys` by the node that holds them, each list in the order given."""
        groups: dict[int, list[str]] = {}
        for key in keys:
            groups.setdefault(self.node_of(key), []).append(key)
        return groups
