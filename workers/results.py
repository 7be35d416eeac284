"""What a batch's items come to, and where their answers go.

Every item a batcher takes settles its message's `Ticket` with one `Outcome`. The
`ResultWriter` turns computed rows into answers: an interactive batch's cache entries
and replies are written from the batcher thread (a hand-off would add to every
Classify's latency); bulk batches go to its results thread (`results-<model>-<version>`),
which writes their cache entries and job results while the model runs the next batch,
so Redis and Memcached round trips do not stall the model.
"""

from __future__ import annotations

import enum
import logging
import queue
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from inferpool import codec, jobs, tracing
from inferpool.cache import Cache
from inferpool.jobs import JobStore
from inferpool.repository import ModelConfig
from inferpool.v1 import envelope_pb2
from inferpool.workers import metrics
from inferpool.workers.sinks import ReplySink

if TYPE_CHECKING:
    from inferpool.workers.batcher import BulkSlice, Pending

log = logging.getLogger(__name__)

Reply = envelope_pb2.Reply

# Bulk batches the model may run ahead of their results being written: enough to keep it
# busy while the results thread waits on Memcached and Redis, few enough that a job
# cancelled mid-way (seen in the state its next result write returns) stops within a
# few batches.
WRITER_DEPTH = 2
# Ended jobs remembered, so items of theirs still queued here are dropped.
ENDED_REMEMBERED = 4096

MODEL_FAILED = "the model failed on this input"
_MODEL_FAILED = Reply(status=Reply.STATUS_INTERNAL, error=MODEL_FAILED).SerializeToString()


class Outcome(enum.Enum):
    """What became of one item."""

    COMPUTED = "computed"
    EXPIRED = "expired"  # its deadline passed before its batch ran
    FAILED = "failed"  # the model (or writing its answer) failed on it
    CANCELLED = "cancelled"  # its job ended before its batch ran
    UNRECORDED = "unrecorded"  # a bulk result that could not be written: the chunk must come back


def _tally(outcome: Outcome) -> property:
    """A ticket's count of items with this outcome, read as an attribute."""
    return property(lambda ticket: ticket._outcomes[outcome])


@dataclass
class Ticket:
    """The items of one queue message; `done` is set (and `on_done(ticket)` called) once
    every item is answered or dropped: at construction when there are none."""

    count: int
    enqueued_unix_ns: int
    on_done: Callable[[Ticket], None] | None = None
    done: threading.Event = field(default_factory=threading.Event)
    _outcomes: Counter[Outcome] = field(default_factory=Counter)
    _left: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self._left = self.count
        if self.count == 0:
            self._finish()

    def settle(self, outcome: Outcome, n: int = 1) -> None:
        with self._lock:
            self._outcomes[outcome] += n
            self._left -= n
            finished = self._left == 0
        if finished:
            self._finish()

    def _finish(self) -> None:
        self.done.set()
        if self.on_done is not None:
            self.on_done(self)

    computed = _tally(Outcome.COMPUTED)
    expired = _tally(Outcome.EXPIRED)
    failed = _tally(Outcome.FAILED)
    cancelled = _tally(Outcome.CANCELLED)
    unrecorded = _tally(Outcome.UNRECORDED)


class EndedJobs:
    """Jobs seen ended (insertion-ordered, bounded): their items still queued are dropped."""

    def __init__(self, limit: int = ENDED_REMEMBERED) -> None:
        self._limit = limit
        self._ids: dict[str, None] = {}

    def add(self, job_id: str) -> None:
        self._ids[job_id] = None
        if len(self._ids) > self._limit:
            del self._ids[next(iter(self._ids))]  # the oldest: its chunks are long gone

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._ids


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


class ResultWriter:
    """Writes one model's computed batches (cache entries, replies, job results), counts
    their outcomes, and settles their tickets."""

    def __init__(
        self,
        cfg: ModelConfig,
        sink: ReplySink,
        jobs_sink: JobStore,
        cache: Cache,
        ended: EndedJobs,
    ) -> None:
        self.cfg = cfg
        self.sink = sink
        self.jobs = jobs_sink
        self.cache = cache
        self.ended = ended
        # Computed bulk batches waiting for the results thread; bounded, so the model
        # runs at most WRITER_DEPTH batches ahead of the writes.
        self._computed: queue.Queue[Computed | None] = queue.Queue(maxsize=WRITER_DEPTH)
        self._thread = threading.Thread(
            target=self._write_results, name=f"results-{cfg.name}-{cfg.version}", daemon=True
        )
        name = cfg.name
        self._m_queue = metrics.QUEUE_DURATION.labels(name)
        self._m_batch = metrics.BATCH_SIZE.labels(name)
        self._m_compute = metrics.COMPUTE_DURATION.labels(name)
        self._m_ok = metrics.COMPUTED.labels(name, "ok")
        self._m_failed = metrics.COMPUTED.labels(name, "failed")

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        """Writes what was handed over, then ends the results thread."""
        self._computed.put(None)
        self._thread.join()

    def put(self, computed: Computed) -> None:
        """Hands a bulk batch to the results thread; blocks while WRITER_DEPTH wait."""
        self._computed.put(computed)

    def _observe(self, rows: Rows, compute_s: float, waits_ns: Iterable[tuple[int, int]]) -> None:
        """Metrics of one batch; `waits_ns` gives (queue wait, items) per group of items
        that waited as long."""
        for wait_ns, n in waits_ns:
            self._m_queue.observe_many(max(0.0, wait_ns / 1e9), n)
        size = len(rows)
        self._m_batch.observe(size)
        self._m_compute.observe(compute_s, tracing.exemplar())
        failed = 0 if isinstance(rows, np.ndarray) else sum(row is None for row in rows)
        if failed < size:
            self._m_ok.inc(size - failed)
        if failed:
            self._m_failed.inc(failed)

    def answer(self, live: list[Pending], rows: Rows, compute_s: float, started_unix_ns: int) -> None:
        """The metrics, cache entries and replies of an interactive batch, then their tickets."""
        self._observe(rows, compute_s, ((started_unix_ns - p.ticket.enqueued_unix_ns, 1) for p in live))
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
            with tracing.batch_child("worker.cache_write"):
                self.cache.set_many(cache_values)
            with tracing.batch_child("worker.reply"):
                self.sink.push(replies)
        finally:
            for p, row in zip(live, rows, strict=True):
                p.ticket.settle(Outcome.COMPUTED if row is not None else Outcome.FAILED)

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
        """The metrics, cache entries and job results of computed bulk batches, then their
        tickets. A result holds what GetJob reads: status, scores (or error)."""
        recorded: set[str] = set()
        failed_rows: dict[int, int] = {}  # id(slice) -> its rows the model failed on
        t0_ns = time.time_ns()
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
                    self.ended.add(job_id)  # cancelled, ended or gone: drop what is queued
            chunks = (part.work.traceparent for done in group for part in done.live)
            tracing.record_spans("worker.result_write", chunks, t0_ns)
        finally:
            # Every slice settles, whatever failed above: its chunk is acknowledged, or put
            # back on its queue when its results were not written.
            for part in (part for done in group for part in done.live):
                ticket = part.work.ticket
                if part.work.job_id not in recorded:
                    ticket.settle(Outcome.UNRECORDED, part.size)
                    continue
                failed = failed_rows[id(part)]  # known: results are written after the loop
                if part.size > failed:
                    ticket.settle(Outcome.COMPUTED, part.size - failed)
                if failed:
                    ticket.settle(Outcome.FAILED, failed)
