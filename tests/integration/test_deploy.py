"""What operators deploy and watch: the compose file, the Kubernetes and KEDA
manifests, the Prometheus rules and Grafana dashboard, and the metrics they read.

Nothing here needs a container engine or a cluster: docker-compose validates and
resolves the compose file offline, the Kubernetes objects are checked against the
API's JSON schemas (kubernetes-validate ships them), and the KEDA ScaledObjects
against a schema of the CRD fields they use.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from prometheus_client import CollectorRegistry
from redis.backoff import NoBackoff
from redis.retry import Retry

from bench.stack import free_port, wait_port
from inferpool.api import metrics as api_metrics
from inferpool.names import bulk_queue_name, queue_name
from tests.servers import ROOT, Proc, RedisServer
from tests.unit.manifests import K8S, ROLE_PASSWORDS


@pytest.fixture
def acl_redis(tmp_path: Path) -> Iterator[int]:
    port = free_port()
    env = {**os.environ, "REDIS_ACL_FILE": str(tmp_path / "users.acl")}
    env.update({f"REDIS_{r.upper()}_PASSWORD": p for r, p in ROLE_PASSWORDS.items()})
    args = [
        "sh",
        str(K8S / "redis-start.sh"),
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--dir",
        str(tmp_path),
    ]
    proc = Proc(args, tmp_path / "redis.log", env=env)
    try:
        proc.ready(lambda: wait_port(port, 10, proc.popen))
        yield port
    finally:
        proc.stop()


def _as(port: int, role: str) -> redis.Redis:
    password = ROLE_PASSWORDS.get(role, "")
    return redis.Redis(port=port, username=role, password=password, socket_timeout=5)


def test_redis_roles_can_do_only_their_part(acl_redis: int) -> None:
    port = acl_redis
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(port=port, socket_timeout=5).ping()  # the default user is off
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(port=port, username="api", password="wrong", socket_timeout=5).ping()
    assert redis.Redis(port=port, username="health", password="x", socket_timeout=5).ping()
    with pytest.raises(redis.exceptions.NoPermissionError):
        redis.Redis(port=port, username="health", password="x", socket_timeout=5).get("inferpool:job:x")
    api = _as(port, "api")
    api.hset("inferpool:job:x", "state", "RUNNING")
    api.rpush("inferpool.digits", b"message")
    for admin in (
        api.flushall,
        lambda: api.config_get("*"),
        lambda: api.keys("*"),
        api.shutdown,
        # Celery's remote control (shutdown, pool_restart, ...) is a broadcast on this channel.
        lambda: api.publish("/0.celery.pidbox", b"{}"),
    ):
        with pytest.raises(redis.exceptions.NoPermissionError):
            admin()
    flower = _as(port, "flower")
    assert flower.llen("inferpool.digits") == 1
    for forbidden in (
        lambda: flower.hgetall("inferpool:job:x"),  # job records and results
        lambda: flower.hgetall("unacked"),  # messages in flight
        lambda: flower.lpop("inferpool.digits"),  # taking work
        lambda: flower.keys("*"),
    ):
        with pytest.raises(redis.exceptions.NoPermissionError):
            forbidden()
    keda = _as(port, "keda")
    assert keda.llen("inferpool.digits") == 1
    for forbidden in (
        lambda: keda.lrange("inferpool.digits", 0, -1),
        lambda: keda.hgetall("inferpool:job:x"),
    ):
        with pytest.raises(redis.exceptions.NoPermissionError):
            forbidden()
    assert _as(port, "worker").hget("inferpool:job:x", "state") == b"RUNNING"


def test_pool_serves_with_a_user_per_role(acl_redis: int, tmp_path: Path, heldout: Any) -> None:
    """The API, a worker and Flower's Celery calls work under the users the deployments give them."""
    from inferpool.broker import make_celery
    from inferpool.client import Client
    from inferpool.settings import Settings
    from tests.servers import ApiThread, Worker

    def settings(role: str) -> Settings:
        url = f"redis://{role}:{ROLE_PASSWORDS[role]}@127.0.0.1:{acl_redis}/0"
        return Settings.from_env(
            {}, redis_url=url, memcached="", model_repository=ROOT / "models", grpc_port=0
        )

    x, y = heldout
    worker = Worker(settings("worker"), tmp_path)
    api = ApiThread(settings("api"))
    try:
        with Client(api.target) as client:
            assert client.classify(x[:1], "digits", timeout_s=10).classes[0].label == str(y[0])
            job = client.submit(x[:40], "digits", top_k=1)
            job.wait(timeout_s=60)
            labels = [r.classes[0].label for r in job.results()]
            assert sum(label == str(t) for label, t in zip(labels, y[:40], strict=True)) >= 38
        # What Flower asks the workers, as the flower user.
        flower = make_celery(Settings.from_env({}, redis_url=settings("flower").redis_url), main="flower")
        try:
            assert worker.name in {name for reply in flower.control.ping(timeout=2.0) for name in reply}
            queues = flower.control.inspect(destination=[worker.name], timeout=2.0).active_queues()
            assert "inferpool.digits" in {q["name"] for q in queues[worker.name]}
        finally:
            flower.close()
    finally:
        api.stop()
        worker.stop()


def test_wait_for_worker_returns_once_one_answers(redis_server: RedisServer, worker: Any) -> None:
    script = str(ROOT / "scripts" / "wait_for_worker.py")
    run = subprocess.run([sys.executable, script, redis_server.url, "60"], capture_output=True, timeout=90)
    assert run.returncode == 0, run.stderr
    # Nothing listening there: it gives up at its bound instead of waiting forever.
    empty = f"redis://127.0.0.1:{free_port()}/0"
    run = subprocess.run([sys.executable, script, empty, "1"], capture_output=True, timeout=30)
    assert run.returncode == 1


def test_queue_depth_counts_what_llen_misses(redis_server: RedisServer) -> None:
    client = redis.Redis.from_url(f"redis://127.0.0.1:{redis_server.port}/5")
    client.flushdb()
    try:
        interactive, bulk = queue_name("digits"), bulk_queue_name("digits")
        client.rpush(interactive, b"a", b"b")
        client.rpush(api_metrics.priority_lists(interactive)[2], b"c")  # priority step 6
        client.rpush(bulk, b"d")
        # Two messages a worker prefetched: kombu keeps them in the unacked hash.
        client.hset("unacked", mapping={"tag-1": "[]", "tag-2": "[]"})
        registry = CollectorRegistry()
        registry.register(api_metrics.QueueDepth(client, [interactive, bulk]))
        assert registry.get_sample_value("inferpool_queue_messages", {"queue": interactive}) == 3
        assert registry.get_sample_value("inferpool_queue_messages", {"queue": bulk}) == 1
        assert registry.get_sample_value("inferpool_broker_unacked_messages") == 2
        assert registry.get_sample_value("inferpool_backlog_messages") == 6
        assert registry.get_sample_value("inferpool_broker_up") == 1
    finally:
        client.flushdb()
        client.close()

    dead = redis.Redis(port=free_port(), socket_connect_timeout=0.2, retry=Retry(NoBackoff(), 0))
    registry = CollectorRegistry()
    registry.register(api_metrics.QueueDepth(dead, [interactive]))
    assert registry.get_sample_value("inferpool_broker_up") == 0
    assert registry.get_sample_value("inferpool_backlog_messages") is None
