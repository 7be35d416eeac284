"""The bulk consumer: feeds bulk-job chunks to the batchers, acknowledging each chunk
only after every item of it has a result in Redis.

It runs on its own thread and connection, outside Celery's task pool, for two
reasons: a chunk waiting for its items must not hold one of the pool's threads
(interactive messages queue behind those), and it must be acknowledged late, when
the batcher has written its results, which a Celery task cannot defer to another
thread. The channel's prefetch bounds how many chunks a worker holds; everything
unacknowledged when the worker dies is redelivered by kombu after the visibility
timeout, and the job's idempotent result writes make that harmless.

Each chunk is a Celery task message (`inferpool.bulk.<model>`), and when the worker
sends task events (`-E`) this consumer sends the same task events Celery's own
consumer would, so chunks show in Flower with their true state: received, started,
then succeeded only once their results are written (failed when they could not be,
and the chunk goes back on its queue; revoked when their job was cancelled).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import queue
import threading
import time
from typing import Any

from celery import Celery
from kombu import Connection, Consumer, Exchange, Message, Queue

from inferpool import codec, jobs
from inferpool.errors import InvalidInput
from inferpool.names import bulk_queue_name
from inferpool.v1 import envelope_pb2
from workers import metrics
from workers.batcher import Batcher, Pending, Ticket
from workers.sinks import JobSink
from workers.stats import WorkerStats

log = logging.getLogger(__name__)

Reply = envelope_pb2.Reply


class BulkConsumer(threading.Thread):
    def __init__(
        self,
        app: Celery,
        batchers: dict[tuple[str, int], Batcher],
        job_sink: JobSink,
        stats: WorkerStats,
        prefetch: int,
        drain_s: float = 10.0,
        hostname: str | None = None,
        task_events: bool = False,
    ) -> None:
        super().__init__(name="bulk-consumer", daemon=True)
        self.app = app
        self.batchers = batchers
        self.jobs = job_sink
        self.stats = stats
        self.prefetch = prefetch
        self.drain_s = drain_s
        self.hostname = hostname
        self.task_events = task_events
        self._events: Any = None
        self.models = sorted({name for name, _ in batchers})
        # Finished chunks, handed back by the batcher threads; only this thread touches
        # the channel, so acks are sent from here.
        self._finished: queue.SimpleQueue[tuple[Message, Ticket, float]] = queue.SimpleQueue()
        self._inflight = 0
        # Chunks held per bulk queue (handed to a batcher, not yet acknowledged): they left
        # the Redis list, so the backlog metric adds them to its length.
        self._held: dict[str, int] = {bulk_queue_name(m): 0 for m in self.models}
        for q in self._held:
            metrics.HELD.add_source(
                q, reserved=lambda: 0, active=functools.partial(self._held.__getitem__, q)
            )
        self._stopping = threading.Event()
        self.ready = threading.Event()

    def stop(self) -> None:
        self._stopping.set()

    def run(self) -> None:
        backoff_s = 0.2
        while not self._stopping.is_set():
            conn = self.app.connection_for_read()
            try:
                self._consume(conn)
                backoff_s = 0.2
            except conn.connection_errors + conn.channel_errors as exc:
                log.warning("bulk consumer lost the broker (%r); reconnecting in %.1fs", exc, backoff_s)
                # Chunks of the lost channel come back after the visibility timeout.
                self._inflight = 0
                self._stopping.wait(backoff_s)
                backoff_s = min(backoff_s * 2, 5.0)
            finally:
                conn.release()

    def _consume(self, conn: Connection) -> None:
        channel = conn.channel()
        # The names and exchanges Celery creates when the API publishes by queue name.
        names = [bulk_queue_name(m) for m in self.models]
        queues = [Queue(q, Exchange(q, type="direct"), routing_key=q) for q in names]
        channel.basic_qos(0, self.prefetch, False)
        consumer = Consumer(
            channel, queues=queues, callbacks=[self._on_message], accept=[codec.CONTENT_TYPE], no_ack=False
        )
        consumer.consume()
        if self.hostname and self.task_events:
            self._events = self.app.events.Dispatcher(conn, hostname=self.hostname, enabled=True)
        self.ready.set()
        try:
            while not self._stopping.is_set():
                self._ack_finished(block=self._inflight >= self.prefetch)
                if self._inflight < self.prefetch:
                    with contextlib.suppress(TimeoutError):
                        conn.drain_events(timeout=0.02)
            # Graceful stop: take nothing new, let the batchers finish what we hold.
            consumer.cancel()
            deadline = time.monotonic() + self.drain_s
            while self._inflight and time.monotonic() < deadline:
                self._ack_finished(block=True)
        finally:
            if self._inflight:
                log.warning("returning %d unfinished bulk chunks to their queues", self._inflight)
            # Closing the channel puts every unacknowledged chunk back on its queue.
            channel.close()
            if self._events is not None:
                self._events.close()
                self._events = None

    def _ack_finished(self, block: bool) -> None:
        try:
            message, ticket, t0 = self._finished.get(timeout=0.2) if block else self._finished.get_nowait()
        except queue.Empty:
            return
        while True:
            self._inflight -= 1
            routing = (message.delivery_info or {}).get("routing_key", "")
            if routing in self._held:
                self._held[routing] -= 1
            task = (message.headers or {}).get("task", "")
            metrics.TASKS.labels(task, "failed" if ticket.unrecorded else "succeeded").inc()
            if ticket.unrecorded:
                message.requeue()  # its results could not be written: compute it again later
                self._event(
                    "task-failed",
                    message,
                    exception=f"{ticket.unrecorded} results could not be written; the chunk was requeued",
                )
            else:
                message.ack()
                self.stats.add("chunks_done")
                outcome = {
                    "computed": ticket.computed,
                    "expired": ticket.expired,
                    "cancelled": ticket.cancelled,
                }
                self._event("task-succeeded", message, result=repr(outcome), runtime=time.monotonic() - t0)
            try:
                message, ticket, t0 = self._finished.get_nowait()
            except queue.Empty:
                return

    def _event(self, kind: str, message: Message, **fields: Any) -> None:
        if self._events is None:
            return
        headers = message.headers or {}
        if kind == "task-received":
            fields = {"name": headers.get("task"), "args": "", "kwargs": "", "retries": 0, **fields}
        try:
            self._events.send(kind, uuid=headers.get("id"), **fields)
        except Exception as exc:  # events are for operators; never fail a chunk over them
            log.debug("could not send %s: %r", kind, exc)

    def _on_message(self, body: Any, message: Message) -> None:
        t0 = time.monotonic()
        self._event("task-received", message)
        try:
            args, _, _ = body
            envelope = codec.decode(args[0])
            if not envelope.job_id:
                raise codec.PoisonMessage("bulk envelope without a job id")
        except (codec.PoisonMessage, TypeError, ValueError) as exc:
            self.stats.add("messages_poison")
            log.error("dropping poison bulk message: %s", exc)
            message.reject()
            self._event("task-failed", message, exception=f"poison message: {exc}")
            return
        job_id = envelope.job_id
        if not self.jobs.live([job_id]):
            # Cancelled, ended or expired: nobody wants these items computed.
            self.stats.add("items_cancelled", len(envelope.items))
            message.ack()
            self._event("task-revoked", message, terminated=False, signum=None, expired=False)
            return
        batcher = self.batchers.get((envelope.model, envelope.model_version))
        failures: list[tuple[int, str, bytes]] = []
        valid: list[tuple[envelope_pb2.EnvelopeItem, Any]] = []
        for item in envelope.items:
            if batcher is None:
                error = f"this worker does not serve {envelope.model} v{envelope.model_version}"
                failures.append(_failure(item, error, Reply.STATUS_INTERNAL))
                continue
            try:
                valid.append((item, batcher.cfg.validate(item.input)))
            except InvalidInput as exc:
                failures.append(_failure(item, str(exc), Reply.STATUS_INVALID_INPUT))
        if failures:
            self.jobs.record(job_id, failures)
            self.stats.add("items_failed", len(failures))
        if batcher is None or not valid:
            message.ack()
            self._event("task-succeeded", message, result=repr({"failed": len(failures)}), runtime=0.0)
            return
        ticket = Ticket(len(valid), envelope.enqueued_unix_ns)
        ticket.on_done = lambda: self._finished.put((message, ticket, t0))
        self._inflight += 1
        routing = (message.delivery_info or {}).get("routing_key", "")
        if routing in self._held:
            self._held[routing] += 1
        self._event("task-started", message)
        batcher.submit([Pending(item, array, ticket, job_id) for item, array in valid], bulk=True)


def _failure(item: envelope_pb2.EnvelopeItem, error: str, status: int) -> tuple[int, str, bytes]:
    reply = Reply(request_id=item.request_id, status=status, error=error)  # type: ignore[arg-type]
    return item.job_index, jobs.FAILED, reply.SerializeToString()
