"""Prometheus metrics of a worker process (prometheus-client), on their own registry.

Names follow Triton and Ray Serve (`<project>_<what>_<unit>`, counters end in
`_total`); the README's operator section lists them. The worker runs Celery's
threads pool, so one process holds every metric and the plain registry is exact.
A prefork pool would need prometheus-client's multiprocess mode instead
(`PROMETHEUS_MULTIPROC_DIR`, `MultiProcessCollector`, `mark_process_dead` on
child exit), because each forked child would otherwise count on its own copy.

`install()` wires what Celery reports by itself (task outcomes, reserved and
active messages); the batcher and the bulk consumer observe the rest through the
metric objects below.
"""

from __future__ import annotations

import bisect
import logging
import threading
from collections import Counter as Tally
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from wsgiref.simple_server import WSGIServer

import prometheus_client
from celery import Celery, signals
from celery.worker import state as worker_state
from prometheus_client import Counter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from inferpool import metrics as shared

log = logging.getLogger(__name__)

REGISTRY = shared.new_registry()


class Histogram(prometheus_client.Histogram):
    """prometheus-client's Histogram, plus `observe_many`: the items of a bulk slice all
    waited as long, and observing each of them cost ~1 us (a tenth of the results
    thread's work per item). The client has no weighted observe (its maintainers point
    to custom collectors, client_python#733 and #1124); this fills the same bucket and
    sum that `count` observe() calls would, a test holds the two equal."""

    def observe_many(self, amount: float, count: int) -> None:
        self._raise_if_not_observable()
        self._sum.inc(amount * count)
        # The first bucket whose upper bound is >= amount, as observe() picks it.
        self._buckets[bisect.bisect_left(self._upper_bounds, amount)].inc(count)


QUEUE_DURATION = Histogram(
    "inferpool_queue_duration_seconds",
    "Time one request waited before compute: from its envelope's publish by the API to the start "
    "of the batch that runs it (Redis list, worker prefetch, batcher). Observed once per item.",
    ["model"],
    buckets=shared.LATENCY_BUCKETS,
    registry=REGISTRY,
)
BATCH_SIZE = Histogram(
    "inferpool_batch_size",
    "Items in one model call (interactive and bulk together). _count is the number of batches.",
    ["model"],
    buckets=shared.SIZE_BUCKETS,
    registry=REGISTRY,
)
COMPUTE_DURATION = Histogram(
    "inferpool_compute_duration_seconds",
    "Wall time of one model call on a whole batch, host-device copies included.",
    ["model"],
    buckets=shared.LATENCY_BUCKETS,
    registry=REGISTRY,
)
COMPUTED = Counter(
    "inferpool_computed_requests",
    "Items that went through a model call, by outcome: ok, or failed (the model raised).",
    ["model", "outcome"],
    registry=REGISTRY,
)
DROPPED = Counter(
    "inferpool_dropped_requests",
    "Items dropped before compute, by reason: expired (the caller's deadline passed while it was "
    "queued), cancelled (its bulk job ended), invalid (rejected by the model's signature).",
    ["model", "reason"],
    registry=REGISTRY,
)
TASKS = Counter(
    "inferpool_tasks",
    "Queue messages (Celery tasks) by final state: succeeded, failed, expired (discarded unseen "
    "because every caller's deadline had passed), revoked, rejected, unknown (no such task).",
    ["task", "state"],
    registry=REGISTRY,
)
INLINE_MESSAGES = Counter(
    "inferpool_inline_messages",
    "Queue messages taken on Celery's consumer thread (nothing for Celery to do for them) instead "
    "of its task pool; they are also counted in inferpool_tasks_total.",
    ["task"],
    registry=REGISTRY,
)
SPLIT_BATCHES = Counter(
    "inferpool_split_batches",
    "Batches the model failed on, run again row by row so that only the failing rows fail.",
    ["model"],
    registry=REGISTRY,
)
JOBS = Counter(
    "inferpool_jobs",
    "Bulk jobs that entered each state (RUNNING, SUCCEEDED, FAILED, CANCELLED, EXPIRED) through "
    "this worker; summed with the API's series it gives jobs by state.",
    ["model", "state"],
    registry=REGISTRY,
)


class HeldMessages(Collector):
    """`inferpool_worker_reserved_messages` and `inferpool_worker_active_messages` per queue,
    read at scrape time from what this worker holds.

    A prefetched message has left the Redis list but waits here for a pool slot, so
    LLEN (what KEDA's redis trigger reads) misses it; reserved plus the list length is
    the true backlog. Reading kombu's `unacked` hash instead would find the same
    messages broker-side, but its values are whole message bodies: measured on one
    worker's prefetch window of 32 full envelopes, HVALS cost 2 ms of Redis time and
    8.6 MB on the wire per scrape, and 40 ms blocking with ten workers.
    """

    def __init__(self) -> None:
        # Queues always exported (0 when idle), so sums and dashboards see every queue.
        self.queues: set[str] = set()
        self._extra: dict[str, tuple[Callable[[], int], Callable[[], int] | None]] = {}
        self._lock = threading.Lock()

    def add_source(
        self, queue: str, reserved: Callable[[], int], active: Callable[[], int] | None = None
    ) -> None:
        """Counts for a queue consumed outside Celery's task pool (the bulk consumer):
        `reserved` = received and not started, `active` = being computed."""
        with self._lock:
            self._extra[queue] = (reserved, active)

    def describe(self) -> Iterator[GaugeMetricFamily]:
        for name in ("inferpool_worker_reserved_messages", "inferpool_worker_active_messages"):
            yield GaugeMetricFamily(name, "")

    def collect(self) -> Iterator[GaugeMetricFamily]:
        reserved_by_queue: Tally[str] = Tally()
        active_by_queue: Tally[str] = Tally()
        reserved = _snapshot(worker_state.reserved_requests)
        active = _snapshot(worker_state.active_requests)
        active_ids = {id(r) for r in active}
        for request in reserved:
            if id(request) not in active_ids:
                reserved_by_queue[_queue_of(request)] += 1
        for request in active:
            active_by_queue[_queue_of(request)] += 1
        with self._lock:
            extra = dict(self._extra)
        for queue, (reserved_fn, active_fn) in extra.items():
            reserved_by_queue[queue] += reserved_fn()
            active_by_queue[queue] += active_fn() if active_fn is not None else 0
        r = GaugeMetricFamily(
            "inferpool_worker_reserved_messages",
            "Messages this worker took off a queue (prefetch) and has not started; add them to "
            "inferpool_queue_messages for the true backlog.",
            labels=["queue"],
        )
        a = GaugeMetricFamily(
            "inferpool_worker_active_messages",
            "Messages this worker is running now.",
            labels=["queue"],
        )
        for queue in sorted(set(reserved_by_queue) | set(active_by_queue) | self.queues):
            r.add_metric([queue], reserved_by_queue[queue])
            a.add_metric([queue], active_by_queue[queue])
        yield r
        yield a


def _snapshot(requests: Iterable[Any]) -> list[Any]:
    # Celery's consumer thread adds to these WeakSets while a scrape iterates them.
    for _ in range(5):
        try:
            return list(requests)
        except RuntimeError:
            continue
    return []


def _queue_of(request: Any) -> str:
    info = getattr(request, "delivery_info", None) or {}
    return str(info.get("routing_key") or info.get("exchange") or "unknown")


HELD = HeldMessages()
REGISTRY.register(HELD)

_installed = False


def install(app: Celery, queues: Iterable[str]) -> None:
    """Counts task outcomes from Celery's signals and exports held messages for `queues`
    (always listed, 0 when idle). Idempotent."""
    global _installed
    HELD.queues = set(queues)
    if _installed:
        return
    _installed = True
    signals.task_success.connect(_on_success, weak=False)
    signals.task_failure.connect(_on_failure, weak=False)
    signals.task_revoked.connect(_on_revoked, weak=False)
    signals.task_rejected.connect(_on_rejected, weak=False)
    signals.task_unknown.connect(_on_unknown, weak=False)


def _task_name(sender: Any) -> str:
    return str(getattr(sender, "name", None) or sender or "unknown")


def _on_success(sender: Any = None, **_: Any) -> None:
    TASKS.labels(_task_name(sender), "succeeded").inc()


def _on_failure(sender: Any = None, **_: Any) -> None:
    TASKS.labels(_task_name(sender), "failed").inc()


def _on_revoked(sender: Any = None, expired: bool = False, **_: Any) -> None:
    TASKS.labels(_task_name(sender), "expired" if expired else "revoked").inc()


def _on_rejected(message: Any = None, **_: Any) -> None:
    headers = getattr(message, "headers", None) or {}
    TASKS.labels(str(headers.get("task") or "unknown"), "rejected").inc()


def _on_unknown(name: str | None = None, **_: Any) -> None:
    TASKS.labels(name or "unknown", "unknown").inc()


def serve(port: int, host: str = "127.0.0.1") -> tuple[WSGIServer, threading.Thread]:
    """Serves GET /metrics for REGISTRY on a daemon thread (port 0 picks a free one:
    `server.server_port`). Loopback by default: widen it only where the scraper runs."""
    return shared.serve(REGISTRY, port, host)
