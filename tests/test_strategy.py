"""The classify tasks' consumer strategy (workers/strategy.py): which messages go to the
batcher from Celery's consumer thread, and which take Celery's own path."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import numpy as np
import pytest

from inferpool.client import Client
from inferpool.names import task_name
from tests.servers import Worker
from workers.strategy import sends_task_events, unexpired

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
    before, processed = worker.stats(), _processed(worker)
    reply = client.classify(_fresh(), "digits", timeout_s=10)
    assert not reply.cached
    after = worker.stats()
    assert after["messages_inline"] == before["messages_inline"] + 1
    assert after["items_computed"] == before["items_computed"] + 1
    # Celery's own count of processed tasks (`celery inspect stats`) still includes it.
    assert _processed(worker) == processed + 1


def test_with_task_events_on_messages_take_celerys_path(client: Client, worker: Worker) -> None:
    _task_events(worker, True)
    try:
        before, processed = worker.stats(), _processed(worker)
        reply = client.classify(_fresh(), "digits", timeout_s=10)
        assert not reply.cached
        after = worker.stats()
        # Computed, through a pool thread: so that Flower sees every task.
        assert after["messages_inline"] == before["messages_inline"]
        assert after["items_computed"] == before["items_computed"] + 1
        assert _processed(worker) == processed + 1
    finally:
        _task_events(worker, False)


def test_expires_is_read_as_celery_writes_it() -> None:
    now = datetime.now(UTC)
    assert unexpired(None) and unexpired("")
    assert unexpired((now + timedelta(seconds=5)).isoformat())
    assert not unexpired((now - timedelta(milliseconds=1)).isoformat())
    # Without a time zone Celery reads it in the app's zone: left to Celery.
    assert not unexpired((now + timedelta(seconds=5)).replace(tzinfo=None).isoformat())
    assert not unexpired("tomorrow")


def test_task_events_are_read_from_the_dispatchers_groups() -> None:
    assert not sends_task_events(None)
    assert not sends_task_events(SimpleNamespace(enabled=False, groups={"task"}))
    assert not sends_task_events(SimpleNamespace(enabled=True, groups={"worker"}))
    assert sends_task_events(SimpleNamespace(enabled=True, groups={"worker", "task"}))
    assert sends_task_events(SimpleNamespace(enabled=True, groups=set()))  # every group
