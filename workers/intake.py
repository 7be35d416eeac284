"""How a classify message reaches its model's batcher.

A message is submitted to its batcher from Celery's consumer thread when it can be
(`Intake.admit`, through workers/strategy.py), else on a pool thread (`Intake.handle`);
either way at most `worker_concurrency` envelopes are in the batchers at once (`_slots`).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import redis
from celery.exceptions import Reject
from celery.worker import state as worker_state

from inferpool import codec
from inferpool.errors import InvalidInput
from inferpool.names import DEAD_LETTER_MAX, dead_letter_key, queue_name, task_name
from inferpool.repository import ModelConfig
from inferpool.v1 import envelope_pb2
from inferpool.workers import metrics
from inferpool.workers.batcher import Batcher, Pending
from inferpool.workers.results import Ticket

if TYPE_CHECKING:
    from inferpool.workers.app import Runtime
    from inferpool.workers.strategy import MessageEvents

log = logging.getLogger("inferpool.worker")


def _reject(
    item: envelope_pb2.EnvelopeItem, error: str, status: int = envelope_pb2.Reply.STATUS_INVALID_INPUT
) -> tuple[str, bytes]:
    reply = envelope_pb2.Reply(request_id=item.request_id, status=status, error=error)  # type: ignore[arg-type]
    return item.reply_key, reply.SerializeToString()


def _summary(ticket: Ticket, items: int) -> dict[str, int]:
    """A message's outcome, as its task returns it (Flower shows it as the result); items
    refused before the batcher count as failed."""
    return {
        "items": items,
        "computed": ticket.computed,
        "expired": ticket.expired,
        "failed": ticket.failed + items - ticket.count,
    }


def _settled(ticket: Ticket) -> bool:
    """Whether a message counts as a success: the model failed on none, or not on all, of its items."""
    return ticket.count == 0 or ticket.failed < ticket.count


class Intake:
    """The classify tasks' two ways in, sharing the worker's envelope slots. The batchers
    exist once the worker has started (`started`); until then nothing is admitted."""

    def __init__(self, concurrency: int) -> None:
        self.runtime: Runtime | None = None
        self._ready = threading.Event()
        # Envelopes a worker holds in its batchers at once, whichever path they took: the
        # consumer thread takes a slot without waiting, a pool thread waits for one.
        self._slots = threading.BoundedSemaphore(concurrency)
        self._inline_lock = threading.Lock()
        self._inline_held: Counter[str] = Counter()  # per queue, for inferpool_worker_active_messages

    def started(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self._ready.set()

    def _submit(
        self,
        batcher: Batcher,
        envelope: envelope_pb2.Envelope,
        on_done: Callable[[Ticket], None] | None = None,
    ) -> tuple[Ticket, list[Pending]]:
        """Validates an envelope's items, answers those that fail, and hands the rest to the
        batcher; on_done(ticket) runs once every item is answered or dropped."""
        assert self.runtime is not None
        cfg: ModelConfig = batcher.cfg
        batcher.arriving(+1)
        try:
            accepted: list[tuple[envelope_pb2.EnvelopeItem, Any]] = []
            rejected: dict[str, list[bytes]] = {}
            for item in envelope.items:
                try:
                    accepted.append((item, cfg.validate(item.input)))
                except InvalidInput as exc:
                    key, value = _reject(item, str(exc))
                    rejected.setdefault(key, []).append(value)
            if rejected:
                self.runtime.sink.push(rejected)
                invalid = sum(len(v) for v in rejected.values())
                metrics.DROPPED.labels(cfg.name, "invalid").inc(invalid)
            ticket = Ticket(len(accepted), envelope.enqueued_unix_ns, on_done=on_done)
            pending = [Pending(item, array, ticket) for item, array in accepted]
            batcher.submit(pending)
        finally:
            batcher.arriving(-1)
        return ticket, pending

    def admit(
        self, model: str, message: Any, ack: Callable[[], None], events: MessageEvents | None = None
    ) -> bool:
        """Runs on Celery's consumer thread (workers/strategy.py): takes a message whose
        envelope this worker can batch now and submits it, or declines it to Celery's pool.
        `events`: the task events to send for it (task events on)."""
        runtime = self.runtime
        # Requests reserved for the pool (waiting for a thread or a slot) go first: a message
        # taken here ahead of them would jump the queue.
        if runtime is None or worker_state.reserved_requests or not self._slots.acquire(blocking=False):
            return False
        try:
            envelope = codec.decode(message.decode()[0][0])
            batcher = runtime.batchers.get((model, envelope.model_version))
        except Exception:
            batcher = None  # poison, or another serializer: the pool path dead-letters it
        if batcher is None or envelope.model != model:
            self._slots.release()
            return False
        queue = queue_name(model)
        name = task_name(model)
        once = threading.Lock()

        def done(ticket: Ticket | None) -> None:
            if not once.acquire(blocking=False):
                return  # the batcher finished a ticket whose submit then raised
            with self._inline_lock:
                self._inline_held[queue] -= 1
            self._slots.release()
            ok = ticket is not None and _settled(ticket)
            metrics.TASKS.labels(name, "succeeded" if ok else "failed").inc()
            if events is not None:
                if ok and ticket is not None:
                    events.finished(_summary(ticket, len(envelope.items)), None)
                else:
                    events.finished(None, "the model failed on every item of this message")

        with self._inline_lock:
            self._inline_held[queue] += 1
        # What Celery's task_accepted counts (`celery inspect stats`: total).
        worker_state.total_count[name] += 1
        worker_state.all_total_count[0] += 1
        metrics.INLINE_MESSAGES.labels(name).inc()
        ack()
        if events is not None:
            events.accepted()
        try:
            self._submit(batcher, envelope, on_done=done)
        except Exception:
            # Acknowledged already, as Celery would have before running the task: its callers
            # time out at their deadlines.
            log.exception("submitting a message for %s failed", model)
            done(None)
        return True

    def inline_held(self, queue: str) -> int:
        with self._inline_lock:
            return self._inline_held[queue]

    def handle(self, model: str, body: bytes) -> dict[str, int]:
        """Runs one queue message on a pool thread: decode, hand the items to the batcher, wait."""
        if not self._ready.wait(timeout=60):
            raise RuntimeError("worker runtime did not start")
        runtime = self.runtime
        assert runtime is not None
        try:
            envelope = codec.decode(body)
            if envelope.model != model:
                raise codec.PoisonMessage(f"envelope for {envelope.model!r} on the {model!r} task")
        except codec.PoisonMessage as exc:
            metrics.TASKS.labels(task_name(model), "rejected").inc()
            log.error("dead-lettering poison message on %s: %s", model, exc)
            dead = dead_letter_key(queue_name(model))
            try:
                pipe = runtime.sink.client.pipeline()
                pipe.lpush(dead, body)
                pipe.ltrim(dead, 0, DEAD_LETTER_MAX - 1)
                pipe.execute()
            except redis.RedisError:
                log.exception("could not dead-letter a poison message on %s", model)
            # Rejected, not returned: Celery (and Flower) must not show it as a success.
            raise Reject(str(exc), requeue=False) from exc
        batcher = runtime.batchers.get((model, envelope.model_version))
        if batcher is None:
            # A worker deployed with another repository than the API: answer rather than
            # let the callers wait out their deadlines.
            error = f"worker {socket.gethostname()} does not serve {model} v{envelope.model_version}"
            log.error(error)
            replies: dict[str, list[bytes]] = {}
            for item in envelope.items:
                key, value = _reject(item, error, envelope_pb2.Reply.STATUS_INTERNAL)
                replies.setdefault(key, []).append(value)
            runtime.sink.push(replies)
            metrics.DROPPED.labels(model, "invalid").inc(len(envelope.items))
            return {"items": len(envelope.items), "failed": len(envelope.items)}
        latest_ns = max((item.deadline_unix_ns for item in envelope.items), default=0)
        left_s = max(0.0, (latest_ns - time.time_ns()) / 1e9)
        # A slot frees when a held envelope is answered. Not getting one within the callers'
        # deadlines means they have passed: the batcher drops the items as expired.
        slot = self._slots.acquire(timeout=left_s)
        # Bounded: every item's deadline is at most this far away, plus one batch.
        wait_s = left_s + 5.0
        try:
            ticket, pending = self._submit(batcher, envelope)
            if not ticket.done.wait(timeout=wait_s):
                # A task shown as SUCCESS must have succeeded: this one did not finish.
                raise TimeoutError(f"batch for {model} did not settle within {wait_s:.1f}s")
        finally:
            if slot:
                self._slots.release()
        if not _settled(ticket):
            raise RuntimeError(f"the model failed on all {len(pending)} items of this message")
        return _summary(ticket, len(envelope.items))
