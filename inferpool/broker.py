"""The Celery app configuration both sides share (the API publishes, workers consume).

The API builds this app only to publish by task name; it never imports `workers`.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import redis
from celery import Celery
from kombu.transport import redis as kombu_redis

from inferpool.codec import CONTENT_TYPE, register_serializer
from inferpool.settings import Settings


class _Channel(kombu_redis.Channel):
    """kombu's Redis channel, reusing one client for its blocking commands. Stock kombu
    builds a new redis.Redis for each of them (each delivery's unacked bookkeeping,
    each ack, each publish): 75 µs apiece with redis-py 8, on the worker's consumer
    thread. The client is thread-safe and the pool is the channel's either way."""

    _sync_client: redis.Redis | None = None

    def _create_client(self, asynchronous: bool = False) -> Any:
        if asynchronous:
            return super()._create_client(asynchronous=True)
        client = self._sync_client
        if client is None or client.connection_pool is not self.pool:
            client = self._sync_client = super()._create_client()
        return client


class RedisTransport(kombu_redis.Transport):
    Channel = _Channel


def make_celery(settings: Settings, main: str = "inferpool") -> Celery:
    register_serializer()
    app = Celery(main, broker=settings.redis_url, set_as_current=False)
    app.conf.update(
        # Envelopes name their serializer on each publish (see api/publisher.py); the
        # default stays json because Celery's control mailbox (ping, inspect) uses it.
        task_serializer="json",
        accept_content=[CONTENT_TYPE, "json"],  # never pickle
        result_backend=None,
        task_ignore_result=True,
        # Interactive requests are deadline-bound: a lost one is answered by its deadline,
        # and redelivering it after a crash would compute an answer nobody waits for.
        task_acks_late=False,
        worker_prefetch_multiplier=settings.worker_prefetch,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
        # Publishing is on the request path: fail fast and let the caller see UNAVAILABLE.
        task_publish_retry_policy={"max_retries": 2, "interval_start": 0, "interval_step": 0.1},
        broker_transport_options={
            "socket_timeout": 2.0,
            "socket_connect_timeout": 1.0,
        },
        worker_enable_remote_control=True,
    )
    # Plain redis:// only: for rediss:// kombu derives TLS defaults from the scheme name,
    # which naming a transport class would bypass.
    if urlsplit(settings.redis_url).scheme == "redis":
        app.conf.broker_transport = f"{__name__}:RedisTransport"
    return app
