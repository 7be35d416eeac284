"""Per-model micro-batching: merges the items of many envelopes into one model call.

Interactive envelopes arrive from Celery's consumer thread (workers/strategy.py)
or, when it declines them, from its task threads, which hand their items to the
model's batcher and wait; bulk chunks arrive from the bulk consumer. The
batcher thread fills each batch with interactive items first and tops it up with
bulk items, so a waiting Classify is delayed by at most the batch in progress.
It waits up to `max_delay_ms` for more only while other interactive messages for
the model are still being decoded (a lone request is not held back for nothing),
drops items whose deadline passed and items of jobs that were cancelled, and runs
one batch (`RowFallback`: row by row when the batch fails). Its `ResultWriter`
(workers/results.py) writes the cache, every reply and every job result: an
interactive batch's from this thread, bulk batches' from its results thread while
the model runs the next one.

Interactive items travel one by one (`Pending`); a bulk chunk travels whole
(`BulkWork`: its inputs as one array) and is cut into row ranges (`BulkSlice`) as
batches take it, so nothing on the bulk path costs Python work per item except
building each result and its cache entry.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass

import numpy as np
import redis

from inferpool import tracing
from inferpool.cache import Cache
from inferpool.jobs import JobStore
from inferpool.repository import ModelConfig
from inferpool.v1 import envelope_pb2
from inferpool.workers import metrics
from inferpool.workers.results import Computed, EndedJobs, Outcome, ResultWriter, Ticket
from inferpool.workers.runtime import ModelRunner, RowFallback
from inferpool.workers.sinks import ReplySink

log = logging.getLogger(__name__)

# While interactive requests arrived this recently, bulk-only batches hold at most an
# eighth of max_batch_size: a Classify that lands while one runs then waits for a short
# batch, not a full one. With no interactive traffic bulk runs full batches.
INTERACTIVE_RECENT_S = 0.1


@dataclass
class Pending:
    """One interactive item."""

    item: envelope_pb2.EnvelopeItem
    array: np.ndarray  # shape (1, *input_shape)
    ticket: Ticket


@dataclass
class BulkWork:
    """The valid items of one bulk chunk: row i of `rows` is the input of the job's
    item `job_indexes[i]`. `deadline_unix_ns` is their deadline (every item of a job
    has the job's), 0 for none."""

    job_indexes: list[int]
    rows: np.ndarray  # shape (len(job_indexes), *input_shape), the model's input dtype
    ticket: Ticket
    job_id: str
    deadline_unix_ns: int = 0
    cache_scope: str = ""  # the tenant its cache keys are scoped to
    traceparent: str = ""  # the chunk's span, parent of its compute spans ("": not traced)


@dataclass
class BulkSlice:
    """Rows start..stop of a chunk, as one batch takes them."""

    work: BulkWork
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start


Batch = list[Pending] | list[BulkSlice]


class Batcher(threading.Thread):
    """The scheduler of one model version: takes batches, drops dead items, runs the
    model, and hands the rows to its ResultWriter."""

    def __init__(
        self,
        cfg: ModelConfig,
        runner: ModelRunner,
        sink: ReplySink,
        jobs_sink: JobStore,
        cache: Cache,
    ) -> None:
        super().__init__(name=f"batcher-{cfg.name}-{cfg.version}", daemon=True)
        self.cfg = cfg
        self.runner = runner
        self.jobs = jobs_sink
        self.cache = cache
        self._cond = threading.Condition()
        self._interactive: deque[Pending] = deque()
        self._bulk: deque[BulkSlice] = deque()
        self._bulk_items = 0
        self._stopping = False
        self._arriving = 0
        self._last_interactive = -INTERACTIVE_RECENT_S
        self._model = RowFallback(cfg, runner)
        # Filled by the writer from the states its job writes return, and by expiry here.
        self._ended = EndedJobs()
        self._writer = ResultWriter(cfg, sink, jobs_sink, cache, self._ended)
        name = cfg.name
        self._m_expired = metrics.DROPPED.labels(name, "expired")
        self._m_cancelled = metrics.DROPPED.labels(name, "cancelled")

    # -- called from Celery's consumer and task threads and from the bulk consumer
    def arriving(self, delta: int) -> None:
        """A task announces it is decoding a message for this model (+1) or has submitted it (-1)."""
        with self._cond:
            self._arriving += delta
            if self._arriving <= 0:
                # A batch held open for this message closes now, not at max_delay_ms.
                self._cond.notify()

    def submit(self, items: list[Pending]) -> None:
        with self._cond:
            self._interactive.extend(items)
            self._last_interactive = time.monotonic()
            self._cond.notify()

    def submit_bulk(self, work: BulkWork) -> None:
        if not work.job_indexes:
            return
        with self._cond:
            self._bulk.append(BulkSlice(work, 0, len(work.job_indexes)))
            self._bulk_items += len(work.job_indexes)
            self._cond.notify()

    def bulk_backlog(self) -> int:
        return self._bulk_items

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()

    # -- the batcher thread
    def _take(self) -> Batch | None:
        max_n = self.cfg.max_batch_size
        max_delay_s = self.cfg.max_delay_ms / 1000
        with self._cond:
            while not self._interactive and not self._bulk:
                if self._stopping:
                    return None
                self._cond.wait()
            now = time.monotonic()
            interactive_recent = now - self._last_interactive <= INTERACTIVE_RECENT_S
            if interactive_recent and not self._interactive and not self._stopping:
                # Classify traffic is live and only bulk work waits: give the next
                # interactive request up to max_delay_ms of first claim on the model and
                # the CPU, so bulk work runs in the gaps instead of ahead of it.
                self._cond.wait_for(lambda: self._interactive or self._stopping, timeout=max_delay_s)
                now = time.monotonic()
            if not self._interactive:
                # Bulk only: never waits, and never shares a batch with interactive items
                # (which would make the interactive batch slower to compute and answer).
                return self._take_bulk(max(1, max_n // 8) if interactive_recent else max_n)
            batch: list[Pending] = []
            flush_at = now + max_delay_s
            while True:
                while self._interactive and len(batch) < max_n:
                    batch.append(self._interactive.popleft())
                remaining = flush_at - time.monotonic()
                if len(batch) >= max_n or remaining <= 0 or self._arriving <= 0 or self._stopping:
                    return batch
                self._cond.wait(remaining)

    def _take_bulk(self, max_n: int) -> list[BulkSlice]:
        """Up to max_n rows from the chunks in arrival order (the caller holds _cond)."""
        batch: list[BulkSlice] = []
        need = max_n
        while need and self._bulk:
            head = self._bulk[0]
            if head.size <= need:
                batch.append(self._bulk.popleft())
                need -= head.size
            else:
                batch.append(BulkSlice(head.work, head.start, head.start + need))
                head.start += need
                need = 0
        self._bulk_items -= max_n - need
        return batch

    def run(self) -> None:
        self._writer.start()
        try:
            while True:
                batch = self._take()
                if batch is None:
                    return
                try:
                    if isinstance(batch[0], BulkSlice):
                        self._process_bulk(batch)
                    else:
                        self._process(batch)
                except Exception:
                    log.exception("batch for %s failed outside the model", self.cfg.name)
                    for part in batch:
                        if isinstance(part, BulkSlice):
                            if not part.work.ticket.done.is_set():
                                part.work.ticket.settle(Outcome.FAILED, part.size)
                        elif not part.ticket.done.is_set():
                            part.ticket.settle(Outcome.FAILED)
        finally:
            # Stopping: the results thread writes what was computed, then ends.
            self._writer.close()

    def _dropped(self, expired: int, cancelled: int, expired_jobs: set[str]) -> None:
        if expired:
            self._m_expired.inc(expired)
        if cancelled:
            self._m_cancelled.inc(cancelled)
        for job_id in expired_jobs:
            self._ended.add(job_id)
            try:
                self.jobs.expire(job_id)
            except redis.RedisError as exc:
                # Best effort: reading the job ends it by its deadline too (jobs.OBSERVE),
                # and its items here are settled already.
                log.warning("could not mark job %s expired: %r", job_id, exc)

    def _drop_dead(self, batch: list[Pending]) -> list[Pending]:
        """Interactive items past their deadline are not computed."""
        now_ns = time.time_ns()
        live: list[Pending] = []
        for p in batch:
            if p.item.deadline_unix_ns and p.item.deadline_unix_ns <= now_ns:
                tracing.dropped(p.item.traceparent, p.ticket.enqueued_unix_ns, "deadline expired", now_ns)
                p.ticket.settle(Outcome.EXPIRED)
            else:
                live.append(p)
        self._dropped(len(batch) - len(live), 0, set())
        return live

    def _drop_dead_bulk(self, batch: list[BulkSlice]) -> list[BulkSlice]:
        """Rows past their deadline, and rows of jobs known to have ended, are not
        computed. A job is known ended from the state its last result write returned
        (JobStore.record), so checking costs no round trip; chunks of jobs that ended
        before this worker took them were dropped by the bulk consumer."""
        now_ns = time.time_ns()
        live: list[BulkSlice] = []
        expired_jobs: set[str] = set()
        expired = cancelled = 0
        for part in batch:
            work = part.work
            if work.job_id in self._ended:
                work.ticket.settle(Outcome.CANCELLED, part.size)
                cancelled += part.size
            elif work.deadline_unix_ns and work.deadline_unix_ns <= now_ns:
                expired_jobs.add(work.job_id)
                work.ticket.settle(Outcome.EXPIRED, part.size)
                expired += part.size
            else:
                live.append(part)
        self._dropped(expired, cancelled, expired_jobs)
        return live

    def _process(self, batch: list[Pending]) -> None:
        """An interactive batch: computed and answered from this thread (a hand-off to
        the results thread would add to every Classify's latency)."""
        started_unix_ns = time.time_ns()
        live = self._drop_dead(batch)
        if not live:
            return
        with tracing.batch_scope(live, lambda: self._span_attributes(len(live)), started_unix_ns):
            t0 = time.perf_counter()
            with tracing.batch_child("worker.model"):
                rows = self._model.run(np.concatenate([p.array for p in live]))
            self._writer.answer(live, rows, time.perf_counter() - t0, started_unix_ns)

    def _span_attributes(self, size: int) -> dict[str, str | int]:
        return {
            "inferpool.model": self.cfg.name,
            "inferpool.model.version": self.cfg.version,
            "inferpool.batch.size": size,
            "inferpool.device": str(getattr(self.runner, "device", "")),
        }

    def _process_bulk(self, batch: list[BulkSlice]) -> None:
        """A bulk batch: computed here, written by the results thread while the model
        runs the next one."""
        started_unix_ns = time.time_ns()
        live = self._drop_dead_bulk(batch)
        if not live:
            return
        t0 = time.perf_counter()
        # A fresh array even for one slice: a chunk's rows are a read-only view of its message.
        rows = self._model.run(np.concatenate([part.work.rows[part.start : part.stop] for part in live]))
        compute_s = time.perf_counter() - t0
        chunks = (part.work.traceparent for part in live)
        tracing.record_spans("worker.compute", chunks, started_unix_ns, self._span_attributes(len(rows)))
        # Its metrics too are the results thread's: this thread's time is the model's.
        self._writer.put(Computed(live, rows, compute_s, started_unix_ns))
