"""The shared result cache in Memcached.

Keys are a keyed hash (CacheKeys) of everything that determines the answer (model,
version, dtype, shape, bytes; the tenant when scoped), so only an identical input to
the same model version can hit, and nobody without the secret can aim at a key. Only
workers write; the API only reads. Memcached being down or slow is a miss, never
an error: each call is bounded by a socket timeout, and after a failure that node
is skipped for `retry_after_s` so a dead server costs one timeout, not one per call.
Several nodes share the keys by rendezvous hashing (inferpool/cache_nodes.py).
"""

from __future__ import annotations

import hmac
import logging
import os
import ssl
import threading
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from pymemcache.client.base import PooledClient

from inferpool.cache_nodes import NodeRing, parse_nodes, split_host_port
from inferpool.names import cache_key
from inferpool.repository import ModelConfig
from inferpool.settings import Settings, SettingsError

log = logging.getLogger(__name__)


def tls_context(ca_file: str, cert_file: str = "", key_file: str = "") -> ssl.SSLContext | None:
    """The client TLS context for Memcached (None when no TLS file is set): verifies
    the server against `ca_file` (host name included), and presents a client
    certificate when one is given."""
    if not (ca_file or cert_file or key_file):
        return None
    context = ssl.create_default_context(cafile=ca_file or None)
    if cert_file:
        context.load_cert_chain(cert_file, key_file or None)
    return context


# The key format: bumped whenever the digest changes, so that no entry written under an
# earlier format is ever read under a new key (v1: unkeyed, seeded XXH3-128).
KEY_FORMAT = "v2"
# The secret `make up` uses (Procfile): public, so it protects nothing; start-up warns.
DEV_SECRET = "inferpool-local-development-only"
MIN_SECRET_CHARS = 16
# Derived keys kept per model signature and scope: scopes are the tokens file's names,
# so this only overflows on a misconfiguration; then it starts over.
MAX_DERIVED_KEYS = 4096


def key_secret(settings: Settings) -> bytes:
    """The cache key secret the settings name, as the 32-byte HMAC key (SettingsError when
    Memcached is configured without one). Never echoes the secret."""
    raw = settings.cache_key_secret
    if settings.cache_key_secret_file:
        if raw:
            raise SettingsError("set INFERPOOL_CACHE_KEY_SECRET or INFERPOOL_CACHE_KEY_SECRET_FILE, not both")
        try:
            lines = Path(settings.cache_key_secret_file).read_text().split("\n")
        except (OSError, UnicodeDecodeError) as exc:
            raise SettingsError(
                f"INFERPOOL_CACHE_KEY_SECRET_FILE: cannot read it ({type(exc).__name__})"
            ) from None
        raw = next((line.strip() for line in lines if line.strip()), "")
    if not raw:
        if settings.memcached:
            raise SettingsError(
                "INFERPOOL_CACHE_KEY_SECRET (or INFERPOOL_CACHE_KEY_SECRET_FILE) is required while "
                "INFERPOOL_MEMCACHED is set: cache keys are keyed with it, and the API and every "
                "worker must share it (generate one with `openssl rand -hex 32`)"
            )
        return os.urandom(32)  # no cache: nothing is keyed with it
    if len(raw) < MIN_SECRET_CHARS:
        raise SettingsError(f"the cache key secret must be at least {MIN_SECRET_CHARS} characters")
    if raw == DEV_SECRET:
        log.warning(
            "cache keys use the public development secret: anyone who can write to Memcached "
            "can plant answers; set INFERPOOL_CACHE_KEY_SECRET outside local development"
        )
    # A fixed-size key whatever the secret's length, bound to this use of it.
    return hmac.digest(raw.encode(), b"inferpool cache keys", "sha256")


class CacheKeys:
    """Cache keys: HMAC-SHA256 of an input's bytes, truncated to 128 bits, under a key
    derived from the shared secret and everything else that determines the answer
    (model, version, dtype, shape, and the tenant when keys are scoped per caller).

    Keyed, so that nobody without the secret can compute the key of an input, or forge
    a second input with the same key (the unkeyed XXH3 this replaced was solvable in
    microseconds). Callers hash only validated inputs: dtype and shape are then the
    model's, and the derived key is computed once per (model, version, scope).
    """

    def __init__(self, secret: bytes, per_caller: bool = False) -> None:
        self._secret = secret
        # Scoped per caller, one tenant's results are neither served to another nor
        # revealed to it (the `cached` flag, a job's cached count).
        self.per_caller = per_caller
        self._derived: dict[tuple[str, int, int, tuple[int, ...], str], tuple[hmac.HMAC, str]] = {}

    def scope(self, caller: str) -> str:
        """The scope an authenticated caller's keys fall under: its name when keys are
        scoped per caller, else "" (one cache shared by all)."""
        return caller if self.per_caller else ""

    def _parts(self, cfg: ModelConfig, scope: str) -> tuple[hmac.HMAC, str]:
        """An HMAC under the derived key with nothing hashed yet (copying it skips the
        key set-up: 3.1 against 3.5 us a 3 KB input), and the keys' prefix."""
        which = (cfg.name, cfg.version, cfg.input_dtype, cfg.input_shape, scope)
        parts = self._derived.get(which)
        if parts is None:
            shape = ",".join(map(str, cfg.request_shape))
            # Scope last: every field before it is \0-free, so the header is injective.
            header = f"{KEY_FORMAT}\0{cfg.name}\0{cfg.version}\0{cfg.input_dtype}\0{shape}\0{scope}"
            key = hmac.digest(self._secret, header.encode(), "sha256")
            parts = hmac.new(key, digestmod="sha256"), cache_key(KEY_FORMAT, cfg.name, cfg.version, "")
            if len(self._derived) >= MAX_DERIVED_KEYS:
                self._derived.clear()
            self._derived[which] = parts
        return parts

    def input_key(self, cfg: ModelConfig, data: bytes | memoryview, scope: str = "") -> str:
        """The key of one validated input given as its bytes."""
        base, prefix = self._parts(cfg, scope)
        mac = base.copy()
        mac.update(data)
        return prefix + mac.digest()[:16].hex()

    def row_keys(self, cfg: ModelConfig, rows: np.ndarray, scope: str = "") -> list[str]:
        """input_key of each row of validated inputs [n, *input shape], hashed from slices
        of one memoryview (no array or bytes object per row)."""
        if not len(rows):
            return []
        base, prefix = self._parts(cfg, scope)
        data = np.ascontiguousarray(rows).data.cast("B")
        size = len(data) // len(rows)
        keys = []
        for at in range(0, len(data), size):
            mac = base.copy()
            mac.update(data[at : at + size])
            keys.append(prefix + mac.digest()[:16].hex())
        return keys


class Cache:
    """The blocking client (pymemcache) of one or several Memcached nodes: each key is
    on the node `inferpool.cache_nodes.NodeRing` names, and a node that fails is
    skipped (its keys are misses) for `retry_after_s` while the others are used."""

    def __init__(
        self,
        address: str,
        timeout_ms: float,
        ttl_s: int,
        retry_after_s: float = 1.0,
        tls_context: ssl.SSLContext | None = None,
        keys: CacheKeys | None = None,
    ) -> None:
        # host:port, or several comma-separated (INFERPOOL_MEMCACHED).
        self.ring = NodeRing(parse_nodes(address))
        self.enabled = bool(self.ring.nodes)
        # Without the deployment's shared secret, a secret of its own: keys then agree
        # only within this process, never with anyone else's.
        self.keys = keys if keys is not None else CacheKeys(os.urandom(32))
        # Where and how to reach it, for a non-blocking reader of the same cache.
        self.address = address
        self.timeout_ms = timeout_ms
        self.tls_context = tls_context
        self.ttl_s = ttl_s
        self.retry_after_s = retry_after_s
        self.errors = 0
        self._down_until = [0.0] * len(self.ring)
        self._lock = threading.Lock()
        timeout_s = timeout_ms / 1000
        self._clients = [
            PooledClient(
                split_host_port(node),
                connect_timeout=timeout_s,
                timeout=timeout_s,
                no_delay=True,
                max_pool_size=8,
                tls_context=tls_context,  # None: plain text
            )
            for node in self.ring.nodes
        ]

    @classmethod
    def from_settings(cls, settings: Settings) -> Cache:
        """The cache as the settings describe it, TLS and key secret included."""
        return cls(
            settings.memcached,
            settings.cache_timeout_ms,
            settings.cache_ttl_s,
            tls_context=tls_context(
                settings.memcached_tls_ca_file,
                settings.memcached_tls_cert_file,
                settings.memcached_tls_key_file,
            ),
            keys=CacheKeys(key_secret(settings), settings.cache_per_caller),
        )

    @property
    def available(self) -> bool:
        """False while the cache is disabled or every node is backing off after a failure."""
        return any(self.node_up(node) for node in range(len(self._clients)))

    def node_up(self, node: int) -> bool:
        """False while node `node` (an index into ring.nodes) backs off after a failure."""
        return time.monotonic() >= self._down_until[node]

    def available_for(self, key: str) -> bool:
        """Whether the node holding `key` is in use now."""
        return self.enabled and self.node_up(self.ring.node_of(key))

    def record_failure(self, op: str, exc: Exception, node: int = 0) -> None:
        """Counts a failed call and skips node `node` for `retry_after_s`."""
        with self._lock:
            self.errors += 1
            first = time.monotonic() >= self._down_until[node]
            self._down_until[node] = time.monotonic() + self.retry_after_s
        if first:
            log.warning(
                "memcached %s %s failed (%r); treating its keys as misses for %.1fs",
                self.ring.nodes[node],
                op,
                exc,
                self.retry_after_s,
            )

    def get(self, key: str) -> bytes | None:
        if not self.enabled:
            return None
        node = self.ring.node_of(key)
        if not self.node_up(node):
            return None
        try:
            value: bytes | None = self._clients[node].get(key)
            return value
        except Exception as exc:  # any client or socket failure is a miss
            self.record_failure("get", exc, node)
            return None

    def get_many(self, keys: list[str]) -> dict[str, bytes]:
        """The keys that hit; everything else (and any failure) is a miss."""
        found: dict[str, bytes] = {}
        if not keys or not self.enabled:
            return found
        for node, some in self.ring.group(keys).items():
            if not self.node_up(node):
                continue
            try:
                found.update(self._clients[node].get_many(some))
            except Exception as exc:
                self.record_failure("get_many", exc, node)
        return found

    def set_many(self, values: Mapping[str, bytes], wait: bool = True) -> None:
        """Stores the values. With `wait` (the default) it returns once Memcached stored
        them: with noreply a get on another connection can overtake the set, and a caller
        repeating a request it just got answered would miss. Without, it returns once they
        are sent (3.7 -> 1.6 µs per key, measured on batches of 64 bulk results)."""
        if not values or not self.enabled:
            return
        for node, some in self.ring.group(values).items():
            if not self.node_up(node):
                continue
            try:
                self._clients[node].set_many(
                    {key: values[key] for key in some}, expire=self.ttl_s, noreply=not wait
                )
            except Exception as exc:
                self.record_failure("set", exc, node)

    def close(self) -> None:
        for client in self._clients:
            client.close()
