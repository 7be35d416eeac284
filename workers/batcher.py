"""Per-model micro-batching: merges the items of many envelopes into one model call.

Tasks (one per queue message, on Celery's thread pool) hand their items to the
model's batcher and wait. The batcher thread takes what is queued, waits up to
`max_delay_ms` for more only while other messages for the model are still being
decoded (so a lone request is not held back for nothing), drops items whose
deadline passed, runs one batch, then writes every reply and the cache in bulk.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import redis

from inferpool.cache import Cache, input_key
from inferpool.repository import ModelConfig
from inferpool.v1 import envelope_pb2
from workers.runtime import ModelRunner
from workers.stats import WorkerStats

log = logging.getLogger(__name__)

Reply = envelope_pb2.Reply


@dataclass
class Ticket:
    """The items of one queue message; `done` is set once every item is answered or dropped."""

    count: int
    enqueued_unix_ns: int
    done: threading.Event = field(default_factory=threading.Event)
    computed: int = 0
    expired: int = 0
    failed: int = 0
    _left: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self._left = self.count
        if self.count == 0:
            self.done.set()

    def settle(self, outcome: str) -> None:
        with self._lock:
            setattr(self, outcome, getattr(self, outcome) + 1)
            self._left -= 1
            if self._left == 0:
                self.done.set()


@dataclass
class Pending:
    item: envelope_pb2.EnvelopeItem
    array: np.ndarray  # shape (1, *input_shape)
    ticket: Ticket


class ReplySink:
    """Writes replies to their reply lists, one pipeline per batch."""

    def __init__(self, client: redis.Redis, reply_ttl_s: int) -> None:
        self.client = client
        self.reply_ttl_s = reply_ttl_s

    def push(self, replies: dict[str, list[bytes]]) -> None:
        pipe = self.client.pipeline(transaction=False)
        for key, values in replies.items():
            pipe.rpush(key, *values)
            # The list outlives its API process only by the TTL.
            pipe.expire(key, self.reply_ttl_s)
        pipe.execute()


class Batcher(threading.Thread):
    def __init__(
        self, cfg: ModelConfig, runner: ModelRunner, sink: ReplySink, cache: Cache, stats: WorkerStats
    ) -> None:
        super().__init__(name=f"batcher-{cfg.name}-{cfg.version}", daemon=True)
        self.cfg = cfg
        self.runner = runner
        self.sink = sink
        self.cache = cache
        self.stats = stats
        self._queue: queue.SimpleQueue[Pending | None] = queue.SimpleQueue()
        self._arriving = 0
        self._arriving_lock = threading.Lock()

    # -- called from task threads
    def arriving(self, delta: int) -> None:
        """A task announces it is decoding a message for this model (+1) or has submitted it (-1)."""
        with self._arriving_lock:
            self._arriving += delta

    def submit(self, items: list[Pending]) -> None:
        for p in items:
            self._queue.put(p)

    def stop(self) -> None:
        self._queue.put(None)

    # -- the batcher thread
    def run(self) -> None:
        max_n = self.cfg.max_batch_size
        max_delay_s = self.cfg.max_delay_ms / 1000
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            flush_at = time.monotonic() + max_delay_s
            while len(batch) < max_n:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    remaining = flush_at - time.monotonic()
                    if remaining <= 0 or self._arriving <= 0:
                        break
                    try:
                        nxt = self._queue.get(timeout=remaining)
                    except queue.Empty:
                        break
                if nxt is None:
                    self._process(batch)
                    return
                batch.append(nxt)
            try:
                self._process(batch)
            except Exception:
                log.exception("batch of %d for %s failed outside the model", len(batch), self.cfg.name)
                for p in batch:
                    if not p.ticket.done.is_set():
                        p.ticket.settle("failed")

    def _process(self, batch: list[Pending]) -> None:
        now_ns = time.time_ns()
        live: list[Pending] = []
        for p in batch:
            if p.item.deadline_unix_ns and p.item.deadline_unix_ns <= now_ns:
                p.ticket.settle("expired")
            else:
                live.append(p)
        if len(live) < len(batch):
            self.stats.add("items_expired", len(batch) - len(live))
        if not live:
            return
        replies: dict[str, list[bytes]] = defaultdict(list)
        cache_values: dict[str, bytes] = {}
        t0 = time.perf_counter()
        try:
            probs = self.runner.run(np.concatenate([p.array for p in live]))
            outcome = "computed"
        except Exception:
            log.exception("model %s v%d failed on a batch of %d", self.cfg.name, self.cfg.version, len(live))
            probs = None
            outcome = "failed"
        compute_s = time.perf_counter() - t0
        compute_ms = compute_s * 1000
        for i, p in enumerate(live):
            reply = Reply(
                request_id=p.item.request_id,
                queue_ms=max(0.0, (now_ns - p.ticket.enqueued_unix_ns) / 1e6),
                compute_ms=compute_ms,
                batch_size=len(live),
            )
            if probs is None:
                reply.status = Reply.STATUS_INTERNAL
                reply.error = "model execution failed"
            else:
                reply.status = Reply.STATUS_OK
                reply.scores.values.extend(probs[i].tolist())
                # The key is recomputed here from what was actually computed, never
                # taken from the message: clients cannot steer what lands in the cache.
                key = input_key(self.cfg.name, self.cfg.version, p.item.input)
                cache_values[key] = reply.scores.SerializeToString()
            replies[p.item.reply_key].append(reply.SerializeToString())
        if probs is not None:
            self.stats.batch(len(live), compute_s)
        else:
            self.stats.add("items_failed", len(live))
        # Cache first: a caller who got its reply and asks again must hit.
        self.cache.set_many(cache_values)
        try:
            self.sink.push(replies)
        finally:
            for p in live:
                p.ticket.settle(outcome)
