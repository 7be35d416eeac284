"""Task events leave the worker in one message per flush interval, not one per loop turn.

Celery buffers a worker's task events and, on its event loop, publishes the buffer as one
`task.multi` message on the next loop turn after each send. On the miss path that is two
messages per queue message (received and started, then succeeded), and every one costs
Flower a consume, a decode and an ack, and Redis a PUBLISH. `TaskEventFlush`, a consumer
bootstep after Celery's `Events`, turns the per-send flush off and publishes what has
gathered once per `INFERPOOL_TASK_EVENTS_FLUSH_MS` from the consumer's timer (and at once
when `buffer_limit` events wait). Each event keeps the timestamp and clock of its send, so
Flower shows the same times; it learns of them up to one interval later. With no event
loop (Celery then sends each event unbuffered) the step does nothing.
"""

from __future__ import annotations

from typing import Any

from celery import bootsteps
from celery.worker.consumer.events import Events

# Past this many events waiting, the sender publishes them at once (Celery's own rule).
BUFFER_LIMIT = 512


class TaskEventFlush(bootsteps.StartStopStep):
    """Add `TaskEventFlush.every(ms)` to the app's consumer steps."""

    requires = (Events,)
    interval_s = 0.0

    @classmethod
    def every(cls, flush_ms: float) -> type[TaskEventFlush]:
        return type(cls.__name__, (cls,), {"interval_s": flush_ms / 1000.0})

    def __init__(self, c: Any, **kwargs: Any) -> None:
        self._tref: Any = None
        super().__init__(c, **kwargs)

    def start(self, c: Any) -> None:
        dispatcher = c.event_dispatcher
        if self.interval_s <= 0 or dispatcher is None or c.hub is None or not dispatcher.buffer_group:
            return
        # Events.start makes a new dispatcher on every (re)connection.
        dispatcher.on_send_buffered = None
        dispatcher.buffer_limit = BUFFER_LIMIT
        if self._tref is None:
            self._tref = c.timer.call_repeatedly(self.interval_s, self.flush, (c,))

    def flush(self, c: Any) -> None:
        dispatcher = c.event_dispatcher
        if dispatcher is not None:
            dispatcher.flush()

    def stop(self, c: Any) -> None:
        if self._tref is not None:
            self._tref.cancel()
            self._tref = None
        self.flush(c)

    shutdown = stop
