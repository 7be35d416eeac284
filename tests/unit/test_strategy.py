"""The classify tasks' consumer strategy (workers/strategy.py): the tests that need no
server (those against real servers: tests/integration/test_strategy.py)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import pytest

from inferpool.workers.strategy import sends_task_events, unexpired

pytestmark = pytest.mark.timeout(60)


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
