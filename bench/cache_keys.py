"""What a cache key costs: the keyed hash against the seeded XXH3 it replaced, side by side.

    python -m bench.cache_keys            # key functions, in one process
    python -m bench.cache_keys --plane    # a Classify cache hit through DataPlane.classify

The first mode times, per input of the digits model (784 float32, 3136 bytes) and per
row of a 256-row bulk block: the old key (XXH3-128 seeded from public values, as it
was), the new one (HMAC-SHA256 under a derived key, inferpool.cache.CacheKeys) and the
keyed BLAKE2b considered instead. The second times the handler's share of a Classify
answered from the API's local cache (no gRPC, no Memcached): run it once with this
tree first on PYTHONPATH and once with the tree before the change to compare the two.
Times are the best of several rounds of thread CPU time, which a busy machine inflates
less than wall time.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import hashlib
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

ROOT = Path(__file__).resolve().parent.parent


def best_us(fn: Callable[[], Any], number: int, rounds: int = 15) -> float:
    best = float("inf")
    for _ in range(rounds):
        t0 = time.thread_time()
        for _ in range(number):
            fn()
        best = min(best, (time.thread_time() - t0) / number)
    return best * 1e6


def keys() -> None:
    from inferpool.cache import CacheKeys
    from inferpool.repository import Repository

    cfg = Repository.load(ROOT / "models").resolve("digits")
    rng = np.random.default_rng(0)
    rows = rng.random((256, *cfg.input_shape), dtype=np.float32)
    one = rows[0].tobytes()

    @functools.lru_cache(maxsize=256)
    def old_parts(model: str, version: int, dtype: int, shape: tuple[int, ...]) -> tuple[int, str]:
        header = f"{model}\0{version}\0{dtype}\0{','.join(map(str, shape))}\0".encode()
        return xxhash.xxh3_64_intdigest(header), f"inferpool:v1:{model}:{version}:"

    def old_key(data: bytes | memoryview) -> str:
        seed, prefix = old_parts(cfg.name, cfg.version, cfg.input_dtype, cfg.request_shape)
        return prefix + xxhash.xxh3_128_hexdigest(data, seed)

    def old_rows() -> list[str]:
        seed, prefix = old_parts(cfg.name, cfg.version, cfg.input_dtype, cfg.request_shape)
        data = rows.data.cast("B")
        size = len(data) // len(rows)
        return [
            prefix + xxhash.xxh3_128_hexdigest(data[at : at + size], seed) for at in range(0, len(data), size)
        ]

    new = CacheKeys(os.urandom(32))
    blake_key = os.urandom(32)

    def blake_rows() -> list[str]:
        data = rows.data.cast("B")
        size = len(data) // len(rows)
        b2 = hashlib.blake2b
        return [
            "inferpool:v2:digits:1:" + b2(data[at : at + size], key=blake_key, digest_size=16).hexdigest()
            for at in range(0, len(data), size)
        ]

    print(f"digits input: {len(one)} bytes; bulk block: {len(rows)} rows")
    print(f"{'key function':34s} {'per input':>10s} {'per bulk row':>13s}")
    table = [
        ("old: XXH3-128, public seed", lambda: old_key(one), old_rows),
        ("new: HMAC-SHA256 (128 bits)", lambda: new.input_key(cfg, one), lambda: new.row_keys(cfg, rows)),
        (
            "keyed BLAKE2b (128 bits)",
            lambda: hashlib.blake2b(one, key=blake_key, digest_size=16).hexdigest(),
            blake_rows,
        ),
    ]
    for name, single, bulk in table:
        print(f"{name:34s} {best_us(single, 5000):8.2f} us {best_us(bulk, 20) / len(rows):10.2f} us")


def plane() -> None:
    """DataPlane.classify for an input the API's local cache holds (as old or new code keys it)."""
    from inferpool.api.core import DataPlane
    from inferpool.api.front_cache import CacheReader, LocalCache
    from inferpool.cache import Cache
    from inferpool.repository import Repository
    from inferpool.tensor import to_proto
    from inferpool.v1 import envelope_pb2, inference_pb2

    repository = Repository.load(ROOT / "models")
    cfg = repository.resolve("digits")
    cache = Cache("", 20.0, 3600)  # no Memcached: a hit comes from the local cache
    local = LocalCache(4096, 3600)
    data_plane = DataPlane(repository, cache, CacheReader(cache), None, None, 5000.0, local_cache=local)  # type: ignore[arg-type]
    x = np.random.default_rng(1).random((1, *cfg.input_shape), dtype=np.float32)
    request = inference_pb2.ClassifyRequest(model="digits", input=to_proto(x), request_id="bench")
    if hasattr(cache, "keys"):
        key = cache.keys.input_key(cfg, request.input.data)
    else:  # the tree before keyed hashes
        from inferpool.cache import input_key  # type: ignore[attr-defined]

        key = input_key(cfg.name, cfg.version, request.input)
    local.put(key, envelope_pb2.Scores(values=[0.1] * 10))

    loop = asyncio.new_event_loop()

    async def many(n: int) -> None:
        for _ in range(n):
            response = await data_plane.classify(request, 5.0)
        assert response.cached

    per_call = best_us(lambda: loop.run_until_complete(many(1000)), 1) / 1000
    print(f"Classify handler, local cache hit: {per_call:.2f} us per call")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--plane", action="store_true", help="time a Classify hit through DataPlane.classify")
    args = parser.parse_args()
    plane() if args.plane else keys()


if __name__ == "__main__":
    main()
