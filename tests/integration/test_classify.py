"""End to end through real servers: gRPC -> Memcached -> Celery on Redis -> batching worker."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest
import redis

from bench.stack import free_port
from inferpool import tensor
from inferpool.client import Client
from inferpool.codec import SERIALIZER
from inferpool.names import DEAD_LETTER_MAX, dead_letter_key, queue_name, task_name
from inferpool.settings import Settings
from inferpool.v1 import envelope_pb2, inference_pb2, tensor_pb2
from tests.servers import ROOT, ApiThread, MemcachedServer, RedisServer, Worker, stack_settings, wait_until

pytestmark = pytest.mark.timeout(120)


def published(api: ApiThread) -> int:
    return int(api.call(lambda: api.server.publisher.messages))


def unique_inputs(n: int, seed: int) -> np.ndarray:
    # Fresh random images: never seen by the cache, so every one is a miss.
    return np.random.default_rng(seed).random((n, 1, 1, 28, 28), dtype=np.float32)


def test_heldout_digits_accuracy(client: Client, heldout: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = heldout
    assert len(x) >= 200
    futures = [client.classify_future(img[None], "digits", top_k=3, timeout_s=30) for img in x]
    responses = [f.result() for f in futures]
    predicted = np.array([r.classes[0].index for r in responses])
    accuracy = float((predicted == y).mean())
    assert accuracy >= 0.95, accuracy
    first = responses[0]
    assert first.model == "digits" and first.version == 1
    assert len(first.classes) == 3
    assert first.classes[0].label == str(first.classes[0].index)
    scores = [c.score for c in first.classes]
    assert scores == sorted(scores, reverse=True) and 0 < scores[0] <= 1


def test_repeat_is_cached_and_publishes_nothing(client: Client, api: ApiThread, worker: Worker) -> None:
    img = unique_inputs(1, seed=1)[0]
    first = client.classify(img, "digits", top_k=2, request_id="r-1")
    assert not first.cached
    assert first.request_id == "r-1"
    assert first.timings.batch_size >= 1
    before_published, before_stats = published(api), worker.stats()
    second = client.classify(img, "digits", top_k=2)
    assert second.cached
    assert [c.index for c in second.classes] == [c.index for c in first.classes]
    assert second.classes[0].score == pytest.approx(first.classes[0].score)
    assert published(api) == before_published
    assert worker.stats()["items_computed"] == before_stats["items_computed"]


def test_concurrent_misses_are_batched(client: Client, worker: Worker) -> None:
    before = worker.stats()
    images = unique_inputs(64, seed=2)
    barrier = threading.Barrier(64)
    results: list[inference_pb2.ClassifyResponse] = [None] * 64  # type: ignore[list-item]

    def call(i: int) -> None:
        barrier.wait()
        results[i] = client.classify(images[i], "digits", timeout_s=30)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = worker.stats()
    assert all(r is not None and not r.cached for r in results)
    model_calls = after["batches"] - before["batches"]
    assert after["items_computed"] - before["items_computed"] == 64
    assert model_calls < 64, f"64 requests took {model_calls} model calls"
    sizes = sorted({r.timings.batch_size for r in results})
    print(f"64 concurrent misses: {model_calls} model calls, batch sizes seen {sizes}")
    assert max(sizes) > 1


def _bad_requests() -> list[tuple[str, inference_pb2.ClassifyRequest, grpc.StatusCode, str]]:
    good = tensor.to_proto(np.zeros((1, 1, 28, 28), np.float32))
    nan = np.zeros((1, 1, 28, 28), np.float32)
    nan[0, 0, 3, 3] = np.nan
    inf = np.zeros((1, 1, 28, 28), np.float32)
    inf[0, 0, 0, 0] = np.inf

    def req(**kw: object) -> inference_pb2.ClassifyRequest:
        kw.setdefault("model", "digits")
        kw.setdefault("input", good)
        return inference_pb2.ClassifyRequest(**kw)  # type: ignore[arg-type]

    invalid = grpc.StatusCode.INVALID_ARGUMENT
    return [
        ("wrong shape", req(input=tensor.to_proto(np.zeros((1, 28, 28), np.float32))), invalid, "shape"),
        ("batch of 2", req(input=tensor.to_proto(np.zeros((2, 1, 28, 28), np.float32))), invalid, "shape"),
        ("wrong dtype", req(input=tensor.to_proto(np.zeros((1, 1, 28, 28), np.float64))), invalid, "float32"),
        (
            "short bytes",
            req(input=tensor_pb2.Tensor(dtype=good.dtype, shape=good.shape, data=good.data[:-4])),
            invalid,
            "bytes",
        ),
        ("NaN", req(input=tensor.to_proto(nan)), invalid, "NaN"),
        ("Inf", req(input=tensor.to_proto(inf)), invalid, "infinite"),
        ("no input", inference_pb2.ClassifyRequest(model="digits"), invalid, "input"),
        ("no model", req(model=""), invalid, "model"),
        ("bad model name", req(model="a b/c"), invalid, "model name"),
        ("unknown model", req(model="nope"), grpc.StatusCode.NOT_FOUND, "nope"),
        ("unknown version", req(version=99), grpc.StatusCode.NOT_FOUND, "version 99"),
    ]


@pytest.mark.parametrize(
    "name,request_,code,needle", _bad_requests(), ids=[case[0] for case in _bad_requests()]
)
def test_bad_input_is_rejected_before_queueing(
    client: Client,
    api: ApiThread,
    redis_client: redis.Redis,
    name: str,
    request_: inference_pb2.ClassifyRequest,
    code: grpc.StatusCode,
    needle: str,
) -> None:
    before = published(api)
    with pytest.raises(grpc.RpcError) as info:
        client.stub.Classify(request_, timeout=5)
    assert info.value.code() == code, info.value.details()
    assert needle.lower() in (info.value.details() or "").lower()
    assert published(api) == before
    assert redis_client.llen(queue_name("digits")) == 0


def test_health_serving_and_reflection(client: Client) -> None:
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    assert client.health() == "SERVING"
    assert client.health("inferpool.v1.InferenceService") == "SERVING"
    services = ProtoReflectionDescriptorDatabase(client.channel).get_services()
    assert "inferpool.v1.InferenceService" in services
    assert "grpc.health.v1.Health" in services


def test_poison_message_is_dead_lettered_and_batch_mates_answered(
    client: Client, worker: Worker, redis_client: redis.Redis
) -> None:
    dead = dead_letter_key(queue_name("digits"))
    before = worker.stats()["messages_poison"]
    dead_before = redis_client.llen(dead)
    rng = np.random.default_rng(77)
    futures = [
        client.classify_future(rng.random((1, 1, 28, 28), dtype=np.float32), "digits") for _ in range(8)
    ]
    # Undecodable bytes, and a well-formed envelope of an unknown version, among real traffic.
    for body in (
        b"\x00\x01not an envelope",
        envelope_pb2.Envelope(envelope_version=99, model="digits").SerializeToString(),
    ):
        worker.control.send_task(
            task_name("digits"), args=(body,), queue=queue_name("digits"), serializer=SERIALIZER, argsrepr=""
        )
    futures += [
        client.classify_future(rng.random((1, 1, 28, 28), dtype=np.float32), "digits") for _ in range(8)
    ]
    assert all(f.result().classes for f in futures)
    wait_until(lambda: worker.stats()["messages_poison"] == before + 2, 10, "both poison messages counted")
    assert redis_client.llen(dead) == min(dead_before + 2, DEAD_LETTER_MAX)
    assert client.classify(rng.random((1, 1, 28, 28), dtype=np.float32), "digits").classes  # still serving


def _expected_scores(image: np.ndarray) -> np.ndarray:
    """The digits model's class probabilities for one input, computed here with torch."""
    import torch  # tests only: the API side never needs it

    module = torch.jit.load(str(ROOT / "models" / "digits" / "1" / "model.pt")).eval()
    with torch.inference_mode():
        return torch.softmax(module(torch.from_numpy(image)).float(), dim=1)[0].numpy()


def _followers_outlive_a_short_leader(settings: Settings, logdir: Path, followers: int = 20) -> None:
    """One caller with a short deadline leads a miss while no worker runs; `followers`
    identical callers with long deadlines follow it. When the leader's deadline passes,
    exactly one follower must take its flight over (one more item published, not one
    per follower), and once a worker runs every follower gets the model's answer."""
    api = ApiThread(settings)
    worker: Worker | None = None
    queue = redis.Redis.from_url(settings.redis_url)
    try:
        publisher, counters = api.server.publisher, api.server.plane.counters
        image = np.random.default_rng(2828).random((1, 1, 28, 28), dtype=np.float32)
        with Client(api.target) as client:
            leader = client.classify_future(image, "digits", timeout_s=2.0)
            wait_until(lambda: api.call(lambda: publisher.items) == 1, 10, "the leader's publish")
            waiting = [client.classify_future(image, "digits", timeout_s=120) for _ in range(followers)]
            wait_until(
                lambda: api.call(lambda: counters.coalesced) == followers, 10, "followers behind the leader"
            )
            with pytest.raises(grpc.RpcError) as info:
                leader.result()
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            # The follower that took over published the input once more, and nobody else did.
            wait_until(lambda: api.call(lambda: publisher.items) >= 2, 10, "a follower to take over")
            assert api.call(lambda: (publisher.items, publisher.messages)) == (2, 2)
            assert queue.llen(queue_name("digits")) == 2
            assert not any(f.done() for f in waiting)  # none failed with its leader
            worker = Worker(settings, logdir)
            responses = [f.result() for f in waiting]
        expected = _expected_scores(image)
        for r in responses:
            assert r.classes[0].index == int(expected.argmax())
            assert r.classes[0].score == pytest.approx(float(expected.max()), abs=1e-4)
        assert api.call(lambda: publisher.items) == 2
        assert worker.stats()["items_computed"] == 1  # the leader's item expired unseen
    finally:
        queue.close()
        api.stop()
        if worker is not None:
            worker.stop()


@pytest.mark.timeout(240)
def test_followers_outlive_a_short_leader(
    fresh_redis: RedisServer, fresh_memcached: MemcachedServer, logdir: Path
) -> None:
    _followers_outlive_a_short_leader(stack_settings(fresh_redis, fresh_memcached), logdir)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("memcached", ["off", "down"])
def test_single_flight_without_memcached(fresh_redis: RedisServer, logdir: Path, memcached: str) -> None:
    if memcached == "off":
        settings = stack_settings(fresh_redis, None)
    else:
        # Configured, but nothing listens there: every lookup fails, the cache counts as down.
        settings = dataclasses.replace(
            stack_settings(fresh_redis, None), memcached=f"127.0.0.1:{free_port()}"
        )
    _followers_outlive_a_short_leader(settings, logdir)


def test_a_deadline_centuries_away_is_served(api: ApiThread, worker: Worker) -> None:
    """gRPC lets a client ask for a deadline ~11,000 years away (a Python client cannot
    send one, others can): the miss is still published and answered, not INTERNAL."""
    image = np.random.default_rng(2024).random((1, 1, 28, 28), dtype=np.float32)
    request = inference_pb2.ClassifyRequest(model="digits", input=tensor.to_proto(image))
    future = asyncio.run_coroutine_threadsafe(api.server.plane.classify(request, 3e11), api.loop)
    response = future.result(30)
    assert not response.cached and len(response.classes) == 1
