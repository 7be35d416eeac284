"""Cache keys against real servers: keyed so that nobody without the secret can aim at
one, computed only after the input's signature is checked, and scoped per caller when
asked.

The key function this replaced (XXH3-128 seeded with a value derived from public facts)
is reproduced here, and a second input with the same old key is forged against it at
test time: XXH3 mixes each 8-byte lane of a stripe into an accumulator by addition and
a 32x32-bit product of the lane XOR a (public) secret word, so lanes whose product is
made zero can be chosen to leave every accumulator as it was.
"""

from __future__ import annotations

import gc
import struct
import subprocess
import sys
import threading
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import xxhash
from pymemcache.client.base import Client as MemcacheClient

from inferpool.cache import DEV_SECRET, KEY_FORMAT, CacheKeys, key_secret
from inferpool.client import Client
from inferpool.repository import ModelConfig
from inferpool.settings import Settings, SettingsError
from inferpool.triton import grpc_service_pb2 as kpb
from inferpool.triton import grpc_service_pb2_grpc as kpb_grpc
from inferpool.v1 import envelope_pb2, inference_pb2, tensor_pb2
from tests.servers import ROOT, ApiThread, MemcachedServer, RedisServer, Worker, stack_settings

pytestmark = pytest.mark.timeout(180)

ALICE = "alice-0123456789abcdef0123456789abcdef"

BOB = "bob-fedcba9876543210fedcba9876543210"

MASK64 = (1 << 64) - 1

# The first 48 bytes of XXH3's public default secret (kSecret in xxhash.h), from which
# a seeded hash derives its own secret.
XXH3_KSECRET = bytes.fromhex(
    "b8fe6c3923a44bbe7c01812cf721ad1cded46de9839097db7240a4a4b7b3671fcb79e64eccc0e578825ad07dccff7221"
)


def image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random((1, 1, 28, 28), dtype=np.float32)


def old_seed(cfg: ModelConfig) -> int:
    shape = ",".join(map(str, cfg.request_shape))
    return xxhash.xxh3_64_intdigest(f"{cfg.name}\0{cfg.version}\0{cfg.input_dtype}\0{shape}\0".encode())


def old_key(cfg: ModelConfig, data: bytes) -> str:
    """The key the cache used before: anyone can compute it from public values."""
    return f"inferpool:v1:{cfg.name}:{cfg.version}:" + xxhash.xxh3_128_hexdigest(data, old_seed(cfg))


def forge(data: bytes, seed: int) -> bytes | None:
    """A different input with the same seeded XXH3-128 (inputs over 1 KB), or None when
    the lanes it would write do not all read as finite float32 values.

    Lanes 0 and 1 of stripes a and b of the first 1 KB block are rewritten. Stripe n
    lane l adds its value v to acc[l ^ 1] and lo32(v ^ s) * hi32(v ^ s) to acc[l]
    (s: the secret word at 8n + 8l). A new lane whose low half equals s's low half,
    or whose high half equals s's high half, adds a zero product; the other half of
    each of two such lanes is solved so their sum equals the old lanes' whole
    contribution to the accumulator they feed. The block's accumulators, and so the
    hash, are unchanged."""
    words = struct.unpack("<6Q", XXH3_KSECRET)
    # XXH3_initCustomSecret: 16-byte rounds of (lo + seed, hi - seed).
    secret = [(w + seed if i % 2 == 0 else w - seed) & MASK64 for i, w in enumerate(words)]
    for a, b in ((0, 2), (0, 4), (2, 4)):  # stripes whose secret words are known
        lanes = {n: struct.unpack_from("<2Q", data, 64 * n) for n in (a, b)}

        def product(value: int, word: int) -> int:
            mixed = value ^ word
            return (mixed & 0xFFFFFFFF) * (mixed >> 32)

        def solve(target: int, word_a: int, word_b: int) -> tuple[int, int]:
            low_a, high_b = word_a & 0xFFFFFFFF, word_b >> 32
            low_b = (target - low_a) & 0xFFFFFFFF
            carry = (low_a + low_b) >> 32
            high_a = ((target >> 32) - high_b - carry) & 0xFFFFFFFF
            return (high_a << 32) | low_a, (high_b << 32) | low_b

        sec = {n: (secret[n], secret[n + 1]) for n in (a, b)}
        into_acc1 = sum(lanes[n][0] + product(lanes[n][1], sec[n][1]) for n in (a, b)) & MASK64
        into_acc0 = sum(lanes[n][1] + product(lanes[n][0], sec[n][0]) for n in (a, b)) & MASK64
        lane0_a, lane0_b = solve(into_acc1, sec[a][0], sec[b][0])
        lane1_a, lane1_b = solve(into_acc0, sec[a][1], sec[b][1])
        out = bytearray(data)
        struct.pack_into("<2Q", out, 64 * a, lane0_a, lane1_a)
        struct.pack_into("<2Q", out, 64 * b, lane0_b, lane1_b)
        if np.isfinite(np.frombuffer(bytes(out), dtype="<f4")).all():
            return bytes(out)
    return None


def forged_pair(cfg: ModelConfig, first_seed: int) -> tuple[np.ndarray, np.ndarray]:
    for seed in range(first_seed, first_seed + 100):
        genuine = image(seed)
        forged = forge(genuine.tobytes(), old_seed(cfg))
        if forged is not None:
            return genuine, np.frombuffer(forged, dtype=np.float32).reshape(genuine.shape)
    raise AssertionError("no finite forgery in 100 inputs")


def scores(response: inference_pb2.ClassifyResponse) -> list[tuple[int, float]]:
    return [(c.index, c.score) for c in response.classes]


def test_old_keys_are_forgeable_and_new_keys_need_the_secret(api: ApiThread) -> None:
    cfg = api.server.repository.resolve("digits")
    genuine, forged = forged_pair(cfg, 100)
    assert genuine.tobytes() != forged.tobytes()
    assert old_key(cfg, genuine.tobytes()) == old_key(cfg, forged.tobytes())

    keys = CacheKeys(b"k" * 32)
    key = keys.input_key(cfg, genuine.tobytes())
    assert (
        key.startswith(f"inferpool:{KEY_FORMAT}:digits:{cfg.version}:") and len(key.rsplit(":", 1)[1]) == 32
    )
    assert keys.input_key(cfg, forged.tobytes()) != key
    assert CacheKeys(b"k" * 32).input_key(cfg, genuine.tobytes()) == key  # shared secret, same key
    assert CacheKeys(b"j" * 32).input_key(cfg, genuine.tobytes()) != key  # another secret, another key
    assert xxhash.xxh3_128_hexdigest(genuine.tobytes(), old_seed(cfg)) not in key
    # A scope is part of the key; without per-caller keys every caller shares "".
    assert keys.input_key(cfg, genuine.tobytes(), "alice") != key
    assert keys.scope("alice") == "" and CacheKeys(b"k" * 32, per_caller=True).scope("alice") == "alice"
    rows = np.concatenate([genuine, forged])
    assert keys.row_keys(cfg, rows, "bob") == [keys.input_key(cfg, r.tobytes(), "bob") for r in rows]


def test_a_forged_collision_of_the_old_key_does_not_poison_the_genuine_input(
    api: ApiThread, client: Client
) -> None:
    cfg = api.server.repository.resolve("digits")
    genuine, forged = forged_pair(cfg, 200)
    assert old_key(cfg, genuine.tobytes()) == old_key(cfg, forged.tobytes())
    planted = client.classify(forged, "digits", top_k=10)
    assert not planted.cached

    answer = client.classify(genuine, "digits", top_k=10)
    assert not answer.cached  # under the old key: cached=true, with the forged input's scores
    assert scores(answer) != scores(planted)
    again = client.classify(genuine, "digits", top_k=10)
    assert again.cached and scores(again) == scores(answer)


def test_an_entry_planted_under_a_key_anyone_can_compute_is_never_read(
    api: ApiThread, client: Client, memcached_server: MemcachedServer
) -> None:
    cfg = api.server.repository.resolve("digits")
    genuine = image(300)
    poison = envelope_pb2.Scores(values=[0.0] * 9 + [1.0]).SerializeToString()
    digest = xxhash.xxh3_128_hexdigest(genuine.tobytes(), old_seed(cfg))
    host, port = memcached_server.address.rsplit(":", 1)
    writer = MemcacheClient((host, int(port)), timeout=5)
    try:
        # Where the old code looked, and the same digest under the new format's prefix.
        for key in (old_key(cfg, genuine.tobytes()), f"inferpool:{KEY_FORMAT}:digits:{cfg.version}:{digest}"):
            writer.set(key, poison)
    finally:
        writer.close()
    answer = client.classify(genuine, "digits", top_k=10)
    assert not answer.cached
    assert answer.classes[0].score < 0.999 or answer.classes[0].index != 9


def test_the_secret_is_required_with_memcached_and_never_echoed(
    tmp_path: Path, redis_server: RedisServer, memcached_server: MemcachedServer, logdir: Path
) -> None:
    with pytest.raises(SettingsError, match="INFERPOOL_CACHE_KEY_SECRET"):
        key_secret(Settings(memcached="127.0.0.1:11211"))
    assert len(key_secret(Settings(memcached=""))) == 32  # no cache: nothing to share
    short = "tooshort-8"
    with pytest.raises(SettingsError) as info:
        key_secret(Settings(cache_key_secret=short))
    assert short not in str(info.value)
    secret = "a-long-enough-secret-for-the-test"
    path = tmp_path / "secret"
    path.write_text(f"\n{secret}\n")
    from_file = key_secret(Settings.from_env({"INFERPOOL_CACHE_KEY_SECRET_FILE": str(path)}))
    assert (
        from_file
        == key_secret(Settings(cache_key_secret=secret))
        != key_secret(Settings(cache_key_secret=DEV_SECRET))
    )
    with pytest.raises(SettingsError, match="not both"):
        key_secret(Settings(cache_key_secret=secret, cache_key_secret_file=str(path)))
    assert secret not in repr(Settings(cache_key_secret=secret))

    # Both processes refuse to start without it.
    with pytest.raises(SettingsError, match="INFERPOOL_CACHE_KEY_SECRET"):
        ApiThread(stack_settings(redis_server, memcached_server, cache_key_secret=""))
    env = {
        **stack_settings(redis_server, memcached_server, cache_key_secret="").env(),
        "PYTHONPATH": str(ROOT),
    }
    env = {k: v for k, v in env.items() if k != "INFERPOOL_CACHE_KEY_SECRET"}
    env["PATH"] = "/usr/bin:/bin"
    done = subprocess.run(
        [sys.executable, "-m", "inferpool.workers.main"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert done.returncode != 0 and "INFERPOOL_CACHE_KEY_SECRET" in done.stderr


def test_a_giant_shape_is_refused_before_anything_is_hashed_or_kept(api: ApiThread, client: Client) -> None:
    """2M dimensions (a 2 MB shape): the old code made a tuple of them, hashed their text
    and kept the tuple in an lru_cache, ~35 MB and half a second of the event loop per
    call. Now the rank is compared first.

    The API runs in this process (ApiThread), so what it keeps is measured with
    tracemalloc over a round of calls made after a first one (which warms up what
    handling such a message takes at all), and the event loop's stalls with health
    checks during a third."""
    t = tensor_pb2.Tensor(
        dtype=tensor_pb2.DATA_TYPE_FLOAT32, shape=[1] * 2_000_000, data=image(400).tobytes()
    )
    body = inference_pb2.ClassifyRequest(model="digits", input=t).SerializeToString()
    start = body.find(b"\x01" * 1000)  # the packed dimensions, a byte each
    # Each call its own shape, as each was its own cache entry.
    bodies = [body[: start + i] + b"\x02" + body[start + i + 1 :] for i in range(24)]
    classify = client.channel.unary_unary(
        "/inferpool.v1.InferenceService/Classify",
        request_serializer=lambda body: body,
        response_deserializer=inference_pb2.ClassifyResponse.FromString,
    )
    delays: list[float] = []
    stop = threading.Event()

    def probe() -> None:
        while not stop.is_set():
            t0 = time.perf_counter()
            assert client.health(timeout_s=10) == "SERVING"
            delays.append(time.perf_counter() - t0)

    def call(body: bytes) -> None:
        with pytest.raises(grpc.RpcError) as info:
            classify(body, timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "shape" in info.value.details() and len(info.value.details()) < 300

    for body in bodies[:8]:
        call(body)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for body in bodies[8:16]:
            call(body)
        gc.collect()
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert kept < 4 * 1024 * 1024, f"{kept / 2**20:.0f} MB kept after 8 calls"

    prober = threading.Thread(target=probe)
    prober.start()
    try:
        for body in bodies[16:]:
            call(body)
    finally:
        stop.set()
        prober.join(30)
    assert delays and max(delays) < 0.25, f"a health check waited {max(delays) * 1000:.0f} ms"
    # And the right input still works.
    assert client.classify(image(400), "digits").classes


@pytest.fixture(scope="module")
def tokens_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("auth") / "tokens"
    path.write_text(f"alice:{ALICE}\nbob:{BOB}\n")
    return path


@pytest.fixture(scope="module", params=[False, True], ids=["shared", "per-caller"])
def tenant_api(
    request: pytest.FixtureRequest,
    redis_server: RedisServer,
    memcached_server: MemcachedServer,
    worker: Worker,
    tokens_file: Path,
) -> Iterator[tuple[ApiThread, bool]]:
    per_caller: bool = request.param
    server = ApiThread(
        stack_settings(
            redis_server, memcached_server, auth_tokens_file=str(tokens_file), cache_per_caller=per_caller
        )
    )
    yield server, per_caller
    server.stop()


def test_the_cache_is_shared_or_kept_per_caller(tenant_api: tuple[ApiThread, bool]) -> None:
    api, per_caller = tenant_api
    seed = 500 + 10 * per_caller
    with Client(api.target, token=ALICE) as alice, Client(api.target, token=BOB) as bob:
        x = image(seed)
        first = alice.classify(x, "digits", top_k=10)
        assert not first.cached and alice.classify(x, "digits").cached
        theirs = bob.classify(x, "digits", top_k=10)
        assert theirs.cached is not per_caller  # scoped: nothing tells bob alice sent it
        assert scores(theirs) == scores(first)
        assert bob.classify(x, "digits").cached  # bob's own entry, written by the worker

        # Bulk: what bob's job finds cached at submit time.
        y = image(seed + 1)
        assert not alice.classify(y, "digits").cached
        job = bob.submit(np.concatenate([x, y]), "digits")
        final = job.wait(timeout_s=60)
        assert final.counts.done == 2
        assert final.counts.cached == (1 if per_caller else 2)
        # The worker wrote bob's computed item under bob's scope: his repeat is all cached.
        assert bob.submit(np.concatenate([x, y]), "digits").wait(timeout_s=60).counts.cached == 2


def _kserve_stats(channel: grpc.Channel, token: str) -> int:
    stub = kpb_grpc.GRPCInferenceServiceStub(channel)
    answer = stub.ModelStatistics(
        kpb.ModelStatisticsRequest(name="digits"), metadata=[("authorization", f"Bearer {token}")], timeout=10
    )
    return sum(s.inference_stats.success.count for s in answer.model_stats)


def test_kserve_statistics_are_per_caller_when_the_cache_is(tenant_api: tuple[ApiThread, bool]) -> None:
    api, per_caller = tenant_api
    with grpc.insecure_channel(api.target) as channel:
        stub = kpb_grpc.GRPCInferenceServiceStub(channel)
        alice_before, bob_before = _kserve_stats(channel, ALICE), _kserve_stats(channel, BOB)
        spec = kpb.ModelInferRequest.InferInputTensor(name="image", datatype="FP32", shape=[1, 1, 28, 28])
        infer = kpb.ModelInferRequest(model_name="digits", inputs=[spec])
        infer.raw_input_contents.append(image(600 + per_caller).tobytes())
        stub.ModelInfer(infer, metadata=[("authorization", f"Bearer {ALICE}")], timeout=30)
        assert _kserve_stats(channel, ALICE) == alice_before + 1
        assert _kserve_stats(channel, BOB) == bob_before + (0 if per_caller else 1)
