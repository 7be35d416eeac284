"""Admission control and single-flight: overload is refused fast, duplicates computed once."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import shutil
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
import numpy as np
import pytest
import redis
import redis.asyncio as aioredis
import torch
from kombu.serialization import loads

from bench.proxies import ProxyProcess
from bench.scrape import scrape, total
from inferpool import codec
from inferpool.api.publisher import FlightLocks, FlightTaken, Publisher
from inferpool.broker import make_celery
from inferpool.client import AsyncClient, Client
from inferpool.names import queue_name
from inferpool.repository import Repository
from inferpool.v1 import envelope_pb2, jobs_pb2
from tests.servers import (
    ROOT,
    ApiProcess,
    ApiThread,
    MemcachedServer,
    RedisServer,
    Worker,
    stack_settings,
    wait_until,
    write_model,
)

pytestmark = pytest.mark.timeout(120)


def test_identical_concurrent_misses_are_computed_once(fresh_redis: RedisServer, logdir: Path) -> None:
    # No cache (so no request can be a hit) and no worker until all 100 are waiting:
    # without single-flight each would be computed.
    settings = stack_settings(fresh_redis, None)
    api = ApiThread(settings)
    worker: Worker | None = None
    try:
        counters = api.server.plane.counters
        with Client(api.target) as client:
            image = np.random.default_rng(99).random((1, 1, 28, 28), dtype=np.float32)
            futures = [client.classify_future(image, "digits", timeout_s=60) for _ in range(100)]
            wait_until(lambda: api.call(lambda: counters.coalesced) == 99, 10, "99 followers waiting")
            worker = Worker(settings, logdir)
            responses = [f.result() for f in futures]
        assert len({(r.classes[0].index, round(r.classes[0].score, 6)) for r in responses}) == 1
        assert worker.stats()["items_computed"] == 1
    finally:
        api.stop()
        if worker is not None:
            worker.stop()


def test_identical_misses_on_two_api_replicas_are_computed_once(
    fresh_redis: RedisServer, logdir: Path, memcached_server: MemcachedServer
) -> None:
    # Two API processes' worth of servers on one Redis and one Memcached; no worker until
    # every request waits, so only single-flight (in-process and across replicas) can
    # keep the 100 requests to one computation. Cross-replica single-flight needs the cache
    # (the leader's answer reaches the other replica through it), so Memcached gets a
    # timeout that a loaded CI machine cannot outlast: a slow lookup is not this test's subject.
    settings = stack_settings(fresh_redis, memcached_server, cache_timeout_ms=2000)
    replicas = [ApiThread(settings), ApiThread(settings)]
    worker: Worker | None = None
    try:
        clients = [Client(api.target) for api in replicas]
        image = np.random.default_rng(1234).random((1, 1, 28, 28), dtype=np.float32)
        futures = [clients[i % 2].classify_future(image, "digits", timeout_s=60) for i in range(100)]

        def counts() -> tuple[int, int]:
            local = sum(api.call(lambda a=api: a.server.plane.counters.coalesced) for api in replicas)
            remote = sum(api.call(lambda a=api: a.server.plane.counters.coalesced_remote) for api in replicas)
            return local, remote

        # Each replica: one leader and 49 local followers; one of the two leaders follows the other.
        wait_until(lambda: counts() == (98, 1), 10, "98 local and 1 cross-replica follower")
        worker = Worker(settings, logdir)
        responses = [f.result() for f in futures]
        assert len({(r.classes[0].index, round(r.classes[0].score, 6)) for r in responses}) == 1
        assert worker.stats()["items_computed"] == 1
        for c in clients:
            c.close()
    finally:
        for api in replicas:
            api.stop()
        if worker is not None:
            worker.stop()


def test_a_miss_whose_flight_lock_another_replica_holds_is_left_out_of_its_envelope(
    fresh_redis: RedisServer,
) -> None:
    # The publisher takes each miss's cross-replica lock in the round trip that pushes
    # its envelope: a miss whose lock is held elsewhere must not be published (its caller
    # waits for the other replica), and the misses it shared an envelope with must be.
    cfg = Repository.load(ROOT / "models").resolve("digits", 0)
    settings = stack_settings(fresh_redis, None)

    async def scenario() -> None:
        client = aioredis.Redis.from_url(fresh_redis.url)
        try:
            ours, theirs = FlightLocks(client, "ours"), FlightLocks(client, "theirs")
            await client.set("lock-b", theirs.owner, px=60_000)
            publisher = Publisher(make_celery(settings), client, max_inflight=1, flights=ours)
            deadline_ns = time.time_ns() + 30 * 10**9
            names = "abc"
            # Enqueued in one loop iteration: one envelope of three.
            futures = [
                publisher.enqueue(
                    cfg,
                    envelope_pb2.EnvelopeItem(request_id=n, deadline_unix_ns=deadline_ns),
                    flight=f"lock-{n}",
                )
                for n in names
            ]
            outcomes = await asyncio.gather(*futures, return_exceptions=True)
            assert isinstance(outcomes[1], FlightTaken)
            assert not isinstance(outcomes[0], BaseException) and outcomes[0] is outcomes[2]
            messages = await client.lrange(queue_name(cfg.name), 0, -1)
            assert [[i.request_id for i in _envelope(m).items] for m in messages] == [["a", "c"]]
            assert publisher.messages == 1 and publisher.items == 2
            assert await client.mget("lock-a", "lock-b", "lock-c") == [b"ours", b"theirs", b"ours"]
            ttl_ms = await client.pttl("lock-a")
            assert 25_000 < ttl_ms <= 30_000  # held no longer than the caller waits
            # Releasing frees only what this replica holds.
            for n in names:
                ours.release(f"lock-{n}")
            await asyncio.gather(*ours._tasks)
            assert await client.mget("lock-a", "lock-b", "lock-c") == [None, b"theirs", None]
        finally:
            await client.aclose()

    asyncio.run(scenario())


def _envelope(message: bytes) -> envelope_pb2.Envelope:
    wrapper = json.loads(message)
    args, _, _ = loads(
        base64.b64decode(wrapper["body"]), wrapper["content-type"], wrapper["content-encoding"]
    )
    return codec.decode(args[0])


def test_backlog_past_max_queue_size_is_refused_at_once(fresh_redis: RedisServer, tmp_path: Path) -> None:
    # A repository whose digits model queues at most 8 requests per API process.
    repo = tmp_path / "models"
    shutil.copytree(ROOT / "models" / "digits" / "1", repo / "digits" / "1")
    config = json.loads((repo / "digits" / "1" / "config.json").read_text())
    (repo / "digits" / "1" / "config.json").write_text(json.dumps({**config, "max_queue_size": 8}))
    # No worker: whatever is accepted waits out its deadline.
    api = ApiThread(dataclasses.replace(stack_settings(fresh_redis, None), model_repository=repo))
    try:
        with Client(api.target) as client:
            rng = np.random.default_rng(5)
            waiting = [
                client.classify_future(rng.random((1, 1, 28, 28), dtype=np.float32), "digits", timeout_s=3)
                for _ in range(8)
            ]
            wait_until(
                lambda: api.call(lambda: api.server.admission.rejected) == 0 and _waiting(api) == 8,
                5,
                "8 waiting",
            )
            queue = redis.Redis.from_url(fresh_redis.url)
            before = (api.call(lambda: api.server.publisher.items), queue.llen(queue_name("digits")))
            assert before[0] >= 1
            with pytest.raises(grpc.RpcError) as info:
                client.classify(rng.random((1, 1, 28, 28), dtype=np.float32), "digits", timeout_s=3)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "max_queue_size 8" in info.value.details()
            # Refused before anything was queued for it: not published, not in Redis.
            assert api.call(lambda: api.server.admission.rejected) == 1
            assert (api.call(lambda: api.server.publisher.items), queue.llen(queue_name("digits"))) == before
            queue.close()
            for f in waiting:
                with pytest.raises(grpc.RpcError) as late:
                    f.result()
                assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            # The backlog drained with its deadlines: requests are admitted again.
            # (The server settles each a moment after the client's own deadline fires.)
            wait_until(lambda: _waiting(api) == 0, 2, "the backlog to drain")
            with pytest.raises(grpc.RpcError) as again:
                client.classify(rng.random((1, 1, 28, 28), dtype=np.float32), "digits", timeout_s=0.2)
            assert again.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        api.stop()


def _waiting(api: ApiThread) -> int:
    return int(api.call(lambda: api.server.admission.waiting))


def test_calls_past_the_concurrent_rpc_bound_are_refused_by_grpc(fresh_redis: RedisServer) -> None:
    # No worker: four calls wait out their deadlines holding the server's four RPC slots.
    # A fifth is refused by gRPC before any handler runs: nothing published for it.
    api = ApiThread(stack_settings(fresh_redis, None, max_concurrent_rpcs=4))
    try:
        with Client(api.target) as client:
            rng = np.random.default_rng(44)
            waiting = [
                client.classify_future(rng.random((1, 1, 28, 28), dtype=np.float32), "digits", timeout_s=5)
                for _ in range(4)
            ]
            wait_until(lambda: _waiting(api) == 4, 5, "4 waiting")
            before = api.call(lambda: (api.server.publisher.items, api.server.plane.counters.requests))
            with pytest.raises(grpc.RpcError) as info:
                client.classify(rng.random((1, 1, 28, 28), dtype=np.float32), "digits", timeout_s=5)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "Concurrent RPC limit" in (info.value.details() or "")
            assert (
                api.call(lambda: (api.server.publisher.items, api.server.plane.counters.requests)) == before
            )
            for f in waiting:
                f.cancel()
    finally:
        api.stop()


def test_misses_are_shed_while_the_event_loop_runs_behind(
    redis_server: RedisServer, memcached_server: MemcachedServer, worker: Worker
) -> None:
    # Something holds the API's loop 40 ms at a time (as a burst would): every wake of the
    # lag probe is late, so new inference calls are refused at the door (no lookup, no
    # publish), while health checks are still answered. Once the loop is free, calls
    # are let in and answered again.
    settings = stack_settings(redis_server, memcached_server, shed_loop_lag_ms=20)
    api = ApiThread(settings)
    hog_on = threading.Event()

    def hog() -> None:
        if hog_on.is_set():
            time.sleep(0.04)
            api.loop.call_later(0.001, hog)

    try:
        with Client(api.target) as client:
            image = np.random.default_rng(4040).random((1, 1, 28, 28), dtype=np.float32)
            hog_on.set()
            api.loop.call_soon_threadsafe(hog)
            wait_until(lambda: api.call(lambda: api.server.loop_lag.lag_s) > 0.02, 10, "the loop to lag")
            before = api.call(lambda: (api.server.publisher.items, api.server.plane.counters.requests))
            with pytest.raises(grpc.RpcError) as info:
                client.classify(image, "digits", timeout_s=10)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "event loop" in (info.value.details() or "")
            assert (
                api.call(lambda: (api.server.publisher.items, api.server.plane.counters.requests)) == before
            )
            assert api.call(lambda: api.server.admission.shed_on_lag) >= 1
            assert client.health() == "SERVING"
            hog_on.clear()
            wait_until(lambda: api.call(lambda: api.server.loop_lag.lag_s) < 0.02, 10, "the loop to catch up")
            response = client.classify(image, "digits", timeout_s=10)
            assert response.classes and not response.cached
            assert api.call(lambda: api.server.publisher.items) == before[0] + 1
    finally:
        hog_on.clear()
        api.stop()


class PerItem(torch.nn.Module):
    """Real work that grows with the batch (a few ms a row on one thread): a batch of
    as many rows as callers wait takes longer than their 100 ms deadline."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(384, 384) / 20)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.flatten(1).repeat(16, 96)
        for _ in range(40):
            y = torch.tanh(y @ self.w)
        return torch.softmax(y[: x.shape[0], :4], dim=1)


async def _closed_loop(
    target: str, callers: int, seconds: float, deadline_s: float
) -> list[tuple[float, str]]:
    """`callers` each calling Classify back to back (a new input each time), pausing 20 ms
    after a refusal as a client should; (finish time, status code name) per call."""
    outcomes: list[tuple[float, str]] = []
    rng = np.random.default_rng(2121)
    async with AsyncClient(target, max_attempts=1) as client:
        end = time.monotonic() + seconds

        async def caller() -> None:
            while time.monotonic() < end:
                x = rng.random((1, 4), dtype=np.float32)
                try:
                    await client.classify(x, "peritem", timeout_s=deadline_s)
                    code = "OK"
                except grpc.aio.AioRpcError as exc:
                    code = exc.code().name
                outcomes.append((time.monotonic(), code))
                if code == "RESOURCE_EXHAUSTED":
                    await asyncio.sleep(0.02)

        await asyncio.gather(*(caller() for _ in range(callers)))
    return outcomes


def test_sustained_overload_with_short_deadlines_refuses_instead_of_lapsing(
    fresh_redis: RedisServer, tmp_path: Path, logdir: Path
) -> None:
    # 48 callers with 100 ms deadlines against a model whose batch of 48 takes about as
    # long as the deadline: the backlog never reaches one batch (64), so the estimate
    # from the answer rate never refuses, and without a limit learned from late answers
    # most accepted calls lapsed. With it, admission settles on what the worker answers
    # in time: after the first second, few accepted calls lapse and most calls that are
    # not refused are answered.
    torch.manual_seed(0)
    config = {
        "input": {"name": "x", "dtype": "float32", "shape": [4]},
        "output": {"name": "p", "kind": "probabilities"},
        "labels": ["a", "b", "c", "d"],
        "max_batch_size": 64,
        "max_delay_ms": 2,
    }
    repo = write_model(tmp_path, "peritem", PerItem(), config)
    settings = dataclasses.replace(stack_settings(fresh_redis, None), model_repository=repo)
    worker = Worker(settings, logdir, extra_env={"INFERPOOL_TORCH_THREADS": "1"})
    api = ApiProcess(settings, logdir)
    try:
        outcomes = asyncio.run(_closed_loop(api.target, 48, 4.0, 0.1))
    finally:
        api.stop()
        worker.stop()
    start = outcomes[0][0]
    settled = Counter(code for t, code in outcomes if t - start > 1.5)
    answered = settled["OK"] + settled["DEADLINE_EXCEEDED"] + settled["CANCELLED"]
    assert settled["OK"] >= 100, settled
    lapsed = (settled["DEADLINE_EXCEEDED"] + settled["CANCELLED"]) / answered
    assert lapsed <= 0.10, settled
    assert settled["RESOURCE_EXHAUSTED"] > 0, settled  # the excess was refused, not queued


def test_the_proxy_refuses_inference_past_its_in_flight_limit_before_a_replica_sees_it(
    fresh_redis: RedisServer, logdir: Path
) -> None:
    # No worker: two calls wait out their deadlines holding the proxy's two slots. A third
    # Classify is answered RESOURCE_EXHAUSTED by HAProxy itself, at once, and never
    # reaches the replica; calls that are not inference (health, job queries) pass.
    api = ApiProcess(stack_settings(fresh_redis, None), logdir)
    proxy = ProxyProcess("haproxy", [api.target], logdir / "haproxy.log", inflight_limit=2)
    metrics = f"http://127.0.0.1:{api.metrics_port}/metrics"
    try:
        wait_until(lambda: proxy.servers_up().get("api0"), 10, "HAProxy to see the replica up")
        with Client(proxy.target, max_attempts=1) as client:
            rng = np.random.default_rng(48)
            waiting = [
                client.classify_future(rng.random((1, 1, 28, 28), dtype=np.float32), "digits", timeout_s=5)
                for _ in range(2)
            ]
            wait_until(
                lambda: total(scrape(metrics), "inferpool_inflight_requests") == 2, 10, "two in flight"
            )
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as info:
                client.classify(rng.random((1, 1, 28, 28), dtype=np.float32), "digits", timeout_s=5)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "limit of 2 calls in flight" in (info.value.details() or "")
            assert time.monotonic() - started < 0.5
            assert total(scrape(metrics), "inferpool_requests_total", rpc="Classify") == 0
            assert client.health() == "SERVING"
            with pytest.raises(grpc.RpcError) as missing:
                client.jobs.GetJob(jobs_pb2.GetJobRequest(job_id="0" * 32), timeout=5)
            assert missing.value.code() == grpc.StatusCode.NOT_FOUND
            for f in waiting:
                f.cancel()
    finally:
        proxy.stop()
        api.stop()
