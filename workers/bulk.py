"""The bulk consumer: feeds bulk-job chunks to the batchers, acknowledging each chunk
only after every item of it has a result in Redis.

It runs on its own thread and Redis connection, outside Celery's task pool: a chunk
waiting for its items must not hold one of the pool's threads (interactive messages
queue behind those), and it must be acknowledged late, once the batcher has written
its results. Chunks travel on reliable Redis lists (inferpool.bulkqueue): a chunk
is moved atomically into this consumer's processing list, removed from there when
done, and put back on its queue by another worker's reaper if this one dies
(SIGKILL included) and stops renewing its lease; the job's idempotent result writes
make the repeat harmless. `prefetch` bounds how many chunks a worker holds.

While the worker sends task events (`-E`, or turned on at runtime by Flower or
`celery control enable_events`), each chunk is reported as a Celery task
(`inferpool.bulk.<model>`), so chunks show in Flower with their true state:
received, started, then succeeded only once their results are written (failed when
they could not be and the chunk went back on its queue; revoked when their job had
been cancelled).
"""

from __future__ import annotations

import functools
import logging
import os
import queue
import socket
import threading
import time
import uuid
from typing import Any

import numpy as np
import redis
from celery import Celery

from inferpool import codec, jobs, tracing
from inferpool.broker import Reconnect
from inferpool.bulkqueue import BulkQueues
from inferpool.errors import InvalidInput
from inferpool.jobs import JobStore
from inferpool.names import bulk_queue_name, bulk_task_name
from inferpool.repository import NONFINITE, ModelConfig
from inferpool.v1 import envelope_pb2
from inferpool.workers import metrics
from inferpool.workers.batcher import Batcher, BulkWork
from inferpool.workers.results import Ticket

log = logging.getLogger(__name__)

Reply = envelope_pb2.Reply


class _Chunk:
    """One chunk held by this worker: where it came from, what it was, when it arrived."""

    def __init__(self, queue: str, body: bytes, task_id: str, task: str) -> None:
        self.queue = queue
        self.body = body
        self.task_id = task_id
        self.task = task
        self.t0 = time.monotonic()
        self.span: Any = tracing.NO_SPAN  # the chunk's span in its job's trace


class BulkConsumer(threading.Thread):
    def __init__(
        self,
        app: Celery,
        redis_url: str,
        batchers: dict[tuple[str, int], Batcher],
        job_sink: JobStore,
        prefetch: int,
        lease_s: float,
        renew_s: float,
        reconnect_max_s: float,
        drain_s: float = 10.0,
        hostname: str | None = None,
        task_events: bool = False,
    ) -> None:
        super().__init__(name="bulk-consumer", daemon=True)
        self.app = app
        self.batchers = batchers
        self.jobs = job_sink
        self.prefetch = prefetch
        self.drain_s = drain_s
        self.hostname = hostname
        self.task_events = task_events
        # The worker's own event dispatcher, once it runs (follow_events): its groups
        # say whether task events are on now.
        self._worker_events: Any = None
        self.models = sorted({name for name, _ in batchers})
        consumer = f"{hostname or socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        # Its own connection: take() blocks on it. No retries inside redis-py: a connection
        # error must reach run(), which reconnects at its own pace and then looks for chunks
        # an LMOVE moved while its reply was lost (a retried LMOVE would take another).
        client = redis.Redis.from_url(redis_url, socket_timeout=10.0, socket_connect_timeout=2.0, retry=None)
        self._model_of = {bulk_queue_name(m): m for m in self.models}
        self.queues = BulkQueues(client, consumer, list(self._model_of), lease_s)
        self.renew_s = renew_s
        self.reconnect_max_s = reconnect_max_s
        # The chunks this consumer holds (in a batcher, or finished and not yet acknowledged).
        self._holding: set[_Chunk] = set()
        # Finished chunks, handed back by the batcher threads; acknowledged from here.
        self._finished: queue.SimpleQueue[tuple[_Chunk, Ticket]] = queue.SimpleQueue()
        self._inflight = 0
        # Chunks held per bulk queue: they left the Redis list, so the backlog metric adds
        # them to its length.
        self._held: dict[str, int] = dict.fromkeys(self.queues.queues, 0)
        for q in self._held:
            metrics.HELD.add_source(
                q, reserved=lambda: 0, active=functools.partial(self._held.__getitem__, q)
            )
        self._events: Any = None
        self._stopping = threading.Event()
        self._connected = False
        self.ready = threading.Event()

    def stop(self) -> None:
        self._stopping.set()

    def follow_events(self, dispatcher: Any) -> None:
        """Send chunk events exactly while the worker sends task events."""
        self._worker_events = dispatcher

    def _events_on(self) -> bool:
        worker = self._worker_events
        if worker is None:
            return self.task_events
        # Celery's enable_events/disable_events control commands edit these groups;
        # an empty set means every group.
        return bool(worker.enabled) and (not worker.groups or "task" in worker.groups)

    def run(self) -> None:
        reconnect = Reconnect("bulk consumer", self.reconnect_max_s, log)
        reconnecting = False
        while not self._stopping.is_set():
            try:
                self._consume(reconnecting)
            except (redis.RedisError, OSError) as exc:
                # What this worker held stays in its processing lists: the reaper of the
                # next worker (or ours, once the lease lapses) puts it back.
                if self._connected:
                    self._connected = False
                    reconnect.reset()
                reconnecting = True
                self._stopping.wait(reconnect.lost(exc))

    def _held_bodies(self, queue_name: str) -> list[bytes]:
        return [c.body for c in self._holding if c.queue == queue_name]

    def _return_unheld(self, check_all: bool) -> None:
        for queue_name in self.queues.queues:
            if returned := self.queues.return_unheld(queue_name, self._held_bodies(queue_name), check_all):
                log.warning(
                    "put %d bulk chunks this worker did not know it held back on %s", returned, queue_name
                )

    def _consume(self, reconnected: bool = False) -> None:
        self.queues.renew()
        self._connected = True
        if reconnected:
            log.warning("bulk consumer reconnected to Redis")
            self._return_unheld(check_all=True)
        self.ready.set()
        # Reaping at start too: a worker that replaces a dead one takes its chunks back
        # as soon as the dead one's lease has lapsed.
        next_renew = next_reap = 0.0
        try:
            while not self._stopping.is_set():
                now = time.monotonic()
                if now >= next_renew:
                    self.queues.renew()
                    self._return_unheld(check_all=False)
                    next_renew = now + self.renew_s
                if now >= next_reap:
                    if moved := self.queues.reap():
                        log.warning("put %d chunks of a dead worker back on their queues", moved)
                    next_reap = now + self.renew_s
                self._ack_finished(block=self._inflight >= self.prefetch)
                if self._inflight < self.prefetch:
                    # Short blocks: acks and lease renewals must not wait long behind them.
                    taken = self.queues.take(block_s=0.05)
                    if taken is not None:
                        self._on_chunk(*taken)
            # Graceful stop: take nothing new, let the batchers finish what we hold.
            deadline = time.monotonic() + self.drain_s
            while self._inflight and time.monotonic() < deadline:
                self._ack_finished(block=True)
        finally:
            if self._stopping.is_set():
                if returned := self.queues.release():
                    log.warning("returned %d unfinished bulk chunks to their queues", returned)
                if self._events is not None:
                    self._events.close()
                    self._events = None

    def _ack_finished(self, block: bool) -> None:
        try:
            chunk, ticket = self._finished.get(timeout=0.2) if block else self._finished.get_nowait()
        except queue.Empty:
            return
        while True:
            self._inflight -= 1
            self._held[chunk.queue] -= 1
            self._holding.discard(chunk)
            tracing.end_chunk(chunk.span, ticket.unrecorded)
            if ticket.unrecorded:
                self.queues.requeue(chunk.queue, chunk.body)  # compute it again later
                metrics.TASKS.labels(chunk.task, "failed").inc()
                error = f"{ticket.unrecorded} results could not be written; the chunk was requeued"
                self._event("task-failed", chunk, exception=error)
            else:
                self.queues.ack(chunk.queue, chunk.body)
                metrics.TASKS.labels(chunk.task, "succeeded").inc()
                outcome = {
                    "computed": ticket.computed,
                    "expired": ticket.expired,
                    "cancelled": ticket.cancelled,
                }
                self._event(
                    "task-succeeded", chunk, result=repr(outcome), runtime=time.monotonic() - chunk.t0
                )
            try:
                chunk, ticket = self._finished.get_nowait()
            except queue.Empty:
                return

    def _event(self, kind: str, chunk: _Chunk, **fields: Any) -> None:
        if not self.hostname or not self._events_on():
            return
        if kind == "task-received":
            fields = {"name": chunk.task, "args": "", "kwargs": "", "retries": 0, **fields}
        try:
            if self._events is None:
                self._events = self.app.events.Dispatcher(
                    self.app.connection_for_write(), hostname=self.hostname, enabled=True
                )
            self._events.send(kind, uuid=chunk.task_id, **fields)
        except Exception as exc:  # events are for operators; never fail a chunk over them
            log.debug("could not send %s: %r", kind, exc)

    def _on_chunk(self, queue_name: str, body: bytes) -> None:
        model = self._model_of[queue_name]
        try:
            envelope = codec.decode(body)
            if not envelope.job_id or envelope.model != model:
                raise codec.PoisonMessage(f"not a bulk envelope for {model!r}")
            indexes = _job_indexes(envelope)
        except codec.PoisonMessage as exc:
            log.error("dead-lettering poison bulk chunk from %s: %s", queue_name, exc)
            self.queues.dead_letter(queue_name, body)
            metrics.TASKS.labels(bulk_task_name(model), "rejected").inc()
            return
        job_id = envelope.job_id
        # Stable across redeliveries: a chunk is one task however often it runs.
        chunk = _Chunk(queue_name, body, f"{job_id}-{indexes[0] if indexes else 0}", bulk_task_name(model))
        self._event("task-received", chunk)
        if not self.jobs.live([job_id]):
            # Cancelled, ended or expired: nobody wants these items computed.
            metrics.DROPPED.labels(model, "cancelled").inc(len(indexes))
            metrics.TASKS.labels(chunk.task, "revoked").inc()
            self.queues.ack(queue_name, body)
            self._event("task-revoked", chunk, terminated=False, signum=None, expired=False)
            return
        batcher = self.batchers.get((envelope.model, envelope.model_version))
        rows: np.ndarray | None = None
        if batcher is None:
            error = f"this worker does not serve {envelope.model} v{envelope.model_version}"
            failures = [_failure(i, error, Reply.STATUS_INTERNAL) for i in indexes]
            indexes = []
        else:
            indexes, rows, failures = _validate(batcher.cfg, envelope, indexes)
        if failures:
            self.jobs.record(job_id, failures)
            metrics.DROPPED.labels(model, "invalid").inc(len(failures))
        if batcher is None or rows is None:
            self.queues.ack(queue_name, body)
            self._event("task-succeeded", chunk, result=repr({"failed": len(failures)}), runtime=0.0)
            return
        ticket = Ticket(
            len(indexes), envelope.enqueued_unix_ns, on_done=lambda t: self._finished.put((chunk, t))
        )
        self._inflight += 1
        self._held[queue_name] += 1
        self._holding.add(chunk)
        self._event("task-started", chunk)
        scope = envelope.chunk.cache_scope
        chunk.span = tracing.start_chunk(envelope, chunk.task_id, len(indexes), self.queues.delivery)
        traceparent = tracing.child_traceparent(chunk.span)
        batcher.submit_bulk(BulkWork(indexes, rows, ticket, job_id, _deadline(envelope), scope, traceparent))


def _job_indexes(envelope: envelope_pb2.Envelope) -> list[int]:
    if not envelope.HasField("chunk"):
        return [item.job_index for item in envelope.items]
    indexes = list(envelope.chunk.job_indexes)
    shape = envelope.chunk.inputs.shape
    if envelope.items or not shape or shape[0] != len(indexes):
        raise codec.PoisonMessage(f"a chunk of {len(indexes)} job indexes holds inputs shaped {list(shape)}")
    return indexes


def _deadline(envelope: envelope_pb2.Envelope) -> int:
    if envelope.HasField("chunk"):
        return envelope.chunk.deadline_unix_ns
    return min((item.deadline_unix_ns for item in envelope.items if item.deadline_unix_ns), default=0)


def _validate(
    cfg: ModelConfig, envelope: envelope_pb2.Envelope, indexes: list[int]
) -> tuple[list[int], np.ndarray | None, list[tuple[int, str, bytes]]]:
    """The job indexes of the chunk's valid inputs and those inputs as one array (None
    when there are none), and a failed result for each of the others."""
    invalid = Reply.STATUS_INVALID_INPUT
    if not envelope.HasField("chunk"):
        # Written by an API that predates BulkChunk: an input per item.
        checked = list(zip(indexes, cfg.validate_many([item.input for item in envelope.items]), strict=True))
        failures = [_failure(i, str(c), invalid) for i, c in checked if isinstance(c, InvalidInput)]
        kept = [(i, c) for i, c in checked if not isinstance(c, InvalidInput)]
        if not kept:
            return [], None, failures
        return [i for i, _ in kept], np.concatenate([c for _, c in kept]), failures
    try:
        rows, nonfinite = cfg.validate_batch(envelope.chunk.inputs)
    except InvalidInput as exc:
        return [], None, [_failure(i, str(exc), invalid) for i in indexes]
    if not nonfinite:
        return indexes, rows, []
    failures = [_failure(indexes[row], NONFINITE, invalid) for row in nonfinite]
    keep = np.ones(len(indexes), dtype=bool)
    keep[nonfinite] = False
    if not keep.any():
        return [], None, failures
    return [i for i, k in zip(indexes, keep.tolist(), strict=True) if k], rows[keep], failures


def _failure(index: int, error: str, status: int) -> tuple[int, str, bytes]:
    return index, jobs.FAILED, Reply(status=status, error=error).SerializeToString()  # type: ignore[arg-type]
