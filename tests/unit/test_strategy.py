"""The classify tasks' consumer strategy (workers/strategy.py): the tests that need no
server (those against real servers: tests/integration/test_strategy.py)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import pytest

from inferpool.settings import Settings, SettingsError
from inferpool.workers.eventflush import TaskEventFlush
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


class _Timer:
    def __init__(self) -> None:
        self.entries: list[tuple[float, object]] = []

    def call_repeatedly(self, secs: float, fun: object, args: tuple[object, ...] = ()) -> SimpleNamespace:
        self.entries.append((secs, fun))
        return SimpleNamespace(cancel=lambda: self.entries.clear())


def _consumer(hub: object = True) -> SimpleNamespace:
    flushed: list[bool] = []
    dispatcher = SimpleNamespace(
        buffer_group=["task"], on_send_buffered=print, buffer_limit=24, flush=lambda: flushed.append(True)
    )
    return SimpleNamespace(event_dispatcher=dispatcher, hub=hub, timer=_Timer(), flushed=flushed)


def test_task_event_flush_takes_over_celerys_per_send_flush_on_a_timer() -> None:
    c = _consumer()
    step = TaskEventFlush.every(100.0)(c)
    step.start(c)
    assert c.event_dispatcher.on_send_buffered is None
    assert c.event_dispatcher.buffer_limit > 24
    assert [secs for secs, _ in c.timer.entries] == [0.1]
    step.start(c)  # a reconnection: still one timer
    assert len(c.timer.entries) == 1
    step.stop(c)  # what is still buffered leaves, the timer goes
    assert c.flushed and not c.timer.entries


@pytest.mark.parametrize("flush_ms, hub", [(0.0, True), (100.0, None)])
def test_task_event_flush_leaves_celery_alone_when_off_or_without_an_event_loop(
    flush_ms: float, hub: object
) -> None:
    c = _consumer(hub)
    TaskEventFlush.every(flush_ms)(c).start(c)
    assert c.event_dispatcher.on_send_buffered is print and not c.timer.entries


def test_task_events_flush_interval_is_validated() -> None:
    with pytest.raises(SettingsError, match="INFERPOOL_TASK_EVENTS_FLUSH_MS"):
        Settings.from_env({"INFERPOOL_TASK_EVENTS_FLUSH_MS": "-1"})
    assert Settings.from_env({"INFERPOOL_TASK_EVENTS_FLUSH_MS": "0"}).task_events_flush_ms == 0
