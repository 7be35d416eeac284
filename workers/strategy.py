"""The consumer strategy of the classify tasks: a plain message goes straight to its batcher.

Stock Celery turns every message into a Request on the consumer thread, hands it to
a pool thread and traces it there: a lone Classify spent about 0.5 ms of its 3.3 ms
in those hops (measured with timestamps in the worker). An interactive message needs
none of it when Celery has nothing to do for it. So `inline_or_stock` (set as the
tasks' `Strategy`, the hook Celery gives for this and celery-batches uses) offers
each message to `admit`, which decodes it, acknowledges it (when stock Celery would
have: before its items are computed) and submits its items to the batcher, all on
the consumer thread. With task events on (Flower turns them on), a message taken this
way sends the events stock Celery would have sent for it (`MessageEvents`: received,
started, then succeeded or failed, with the same fields), so Flower shows every message
as before without the Request, pool hop and tracer per message. Anything else takes
Celery's own strategy unchanged:

- an ETA, a rate limit, consumer callbacks, a revoked id, or an `expires` that has
  passed or cannot be read here: Celery schedules, revokes and counts those;
- `admit` declining: no free slot, a backlog on the pool, a message it cannot decode
  (the pool path dead-letters it) or a model version this worker does not serve.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

from celery.utils.saferepr import saferepr
from celery.worker import strategy as celery_strategy

log = logging.getLogger(__name__)


class MessageEvents:
    """The task events of one message taken inline: what stock Celery's strategy and
    Request send (their types and fields), so Flower cannot tell the paths apart."""

    def __init__(self, dispatcher: Any, headers: dict[str, Any]) -> None:
        self.dispatcher = dispatcher
        self.headers = headers
        self.id = headers.get("id")
        self.t0 = time.monotonic()

    def accepted(self) -> None:
        """Received and started at once: it goes to the batcher as it arrives."""
        try:
            self._accepted()
        except Exception:
            # An event lost is a gap in Flower's view; an exception here would stop the
            # consumer (or the results thread, for `finished`).
            log.exception("sending the task events of %s failed", self.id)

    def finished(self, result: dict[str, int] | None, error: str | None) -> None:
        """Succeeded with `result` (the pool path's return value), or failed with `error`."""
        try:
            self._finished(result, error)
        except Exception:
            log.exception("sending the task events of %s failed", self.id)

    def _accepted(self) -> None:
        h = self.headers
        self.dispatcher.send(
            "task-received",
            uuid=self.id,
            name=h.get("task"),
            args=h.get("argsrepr"),
            kwargs=h.get("kwargsrepr"),
            root_id=h.get("root_id"),
            parent_id=h.get("parent_id"),
            retries=h.get("retries", 0),
            eta=h.get("eta"),
            expires=h.get("expires"),
        )
        self.dispatcher.send("task-started", uuid=self.id)

    def _finished(self, result: dict[str, int] | None, error: str | None) -> None:
        if error is None:
            runtime = time.monotonic() - self.t0
            self.dispatcher.send("task-succeeded", uuid=self.id, result=saferepr(result), runtime=runtime)
        else:
            self.dispatcher.send("task-failed", uuid=self.id, exception=error, traceback="")


# (message, ack, events) -> whether the message was taken; ack() acknowledges it;
# events: the task events to send for it, None while they are off.
Admit = Callable[[Any, Callable[[], None], MessageEvents | None], bool]


def inline_or_stock(task: Any, app: Any, consumer: Any, *, admit: Admit, **options: Any) -> Any:
    """A Celery strategy (`Task.Strategy`, with `admit` bound by functools.partial)."""
    stock = celery_strategy.default(task, app, consumer, **options)
    dispatcher = consumer.event_dispatcher
    revoked = consumer.controller.state.revoked
    connection_errors = consumer.connection_errors

    def on_message(message: Any, body: Any, ack: Any, reject: Any, callbacks: Any, **kwargs: Any) -> Any:
        headers = message.headers
        if (
            callbacks
            or task.rate_limit
            or headers.get("eta")
            or headers.get("id") in revoked
            or not unexpired(headers.get("expires"))
            or not admit(
                message,
                lambda: ack(log, connection_errors),
                MessageEvents(dispatcher, headers) if sends_task_events(dispatcher) else None,
            )
        ):
            return stock(message, body, ack, reject, callbacks, **kwargs)
        return None

    return on_message


def sends_task_events(dispatcher: Any) -> bool:
    """Whether the worker sends task events now (-E, or Flower's enable_events). Read per
    message: the groups change at runtime. Empty groups mean every group."""
    if dispatcher is None or not dispatcher.enabled:
        return False
    groups = dispatcher.groups
    return not groups or "task" in groups


def unexpired(expires: str | None) -> bool:
    """Whether a message's `expires` header (ISO 8601, as Celery writes it) is surely in
    the future. An absent header never expires; one without a time zone is left to Celery,
    which reads it in the app's time zone."""
    if not expires:
        return True
    try:
        when = datetime.fromisoformat(expires)
    except (TypeError, ValueError):
        return False
    return when.tzinfo is not None and when.timestamp() > time.time()
