"""How we talk kombu's Redis wire format: the message the API LPUSHes must be the one
`send_task` would have written, so a stock Celery worker (and Flower) see no difference."""

from __future__ import annotations

import base64
import json
import time
from datetime import UTC, datetime
from typing import Any

import pytest
import redis
from kombu.serialization import loads

from inferpool.broker import make_celery
from inferpool.codec import SERIALIZER
from inferpool.settings import Settings
from inferpool.taskwire import task_payload
from tests.servers import RedisServer

pytestmark = pytest.mark.timeout(30)

# Fresh per message, or derived from the clock.
VARYING = {"id", "root_id", "correlation_id", "delivery_tag", "expiration"}


def shape(value: Any, key: str = "") -> Any:
    """The message with its per-message values blanked: keys, types and fixed values."""
    if isinstance(value, dict):
        return {k: shape(v, k) for k, v in value.items()}
    if key in VARYING:
        return type(value).__name__
    return value


def test_payload_matches_what_send_task_writes(fresh_redis: RedisServer) -> None:
    app = make_celery(Settings.from_env({"INFERPOOL_REDIS_URL": fresh_redis.url}))
    client = redis.Redis.from_url(fresh_redis.url)
    body = bytes(range(256)) * 3
    expires_ns = time.time_ns() + 5_000_000_000
    # What the API published with before it wrote the message itself.
    app.send_task(
        "inferpool.classify.digits",
        args=(body,),
        queue="via.kombu",
        serializer=SERIALIZER,
        expires=datetime.fromtimestamp(expires_ns / 1e9, tz=UTC),
        ignore_result=True,
        argsrepr="",
        kwargsrepr="",
    )
    ours = task_payload(app, "inferpool.classify.digits", "via.wire", body, expires_ns)

    theirs = json.loads(client.lpop("via.kombu"))  # type: ignore[arg-type]
    mine = json.loads(ours)
    # kombu adds send_task's own options (argsrepr, kwargsrepr) to the properties too;
    # the worker reads them from the headers.
    for extra in ("argsrepr", "kwargsrepr"):
        theirs["properties"].pop(extra, None)
    theirs["properties"]["delivery_info"]["routing_key"] = "via.wire"
    assert shape(mine) == shape(theirs)
    assert abs(int(mine["properties"]["expiration"]) - int(theirs["properties"]["expiration"])) < 1000
    assert mine["headers"]["id"] == mine["properties"]["correlation_id"] == mine["headers"]["root_id"]
    expires = datetime.fromtimestamp(expires_ns / 1e9, tz=UTC)
    assert datetime.fromisoformat(mine["headers"]["expires"]) == expires

    decoded = loads(
        base64.b64decode(mine["body"]),
        mine["content-type"],
        mine["content-encoding"],
        accept=[mine["content-type"]],
    )
    assert decoded[0] == (body,)


def test_broker_channels_reuse_one_client_on_plain_redis(fresh_redis: RedisServer) -> None:
    app = make_celery(Settings.from_env({"INFERPOOL_REDIS_URL": fresh_redis.url}))
    assert app.conf.broker_transport == "inferpool.broker:RedisTransport"
    with app.connection_for_write() as connection:
        channel = connection.default_channel
        with channel.conn_or_acquire() as first, channel.conn_or_acquire() as second:
            assert first is second
        # The same client still serves the transport's own commands, e.g. a publish.
        channel._put("via.cached", {"body": "x", "properties": {}})
    assert redis.Redis.from_url(fresh_redis.url).llen("via.cached") == 1
    # rediss:// keeps kombu's stock transport, which derives TLS defaults from the scheme.
    tls = make_celery(Settings.from_env({"INFERPOOL_REDIS_URL": "rediss://127.0.0.1:6380/0"}))
    assert not tls.conf.broker_transport
