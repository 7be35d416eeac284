"""Security against real servers: bearer-token auth, job scoping, TLS and
mutual TLS on the gRPC port, Redis with a password and over TLS, Memcached over TLS.

Certificates are made at test time (tests/servers.py TlsFiles). The auth and gRPC
TLS servers share the session's Redis, Memcached and worker; the Redis and
Memcached TLS stack has servers and a worker of its own.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import redis
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from pymemcache.client.base import Client as MemcacheClient

from inferpool.client import Client
from inferpool.names import bulk_queue_name, queue_name
from tests.servers import (
    ApiThread,
    MemcachedServer,
    RedisServer,
    SecureRedisServer,
    TlsFiles,
    TlsMemcachedServer,
    Worker,
    stack_settings,
)
from tests.unit.test_security import ALICE, BOB, WRONG

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return TlsFiles(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def tokens_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("auth") / "tokens"
    path.write_text(f"# test tokens\nalice:{ALICE}\n\n  bob : {BOB}  # trailing comment\n")
    return path


@pytest.fixture(scope="module")
def auth_api(
    redis_server: RedisServer, memcached_server: MemcachedServer, worker: Worker, tokens_file: Path
) -> Iterator[ApiThread]:
    server = ApiThread(stack_settings(redis_server, memcached_server, auth_tokens_file=str(tokens_file)))
    yield server
    server.stop()


def image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random((1, 1, 28, 28), dtype=np.float32)


def code_of(call: Callable[[], object]) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    code: grpc.StatusCode = info.value.code()
    return code


def test_without_a_valid_token_nothing_runs_or_queues(
    auth_api: ApiThread, worker: Worker, redis_client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    before = worker.stats()
    published = auth_api.call(lambda: auth_api.server.publisher.messages)
    requests = auth_api.call(lambda: auth_api.server.plane.counters.requests)
    x = image(101)
    for token in (None, WRONG, "x"):
        with Client(auth_api.target, token=token) as client:
            with pytest.raises(grpc.RpcError) as info:
                client.classify(x, "digits", timeout_s=5)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert ("missing credentials" if token is None else "invalid bearer token") in (
                info.value.details() or ""
            )
            # A streamed upload is refused before the server reads it: no job, no chunk.
            with pytest.raises(grpc.RpcError) as info:
                client.submit(np.repeat(x, 3, axis=0), "digits", timeout_s=5)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError) as info:
                client.job("0" * 32).status()
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError) as info:  # a server stream
                client.job("0" * 32).wait(timeout_s=5)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            # Health stays open for probes and load balancers.
            assert client.health() == "SERVING"
            assert client.health("inferpool.v1.InferenceService") == "SERVING"
    with grpc.insecure_channel(auth_api.target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        # Reflection is not exempt (see api/auth.py).
        with pytest.raises(grpc.RpcError) as info:
            list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert redis_client.llen(queue_name("digits")) == 0
    assert redis_client.llen(bulk_queue_name("digits")) == 0
    assert auth_api.call(lambda: auth_api.server.publisher.messages) == published
    assert auth_api.call(lambda: auth_api.server.plane.counters.requests) == requests
    after = worker.stats()
    assert (after["batches"], after["items_computed"]) == (before["batches"], before["items_computed"])
    # Neither the presented values nor the configured tokens reach the logs.
    for secret in (ALICE, BOB, WRONG):
        assert secret not in caplog.text


def test_the_right_token_works_and_reflection_with_it(auth_api: ApiThread, worker: Worker) -> None:
    before = worker.stats()["items_computed"]
    with Client(auth_api.target, token=ALICE) as client:
        r = client.classify(image(102), "digits", timeout_s=10)
        assert len(r.classes) == 1 and not r.cached
        assert client.classify(image(102), "digits", timeout_s=10).cached
    assert worker.stats()["items_computed"] == before + 1
    with grpc.insecure_channel(auth_api.target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        reply = list(
            stub.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                metadata=[("authorization", f"Bearer {BOB}")],
            )
        )
        names = {s.name for s in reply[0].list_services_response.service}
        assert "inferpool.v1.InferenceService" in names


async def _async_classify(target: str, token: str) -> bool:
    from inferpool.client import AsyncClient

    async with AsyncClient(target, token=token) as client:
        r = await client.classify(image(103), "digits", timeout_s=10)
        return len(r.classes) == 1


def test_async_client_sends_the_token(auth_api: ApiThread) -> None:
    import asyncio

    assert asyncio.run(_async_classify(auth_api.target, BOB))


def test_jobs_are_scoped_to_the_token(
    auth_api: ApiThread, api: ApiThread, heldout: tuple[np.ndarray, np.ndarray]
) -> None:
    x = heldout[0][:3]
    with Client(auth_api.target, token=ALICE) as alice, Client(auth_api.target, token=BOB) as bob:
        job = alice.submit(x, "digits", idempotency_key="scoped")
        final = job.wait(timeout_s=30)
        assert final.counts.done == 3
        for call in (
            lambda: bob.job(job.id).status(),
            lambda: bob.job(job.id).cancel(),
            lambda: bob.job(job.id).wait(timeout_s=5),
            lambda: list(bob.job(job.id).results()),
        ):
            with pytest.raises(grpc.RpcError) as info:
                call()
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
            assert job.id in (info.value.details() or "")
        # The same idempotency key under another name is another job.
        assert bob.submit(x, "digits", idempotency_key="scoped").id != job.id
        assert alice.submit(x, "digits", idempotency_key="scoped").id == job.id
        assert alice.job(job.id).status().counts.done == 3
        assert len(list(alice.job(job.id).results())) == 3
        # A job made without auth (owner "") is no one's here, and the reverse.
        with Client(api.target) as anonymous:
            open_job = anonymous.submit(x, "digits")
            assert code_of(lambda: alice.job(open_job.id).status()) == grpc.StatusCode.NOT_FOUND
            assert code_of(lambda: anonymous.job(job.id).status()) == grpc.StatusCode.NOT_FOUND
            anonymous.job(open_job.id).wait(timeout_s=30)


def test_tls_port(redis_server: RedisServer, memcached_server: MemcachedServer, tls: TlsFiles) -> None:
    settings = stack_settings(
        redis_server, memcached_server, tls_cert_file=str(tls.cert), tls_key_file=str(tls.key)
    )
    api = ApiThread(settings)
    try:
        with Client(api.target, root_certificates=tls.ca.read_bytes()) as client:
            assert client.health() == "SERVING"
            assert client.classify(image(104), "digits", timeout_s=10).classes
        with Client(api.target) as plain:  # plain text to a TLS port: no connection
            assert code_of(lambda: plain.health(timeout_s=2)) == grpc.StatusCode.UNAVAILABLE
        with Client(api.target, tls=True) as untrusted:  # system roots do not know our CA
            assert code_of(lambda: untrusted.health(timeout_s=2)) == grpc.StatusCode.UNAVAILABLE
    finally:
        api.stop()


def test_mutual_tls_requires_a_client_certificate(
    redis_server: RedisServer, memcached_server: MemcachedServer, tls: TlsFiles, tokens_file: Path
) -> None:
    settings = stack_settings(
        redis_server,
        memcached_server,
        tls_cert_file=str(tls.cert),
        tls_key_file=str(tls.key),
        tls_client_ca_file=str(tls.ca),
        auth_tokens_file=str(tokens_file),  # and tokens on top: both must pass
    )
    api = ApiThread(settings)
    ca = tls.ca.read_bytes()
    try:
        with Client(api.target, root_certificates=ca, token=ALICE) as no_cert:
            assert code_of(lambda: no_cert.health(timeout_s=2)) == grpc.StatusCode.UNAVAILABLE
        key, chain = tls.client_key.read_bytes(), tls.client_cert.read_bytes()
        with Client(api.target, root_certificates=ca, private_key=key, certificate_chain=chain) as no_token:
            assert no_token.health() == "SERVING"
            assert code_of(lambda: no_token.classify(image(105), "digits")) == grpc.StatusCode.UNAUTHENTICATED
        with Client(
            api.target, root_certificates=ca, token=ALICE, private_key=key, certificate_chain=chain
        ) as client:
            assert client.classify(image(105), "digits", timeout_s=10).classes
    finally:
        api.stop()


def test_redis_password_stack(logdir: Path) -> None:
    """`redis://:password@host`: the API's Redis client (health, replies, jobs) and its
    Celery publisher both authenticate. (The worker's side, the same kombu and redis-py
    code, runs in the TLS stack below, which has a password too.)"""
    redis_server = SecureRedisServer(logdir, password="s3cret-redis-pass")
    try:
        with pytest.raises(redis.AuthenticationError):  # it does require the password
            redis.Redis(port=redis_server.port).ping()
        api = ApiThread(stack_settings(redis_server, None))
        r = redis.Redis.from_url(redis_server.url)
        try:
            with Client(api.target) as client:
                assert client.health() == "SERVING"
                # No worker here: the miss is published and waits, until the deadline.
                assert code_of(lambda: client.classify(image(106), "digits", timeout_s=1.0)) == (
                    grpc.StatusCode.DEADLINE_EXCEEDED
                )
            assert r.llen(queue_name("digits")) == 1
        finally:
            r.close()
            api.stop()
    finally:
        redis_server.stop()


def test_redis_and_memcached_over_tls(logdir: Path, tls: TlsFiles) -> None:
    redis_server = SecureRedisServer(logdir, password="tls-redis-pass", tls=tls)
    memcached = TlsMemcachedServer(logdir, tls)
    try:
        # Both are TLS only: a plain-text client gets nowhere.
        with pytest.raises(redis.ConnectionError):
            redis.Redis(port=redis_server.port, password="tls-redis-pass", socket_timeout=2).ping()
        with pytest.raises(Exception):  # noqa: B017 (a reset or a timeout, either is right)
            MemcacheClient(("127.0.0.1", memcached.port), connect_timeout=2, timeout=2).get("k")
        settings = stack_settings(redis_server, memcached, memcached_tls_ca_file=str(tls.ca))
        assert settings.redis_url.startswith("rediss://")
        worker = Worker(settings, logdir)
        api = ApiThread(settings)
        try:
            with Client(api.target) as client:
                assert client.health() == "SERVING"
                # A miss through Celery on Redis-over-TLS, then a hit the worker wrote to
                # Memcached-over-TLS and the API read from it.
                assert not client.classify(image(107), "digits", timeout_s=10).cached
                assert client.classify(image(107), "digits", timeout_s=10).cached
            stats = worker.stats()
            assert stats["items_computed"] == 1, stats
            assert api.call(lambda: api.server.cache.errors) == 0
        finally:
            api.stop()
            worker.stop()
    finally:
        memcached.stop()
        redis_server.stop()


def test_worker_obeys_only_the_allowed_control_commands(
    redis_server: RedisServer, memcached_server: MemcachedServer, logdir: Path
) -> None:
    """Anyone who can publish on the broker can broadcast Celery's remote control: by
    default a worker ignores shutdown and consumer changes, and still answers inspection
    and the task-event switch Flower needs."""
    w = Worker(stack_settings(redis_server, memcached_server), logdir)
    try:
        control = w.control.control
        refused = [
            control.shutdown(destination=[w.name], reply=True, timeout=2.0),
            control.cancel_consumer("inferpool.digits", destination=[w.name], reply=True, timeout=2.0),
            control.pool_restart(destination=[w.name], reply=True, timeout=2.0),
        ]
        for replies in refused:
            # Celery answers a command it does not know with an error, and does nothing.
            assert [set(r) for r in replies] == [{w.name}]
            assert "error" in replies[0][w.name], replies
        # Still alive, still inspectable, still consuming its queue.
        assert control.ping(destination=[w.name], timeout=2.0)
        queues = control.inspect(destination=[w.name], timeout=2.0).active_queues()
        assert "inferpool.digits" in {q["name"] for q in queues[w.name]}
        events = control.enable_events(destination=[w.name], reply=True, timeout=2.0)
        assert events and w.name in events[0]
        assert w.popen.poll() is None
    finally:
        w.stop()
