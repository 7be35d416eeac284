"""The classify tasks' consumer strategy (workers/strategy.py): which messages go to the
batcher from Celery's consumer thread, and which take Celery's own path."""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any

import numpy as np
import pytest
import redis

from inferpool.client import Client
from inferpool.names import task_name
from tests.servers import Worker

pytestmark = pytest.mark.timeout(60)


def _task_events(worker: Worker, on: bool) -> None:
    control = worker.control.control
    command = control.enable_events if on else control.disable_events
    assert command(destination=[worker.name], reply=True, timeout=2.0), "the worker did not answer"


def _processed(worker: Worker) -> int:
    stats = worker.control.control.inspect(destination=[worker.name], timeout=2.0).stats()
    return int(stats[worker.name]["total"].get(task_name("digits"), 0))


def _fresh() -> np.ndarray:
    # Fresh entropy, not a seed: other tests' seeded inputs are in the session's cache.
    return np.random.default_rng().random((1, 1, 28, 28), dtype=np.float32)


def test_a_plain_message_is_batched_from_the_consumer_thread(client: Client, worker: Worker) -> None:
    # Flower's tests (earlier in the session) leave task events on.
    _task_events(worker, False)
    _classify_inline(client, worker)


def _classify_inline(client: Client, worker: Worker) -> None:
    """One fresh miss, taken from the consumer thread, computed once, and still in
    Celery's own count of processed tasks (`celery inspect stats`)."""
    before, processed = worker.stats(), _processed(worker)
    reply = client.classify(_fresh(), "digits", timeout_s=10)
    assert not reply.cached
    after = worker.stats()
    assert after["messages_inline"] == before["messages_inline"] + 1
    assert after["items_computed"] == before["items_computed"] + 1
    assert _processed(worker) == processed + 1


class _Events:
    """Task events as Flower receives them: a Celery event receiver on the session's broker."""

    def __init__(self, worker: Worker) -> None:
        self.seen: list[dict[str, Any]] = []
        self.ready = threading.Event()
        self._conn = worker.control.connection_for_read()
        self.recv = worker.control.events.Receiver(self._conn, handlers={"*": self.seen.append})
        consume_ready = self.recv.on_consume_ready

        def on_ready(*args: Any, **kwargs: Any) -> None:
            consume_ready(*args, **kwargs)
            self.ready.set()

        self.recv.on_consume_ready = on_ready  # type: ignore[method-assign]
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self.ready.wait(10), "the event receiver did not start"

    def _run(self) -> None:
        with contextlib.suppress(Exception):
            self.recv.capture(limit=None, timeout=None, wakeup=False)

    def of(self, uuid: str) -> list[dict[str, Any]]:
        return [e for e in list(self.seen) if e.get("uuid") == uuid]

    def close(self) -> None:
        self.recv.should_stop = True
        self._thread.join(5)
        self._conn.release()


def test_with_task_events_on_messages_are_batched_inline_and_send_celerys_events(
    client: Client, worker: Worker
) -> None:
    _task_events(worker, True)
    events = _Events(worker)
    try:
        # The receiver's subscription may trail its start: classify until one message's
        # events are all in (bounded).
        deadline = time.monotonic() + 20
        complete: list[dict[str, Any]] = []
        while not complete and time.monotonic() < deadline:
            _classify_inline(client, worker)  # events on or off
            until = time.monotonic() + 3
            while not complete and time.monotonic() < until:
                received = [e for e in list(events.seen) if e["type"] == "task-received"]
                for r in received:
                    types = [e["type"] for e in events.of(r["uuid"])]
                    if "task-succeeded" in types:
                        complete = events.of(r["uuid"])
                        break
                else:
                    time.sleep(0.02)  # polling a list another thread fills; bounded above
        assert complete, f"no message's task events arrived: {[e['type'] for e in events.seen]}"
        # What stock Celery sends, in its order, with the fields Flower shows.
        assert [e["type"] for e in complete] == ["task-received", "task-started", "task-succeeded"]
        received, started, succeeded = complete
        assert received["name"] == task_name("digits")
        assert received["hostname"] == started["hostname"] == succeeded["hostname"] == worker.name
        assert "'computed': 1" in succeeded["result"] and "'failed': 0" in succeeded["result"]
        assert 0 < succeeded["runtime"] < 10
    finally:
        events.close()
        _task_events(worker, False)


def _publishes(redis_client: redis.Redis) -> int:
    return int(redis_client.info("commandstats").get("cmdstat_publish", {}).get("calls", 0))


def test_task_events_of_many_messages_leave_together_and_all_arrive(
    client: Client, worker: Worker, redis_client: redis.Redis
) -> None:
    """Each message sends three task events; they leave the worker gathered per flush
    interval (INFERPOOL_TASK_EVENTS_FLUSH_MS), not one Redis PUBLISH per loop turn, and
    every one of them reaches a receiver."""
    n = 30
    _task_events(worker, True)
    events = _Events(worker)
    try:
        _classify_inline(client, worker)  # the receiver's subscription is live once one arrives
        first = time.monotonic() + 10
        while time.monotonic() < first and not any(e["type"] == "task-succeeded" for e in list(events.seen)):
            time.sleep(0.02)  # polling a list another thread fills; bounded above
        seen_before = len(events.seen)
        published = _publishes(redis_client)
        for _ in range(n):
            assert not client.classify(_fresh(), "digits", timeout_s=10).cached  # one queue message each
        deadline = time.monotonic() + 10
        while len(events.seen) - seen_before < 3 * n and time.monotonic() < deadline:
            time.sleep(0.02)  # bounded above
        published = _publishes(redis_client) - published
        new = list(events.seen)[seen_before:]
        succeeded = {e["uuid"] for e in new if e["type"] == "task-succeeded"}
        assert len(succeeded) == n, f"{len(succeeded)} of {n} messages reported succeeded"
        for uuid in succeeded:
            assert [e["type"] for e in events.of(uuid)] == ["task-received", "task-started", "task-succeeded"]
        # Flushed per loop turn, this is 2n. Per 100 ms, it is one per 100 ms the calls took
        # plus worker heartbeats: a few, unless each call took over 100 ms.
        assert published <= n, f"{published} PUBLISH calls for the events of {n} messages"
    finally:
        events.close()
        _task_events(worker, False)
