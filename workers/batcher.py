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

Interactive items travel one by one (`Pending`); a bulk chunk travels whole
(`BulkWork`: its inputs as one array) and is cut into row ranges (`BulkSlice`) as
batches take it, so nothing on the bulk path costs Python work per item except
building each result and its cache entry.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import redis

from inferpool import codec, jobs
from inferpool.cache import Cache
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

    def settle(self, outcome: str, n: int = 1) -> None:
        with self._lock:
            setattr(self, outcome, getattr(self, outcome) + n)
            self._left -= n
            finished = self._left == 0
        if finished:
            self._finish()

    def _finish(self) -> None:
        self.done.set()
        if self.on_done is not None:
            self.on_done(self)


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


@dataclass
class BulkSlice:
    """Rows start..stop of a chunk, as one batch takes them."""

    work: BulkWork
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start


# A batch's output: the model's [N, classes] array when the whole batch ran, else row
# by row with None for each row the model failed on.
Rows = np.ndarray | list[np.ndarray | None]


@dataclass
class Computed:
    """One bulk batch through the model: its slices, their output rows in order (None:
    the model failed on it), how long the model took, and when the batch started."""

    live: list[BulkSlice]
    rows: Rows
    compute_s: float
    started_unix_ns: int


Batch = list[Pending] | list[BulkSlice]


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
        self._bulk: deque[BulkSlice] = deque()
        self._bulk_items = 0
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
                                part.work.ticket.settle("failed", part.size)
                        elif not part.ticket.done.is_set():
                            part.ticket.settle("failed")
        finally:
            # Stopping: the results thread writes what was computed, then ends.
            self._computed.put(None)
            self._writer.join()

    def _dropped(self, expired: int, cancelled: int, expired_jobs: set[str]) -> None:
        if expired:
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

    def _drop_dead(self, batch: list[Pending]) -> list[Pending]:
        """Interactive items past their deadline are not computed."""
        now_ns = time.time_ns()
        live: list[Pending] = []
        for p in batch:
            if p.item.deadline_unix_ns and p.item.deadline_unix_ns <= now_ns:
                p.ticket.settle("expired")
            else:
                live.append(p)
        self._dropped(len(batch) - len(live), 0, set())
        return live

    def _drop_dead_bulk(self, batch: list[BulkSlice]) -> list[BulkSlice]:
        """Rows past their deadline, and rows of jobs known to have ended, are not
        computed. A job is known ended from the state its last result write returned
        (JobSink.record), so checking costs no round trip; chunks of jobs that ended
        before this worker took them were dropped by the bulk consumer."""
        now_ns = time.time_ns()
        live: list[BulkSlice] = []
        expired_jobs: set[str] = set()
        expired = cancelled = 0
        for part in batch:
            work = part.work
            if work.job_id in self._ended:
                work.ticket.settle("cancelled", part.size)
                cancelled += part.size
            elif work.deadline_unix_ns and work.deadline_unix_ns <= now_ns:
                expired_jobs.add(work.job_id)
                work.ticket.settle("expired", part.size)
                expired += part.size
            else:
                live.append(part)
        self._dropped(expired, cancelled, expired_jobs)
        return live

    def _job_ended(self, job_id: str) -> None:
        self._ended[job_id] = None
        if len(self._ended) > ENDED_REMEMBERED:
            del self._ended[next(iter(self._ended))]  # the oldest: its chunks are long gone

    def _run(self, x: np.ndarray) -> Rows:
        """Class probabilities per input row; None for a row the model failed on. When the
        batch fails, each row is run alone, so one bad input fails only itself."""
        try:
            return self.runner.run(x)
        except Exception:
            log.exception("model %s v%d failed on a batch of %d", self.cfg.name, self.cfg.version, len(x))
        if len(x) == 1:
            return [None]
        self.stats.add("batches_split")
        rows: list[np.ndarray | None] = []
        for i in range(len(x)):
            try:
                rows.append(self.runner.run(x[i : i + 1])[0])
            except Exception as exc:
                log.warning("model %s v%d failed on one input: %r", self.cfg.name, self.cfg.version, exc)
                rows.append(None)
        return rows

    def _process(self, batch: list[Pending]) -> None:
        """An interactive batch: computed and answered from this thread (a hand-off to
        the results thread would add to every Classify's latency)."""
        started_unix_ns = time.time_ns()
        live = self._drop_dead(batch)
        if not live:
            return
        t0 = time.perf_counter()
        rows = self._run(np.concatenate([p.array for p in live]))
        compute_s = time.perf_counter() - t0
        self._observe(rows, compute_s, ((started_unix_ns - p.ticket.enqueued_unix_ns, 1) for p in live))
        self._answer(live, rows, compute_s, started_unix_ns)

    def _process_bulk(self, batch: list[BulkSlice]) -> None:
        """A bulk batch: computed here, written by the results thread while the model
        runs the next one."""
        started_unix_ns = time.time_ns()
        live = self._drop_dead_bulk(batch)
        if not live:
            return
        t0 = time.perf_counter()
        # A fresh array even for one slice: a chunk's rows are a read-only view of its message.
        rows = self._run(np.concatenate([part.work.rows[part.start : part.stop] for part in live]))
        compute_s = time.perf_counter() - t0
        # Its metrics too are the results thread's: this thread's time is the model's.
        self._computed.put(Computed(live, rows, compute_s, started_unix_ns))

    def _observe(self, rows: Rows, compute_s: float, waits_ns: Iterable[tuple[int, int]]) -> None:
        """Metrics of one batch; `waits_ns` gives (queue wait, items) per group of items
        that waited as long."""
        for wait_ns, n in waits_ns:
            self._m_queue.observe_many(max(0.0, wait_ns / 1e9), n)
        size = len(rows)
        self._m_batch.observe(size)
        self._m_compute.observe(compute_s)
        failed = 0 if isinstance(rows, np.ndarray) else sum(row is None for row in rows)
        if failed < size:
            self.stats.batch(size - failed, compute_s)
            self._m_ok.inc(size - failed)
        if failed:
            self.stats.add("items_failed", failed)
            self._m_failed.inc(failed)

    def _answer(self, live: list[Pending], rows: Rows, compute_s: float, started_unix_ns: int) -> None:
        """The cache entries and replies of an interactive batch, then their tickets."""
        try:
            replies: dict[str, list[bytes]] = defaultdict(list)
            cache_values: dict[str, bytes] = {}
            compute_ms = compute_s * 1000
            for p, row in zip(live, rows, strict=True):
                reply = Reply(
                    request_id=p.item.request_id,
                    queue_ms=max(0.0, (started_unix_ns - p.ticket.enqueued_unix_ns) / 1e6),
                    compute_ms=compute_ms,
                    batch_size=len(live),
                )
                if row is None:
                    reply.status = Reply.STATUS_INTERNAL
                    reply.error = MODEL_FAILED
                else:
                    reply.status = Reply.STATUS_OK
                    scores = codec.scores_bytes(row)  # the cache entry, as bulk writes it
                    reply.scores.MergeFromString(scores)
                    # The key is recomputed here from what was actually computed, never
                    # taken from the message: clients cannot steer what lands in the cache.
                    key = self.cache.keys.input_key(self.cfg, p.item.input.data, p.item.cache_scope)
                    cache_values[key] = scores
                replies[p.item.reply_key].append(reply.SerializeToString())
            # Cache first, and acknowledged: a caller who got its reply and asks again must hit.
            self.cache.set_many(cache_values)
            self.sink.push(replies)
        finally:
            for p, row in zip(live, rows, strict=True):
                p.ticket.settle("computed" if row is not None else "failed")

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
                    self._record(batches)
            except Exception:
                log.exception("writing the results of %d batches of %s failed", len(batches), self.cfg.name)
            if last:
                return

    def _record(self, group: list[Computed]) -> None:
        """The cache entries and job results of computed bulk batches, then their tickets.
        A result holds what GetJob reads: status, scores (or error)."""
        recorded: set[str] = set()
        failed_rows: dict[int, int] = {}  # id(slice) -> its rows the model failed on
        try:
            results: dict[str, list[tuple[int, str, bytes]]] = defaultdict(list)
            cache_values: dict[str, bytes] = {}
            for done in group:
                waits = ((done.started_unix_ns - p.work.ticket.enqueued_unix_ns, p.size) for p in done.live)
                self._observe(done.rows, done.compute_s, waits)
                if isinstance(done.rows, np.ndarray):
                    scores, replies = codec.ok_results(done.rows)
                else:  # the model failed on some rows: row by row, b"" for those
                    scores = [b"" if row is None else codec.scores_bytes(row) for row in done.rows]
                    replies = [
                        codec.ok_reply_bytes(s) if row is not None else b""
                        for row, s in zip(done.rows, scores, strict=True)
                    ]
                at = 0  # the item's row in the batch (slices follow one another)
                for part in done.live:
                    indexes, inputs = part.work.job_indexes, part.work.rows
                    entries = results[part.work.job_id]
                    # Keyed by the bytes the model computed, as input_key keys the request.
                    keys = self.cache.keys.row_keys(
                        self.cfg, inputs[part.start : part.stop], part.work.cache_scope
                    )
                    failed = 0
                    for i, key in zip(range(part.start, part.stop), keys, strict=True):
                        reply = replies[at]
                        if reply:  # an OK reply is never empty
                            cache_values[key] = scores[at]
                            entries.append((indexes[i], jobs.OK, reply))
                        else:
                            entries.append((indexes[i], jobs.FAILED, _MODEL_FAILED))
                            failed += 1
                        at += 1
                    failed_rows[id(part)] = failed
            # Not acknowledged: nobody waits on these entries, and the job's results are the
            # answer. A bulk item counts only once its result is in Redis; its chunk is
            # acknowledged after that (Ticket.on_done), so a crash before this point
            # redelivers it.
            self.cache.set_many(cache_values, wait=False)
            for job_id, entries in results.items():
                _, state = self.jobs.record(job_id, entries)
                recorded.add(job_id)
                if state is not None and state not in jobs.LIVE:
                    self._job_ended(job_id)  # cancelled, ended or gone: drop what is queued
        finally:
            # Every slice settles, whatever failed above: its chunk is acknowledged, or put
            # back on its queue when its results were not written.
            for part in (part for done in group for part in done.live):
                ticket = part.work.ticket
                if part.work.job_id not in recorded:
                    ticket.settle("unrecorded", part.size)
                    continue
                failed = failed_rows[id(part)]  # known: results are written after the loop
                if part.size > failed:
                    ticket.settle("computed", part.size - failed)
                if failed:
                    ticket.settle("failed", failed)


MODEL_FAILED = "the model failed on this input"
_MODEL_FAILED = Reply(status=Reply.STATUS_INTERNAL, error=MODEL_FAILED).SerializeToString()
