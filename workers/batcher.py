"""Per-model micro-batching: merges the items of many envelopes into one model call.

Interactive envelopes arrive from Celery's consumer thread (workers/strategy.py)
or, when it declines them, from its task threads, which hand their items to the
model's batcher and wait; bulk chunks arrive from the bulk consumer. The
batcher thread fills each batch with interactive items first and tops it up with
bulk items, so a waiting Classify is delayed by at most the batch in progress.
It waits up to `max_delay_ms` for more only while other interactive messages for
the model are still being decoded (a lone request is not held back for nothing),
drops items whose deadline passed and items of jobs that were cancelled, runs one
batch, then writes the cache, every reply and every job result in bulk. Bulk batches
are written by a second thread (`results-<model>-<version>`) while the model runs the
next one: Redis and Memcached round trips no longer stall the model.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import redis

from inferpool import jobs
from inferpool.cache import Cache, input_key
from inferpool.repository import ModelConfig
from inferpool.v1 import envelope_pb2
from workers import metrics
from workers.runtime import ModelRunner
from workers.sinks import JobSink, ReplySink
from workers.stats import WorkerStats

log = logging.getLogger(__name__)

Reply = envelope_pb2.Reply

# While interactive requests arrived this recently, bulk-only batches hold at most an
# eighth of max_batch_size: a Classify that lands while one runs then waits for a short
# batch, not a full one. With no interactive traffic bulk runs full batches.
INTERACTIVE_RECENT_S = 0.1
# Bulk batches the model may run ahead of their results being written: enough to keep it
# busy while the results thread waits on Memcached and Redis, few enough that a job
# cancelled mid-way (seen in the state its next result write returns) stops within a
# few batches.
WRITER_DEPTH = 2
# Ended jobs remembered, so items of theirs still queued here are dropped.
ENDED_REMEMBERED = 4096


@dataclass
class Ticket:
    """The items of one queue message; `done` is set (and `on_done(ticket)` called) once
    every item is answered or dropped: at construction when there are none."""

    count: int
    enqueued_unix_ns: int
    on_done: Callable[[Ticket], None] | None = None
    done: threading.Event = field(default_factory=threading.Event)
    computed: int = 0
    expired: int = 0
    failed: int = 0
    cancelled: int = 0
    unrecorded: int = 0  # bulk results that could not be written: the chunk must come back
    _left: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self._left = self.count
        if self.count == 0:
            self._finish()

    def settle(self, outcome: str) -> None:
        with self._lock:
            setattr(self, outcome, getattr(self, outcome) + 1)
            self._left -= 1
            finished = self._left == 0
        if finished:
            self._finish()

    def _finish(self) -> None:
        self.done.set()
        if self.on_done is not None:
            self.on_done(self)


@dataclass
class Pending:
    item: envelope_pb2.EnvelopeItem
    array: np.ndarray  # shape (1, *input_shape)
    ticket: Ticket
    job_id: str = ""  # set on bulk items


@dataclass
class Computed:
    """One batch through the model: its items, their rows (None: the model failed on
    it), how long the model took, and when the batch started (wall clock, for queue_ms)."""

    live: list[Pending]
    rows: list[np.ndarray | None]
    compute_s: float
    started_unix_ns: int


class Batcher(threading.Thread):
    def __init__(
        self,
        cfg: ModelConfig,
        runner: ModelRunner,
        sink: ReplySink,
        jobs_sink: JobSink,
        cache: Cache,
        stats: WorkerStats,
    ) -> None:
        super().__init__(name=f"batcher-{cfg.name}-{cfg.version}", daemon=True)
        self.cfg = cfg
        self.runner = runner
        self.sink = sink
        self.jobs = jobs_sink
        self.cache = cache
        self.stats = stats
        self._cond = threading.Condition()
        self._interactive: deque[Pending] = deque()
        self._bulk: deque[Pending] = deque()
        self._stopping = False
        self._arriving = 0
        self._last_interactive = -INTERACTIVE_RECENT_S
        # Computed bulk batches waiting for the results thread; bounded, so the model
        # runs at most WRITER_DEPTH batches ahead of the writes.
        self._computed: queue.Queue[Computed | None] = queue.Queue(maxsize=WRITER_DEPTH)
        self._writer = threading.Thread(
            target=self._write_results, name=f"results-{cfg.name}-{cfg.version}", daemon=True
        )
        # Jobs seen ended (insertion-ordered, bounded): their queued items are dropped.
        self._ended: dict[str, None] = {}
        name = cfg.name
        self._m_queue = metrics.QUEUE_DURATION.labels(name)
        self._m_batch = metrics.BATCH_SIZE.labels(name)
        self._m_compute = metrics.COMPUTE_DURATION.labels(name)
        self._m_ok = metrics.COMPUTED.labels(name, "ok")
        self._m_failed = metrics.COMPUTED.labels(name, "failed")
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

    def submit(self, items: list[Pending], bulk: bool = False) -> None:
        with self._cond:
            if bulk:
                self._bulk.extend(items)
            else:
                self._interactive.extend(items)
                self._last_interactive = time.monotonic()
            self._cond.notify()

    def bulk_backlog(self) -> int:
        return len(self._bulk)

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()

    # -- the batcher thread
    def _take(self) -> list[Pending] | None:
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
                bulk_max = max(1, max_n // 8) if interactive_recent else max_n
                return [self._bulk.popleft() for _ in range(min(bulk_max, len(self._bulk)))]
            batch: list[Pending] = []
            flush_at = now + max_delay_s
            while True:
                while self._interactive and len(batch) < max_n:
                    batch.append(self._interactive.popleft())
                remaining = flush_at - time.monotonic()
                if len(batch) >= max_n or remaining <= 0 or self._arriving <= 0 or self._stopping:
                    return batch
                self._cond.wait(remaining)

    def run(self) -> None:
        self._writer.start()
        try:
            while True:
                batch = self._take()
                if batch is None:
                    return
                try:
                    self._process(batch)
                except Exception:
                    log.exception("batch of %d for %s failed outside the model", len(batch), self.cfg.name)
                    for p in batch:
                        if not p.ticket.done.is_set():
                            p.ticket.settle("failed")
        finally:
            # Stopping: the results thread writes what was computed, then ends.
            self._computed.put(None)
            self._writer.join()

    def _drop_dead(self, batch: list[Pending]) -> list[Pending]:
        """Items past their deadline, and bulk items of jobs known to have ended, are not
        computed. A job is known ended from the state its last result write returned
        (JobSink.record), so checking costs no round trip; chunks of jobs that ended
        before this worker took them were dropped by the bulk consumer."""
        now_ns = time.time_ns()
        live: list[Pending] = []
        expired_jobs: set[str] = set()
        ended = self._ended
        cancelled = 0
        for p in batch:
            if p.job_id and p.job_id in ended:
                p.ticket.settle("cancelled")
                cancelled += 1
            elif p.item.deadline_unix_ns and p.item.deadline_unix_ns <= now_ns:
                if p.job_id:
                    expired_jobs.add(p.job_id)
                p.ticket.settle("expired")
            else:
                live.append(p)
        if expired := len(batch) - len(live) - cancelled:
            self.stats.add("items_expired", expired)
            self._m_expired.inc(expired)
        if cancelled:
            self.stats.add("items_cancelled", cancelled)
            self._m_cancelled.inc(cancelled)
        for job_id in expired_jobs:
            self._job_ended(job_id)
            try:
                self.jobs.expire(job_id)
            except redis.RedisError as exc:
                # Best effort: reading the job ends it by its deadline too (jobs.OBSERVE),
                # and its items here are settled already.
                log.warning("could not mark job %s expired: %r", job_id, exc)
        return live

    def _job_ended(self, job_id: str) -> None:
        self._ended[job_id] = None
        if len(self._ended) > ENDED_REMEMBERED:
            del self._ended[next(iter(self._ended))]  # the oldest: its chunks are long gone

    def _run(self, live: list[Pending]) -> list[np.ndarray | None]:
        """Class probabilities per item; None for an item the model failed on. When the
        batch fails, each item is run alone, so one bad input fails only itself."""
        try:
            return list(self.runner.run(np.concatenate([p.array for p in live])))
        except Exception:
            log.exception("model %s v%d failed on a batch of %d", self.cfg.name, self.cfg.version, len(live))
        if len(live) == 1:
            return [None]
        self.stats.add("batches_split")
        rows: list[np.ndarray | None] = []
        for p in live:
            try:
                rows.append(self.runner.run(p.array)[0])
            except Exception as exc:
                log.warning("model %s v%d failed on one input: %r", self.cfg.name, self.cfg.version, exc)
                rows.append(None)
        return rows

    def _process(self, batch: list[Pending]) -> None:
        started_unix_ns = time.time_ns()
        live = self._drop_dead(batch)
        if not live:
            return
        t0 = time.perf_counter()
        rows = self._run(live)
        done = Computed(live, rows, time.perf_counter() - t0, started_unix_ns)
        self._observe(done)
        # A batch is all bulk or all interactive (_take).
        if live[0].job_id:
            # The results thread writes them while the model runs the next batch.
            self._computed.put(done)
        else:
            # Answered from here: a thread hand-off would add to every Classify's latency.
            self._write([done])

    def _observe(self, done: Computed) -> None:
        size = len(done.live)
        for p in done.live:
            self._m_queue.observe(max(0.0, (done.started_unix_ns - p.ticket.enqueued_unix_ns) / 1e9))
        self._m_batch.observe(size)
        self._m_compute.observe(done.compute_s)
        failed = sum(row is None for row in done.rows)
        if failed < size:
            self.stats.batch(size - failed, done.compute_s)
            self._m_ok.inc(size - failed)
        if failed:
            self.stats.add("items_failed", failed)
            self._m_failed.inc(failed)

    def _write_results(self) -> None:
        """The results thread: writes computed bulk batches, several per round trip when
        the model got ahead of it."""
        while True:
            group = [self._computed.get()]
            while group[-1] is not None:
                try:
                    group.append(self._computed.get_nowait())
                except queue.Empty:
                    break
            last = group[-1] is None
            batches = [done for done in group if done is not None]
            try:
                if batches:
                    self._write(batches)
            except Exception:
                log.exception("writing the results of %d batches of %s failed", len(batches), self.cfg.name)
            if last:
                return

    def _write(self, group: list[Computed]) -> None:
        """The cache entries, replies and job results of computed batches, then their tickets."""
        recorded: set[str] = set()
        try:
            replies: dict[str, list[bytes]] = defaultdict(list)
            results: dict[str, list[tuple[int, str, bytes]]] = defaultdict(list)
            cache_values: dict[str, bytes] = {}
            for done in group:
                compute_ms = done.compute_s * 1000
                size = len(done.live)
                for p, row in zip(done.live, done.rows, strict=True):
                    reply = Reply(
                        request_id=p.item.request_id,
                        queue_ms=max(0.0, (done.started_unix_ns - p.ticket.enqueued_unix_ns) / 1e6),
                        compute_ms=compute_ms,
                        batch_size=size,
                    )
                    if row is None:
                        reply.status = Reply.STATUS_INTERNAL
                        reply.error = "the model failed on this input"
                    else:
                        reply.status = Reply.STATUS_OK
                        reply.scores.values.extend(row.tolist())
                        # The key is recomputed here from what was actually computed, never
                        # taken from the message: clients cannot steer what lands in the cache.
                        key = input_key(self.cfg.name, self.cfg.version, p.item.input)
                        cache_values[key] = reply.scores.SerializeToString()
                    if p.job_id:
                        kind = jobs.OK if row is not None else jobs.FAILED
                        results[p.job_id].append((p.item.job_index, kind, reply.SerializeToString()))
                    else:
                        replies[p.item.reply_key].append(reply.SerializeToString())
            # Cache first: a caller who got its reply and asks again must hit.
            self.cache.set_many(cache_values)
            # A bulk item counts only once its result is in Redis; its chunk is acknowledged
            # after that (Ticket.on_done), so a crash before this point redelivers it.
            for job_id, entries in results.items():
                _, state = self.jobs.record(job_id, entries)
                recorded.add(job_id)
                if state is not None and state not in jobs.LIVE:
                    self._job_ended(job_id)  # cancelled, ended or gone: drop what is queued
            if replies:
                self.sink.push(replies)
        finally:
            for done in group:
                for p, row in zip(done.live, done.rows, strict=True):
                    if p.job_id and p.job_id not in recorded:
                        p.ticket.settle("unrecorded")
                    else:
                        p.ticket.settle("computed" if row is not None else "failed")
