"""kombu's ack emulation as the worker runs it (inferpool.broker._QoS), on a real Redis:
interactive messages that start at once skip the `unacked` hash, and nothing that
stock kombu would restore is lost."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from kombu import Connection, Exchange, Queue
from kombu.asynchronous import Hub

from inferpool.broker import defer_unacked_while
from inferpool.names import bulk_queue_name, queue_name
from tests.servers import RedisServer

pytestmark = pytest.mark.timeout(30)

INTERACTIVE = queue_name("unacked-test")
BULK = bulk_queue_name("unacked-test")


@pytest.fixture
def broker(fresh_redis: RedisServer) -> Iterator[tuple[Connection, redis.Redis]]:
    client = redis.Redis.from_url(fresh_redis.url)
    with Connection(fresh_redis.url, transport="inferpool.broker:RedisTransport") as conn:
        yield conn, client
    defer_unacked_while(None)
    client.close()


def _publish(conn: Connection, queue: str, body: str = "payload") -> Queue:
    q = Queue(queue, Exchange(""), routing_key=queue)
    with conn.Producer() as producer:
        producer.publish(body, routing_key=queue, declare=[q], serializer="json")
    return q


def _deliver(conn: Connection, queue: str = INTERACTIVE) -> tuple[Queue, Any]:
    """Publishes one message on `queue` and takes it (unacknowledged) on the default channel."""
    q = _publish(conn, queue)
    return q, q.bind(conn.default_channel).get()


def _entries(client: redis.Redis) -> tuple[int, int]:
    return client.hlen("unacked"), client.zcard("unacked_index")


def test_a_message_that_starts_at_once_never_touches_the_unacked_hash(
    broker: tuple[Connection, redis.Redis],
) -> None:
    conn, client = broker
    defer_unacked_while(lambda: True)
    _, message = _deliver(conn)
    assert message is not None and message.decode() == "payload"
    assert _entries(client) == (0, 0)
    message.ack()
    assert _entries(client) == (0, 0) and client.llen(INTERACTIVE) == 0


def test_one_still_unacknowledged_is_written_then_removed_on_ack(
    broker: tuple[Connection, redis.Redis],
) -> None:
    conn, client = broker
    defer_unacked_while(lambda: True)
    _, message = _deliver(conn)
    qos: Any = conn.default_channel.qos
    qos.write_deferred(older_than_s=10)  # not due yet
    assert _entries(client) == (0, 0)
    qos.write_deferred(older_than_s=0)
    assert _entries(client) == (1, 1)
    message.ack()
    assert _entries(client) == (0, 0) and client.llen(INTERACTIVE) == 0


def test_one_not_yet_written_is_restored_from_memory_at_shutdown(
    broker: tuple[Connection, redis.Redis],
) -> None:
    conn, client = broker
    defer_unacked_while(lambda: True)
    q, message = _deliver(conn)
    assert message is not None
    assert client.llen(INTERACTIVE) == 0
    conn.default_channel.close()  # kombu restores what was delivered and not acknowledged
    assert client.llen(INTERACTIVE) == 1 and _entries(client) == (0, 0)
    again = q.bind(conn.channel()).get()
    assert again is not None and again.decode() == "payload" and again.delivery_info["redelivered"]


def test_busy_threads_bulk_chunks_and_ungated_processes_keep_the_stock_bookkeeping(
    broker: tuple[Connection, redis.Redis],
) -> None:
    conn, client = broker
    cases = [(None, INTERACTIVE), (lambda: False, INTERACTIVE), (lambda: True, BULK)]
    for n, (gate, queue) in enumerate(cases, start=1):
        defer_unacked_while(gate)
        assert _deliver(conn, queue)[1] is not None
        assert _entries(client) == (n, n), (gate, queue)


def test_the_event_loop_writes_what_is_held_past_the_deferral(
    broker: tuple[Connection, redis.Redis],
) -> None:
    # The worker's consumer loop, as Celery runs it: a kombu Hub with the transport
    # registered. A message held (never acknowledged) gets its entry from the hub's timer.
    conn, client = broker
    defer_unacked_while(lambda: True)
    held: list[Any] = []
    q = _publish(conn, INTERACTIVE)
    hub = Hub()
    try:
        conn.transport.register_with_event_loop(conn.connection, hub)
        with conn.Consumer([q], callbacks=[lambda _body, message: held.append(message)]):
            deadline = time.monotonic() + 10
            while _entries(client) != (1, 1):
                assert time.monotonic() < deadline, f"held {len(held)}, entries {_entries(client)}"
                hub.run_once()
        assert len(held) == 1
        held[0].ack()
        assert _entries(client) == (0, 0)
    finally:
        hub.close()
