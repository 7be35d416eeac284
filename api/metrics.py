"""Prometheus metrics of the front service (prometheus-client), on their own registry.

Names follow Triton and Ray Serve (`<project>_<what>_<unit>`, counters end in
`_total`); the README's operator section lists them. The API is one asyncio
process, so the plain registry is exact; a scrape runs on the HTTP server's own
thread, never on the event loop.

The queue collector lives here, not on the workers: the API is up while workers
are scaled to zero, which is exactly when an autoscaler must still read the backlog.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Iterator, Sequence
from wsgiref.simple_server import WSGIServer

import redis
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from redis.backoff import NoBackoff
from redis.retry import Retry

from inferpool import metrics as shared

log = logging.getLogger(__name__)

REGISTRY = shared.new_registry()


REQUESTS = Counter(
    "inferpool_requests",
    "RPCs answered, by method (Classify, ...) and gRPC status code (OK, INVALID_ARGUMENT, "
    "NOT_FOUND, DEADLINE_EXCEEDED, UNAVAILABLE, RESOURCE_EXHAUSTED, INTERNAL, ...); a streaming "
    "call is counted when its stream ends. Recorded by api/status.py's interceptor.",
    ["rpc", "code"],
    registry=REGISTRY,
)
REQUEST_DURATION = Histogram(
    "inferpool_request_duration_seconds",
    "Server-side time from an RPC's arrival to its answer, by method and status code.",
    ["rpc", "code"],
    buckets=shared.LATENCY_BUCKETS,
    registry=REGISTRY,
)
HTTP_REQUESTS = Counter(
    "inferpool_http_requests",
    "HTTP requests answered, by route template (/v2/models/{model}/infer, ...; 'unmatched' for "
    "paths no route serves) and HTTP status code. Recorded by api/http/app.py.",
    ["route", "code"],
    registry=REGISTRY,
)
HTTP_REQUEST_DURATION = Histogram(
    "inferpool_http_request_duration_seconds",
    "Server-side time from an HTTP request's head to the end of its answer, by route and status code.",
    ["route", "code"],
    buckets=shared.LATENCY_BUCKETS,
    registry=REGISTRY,
)
CACHE_HITS = Counter(
    "inferpool_cache_hits",
    "Requests answered from Memcached without touching a worker.",
    ["model"],
    registry=REGISTRY,
)
LOCAL_CACHE_HITS = Counter(
    "inferpool_local_cache_hits",
    "Of inferpool_cache_hits, those answered from the API process's own LRU (no Memcached round trip).",
    ["model"],
    registry=REGISTRY,
)
CACHE_MISSES = Counter(
    "inferpool_cache_misses",
    "Requests not found in Memcached (a cache error or timeout counts as a miss); each went to a worker.",
    ["model"],
    registry=REGISTRY,
)
CACHE_AVAILABLE = Gauge(
    "inferpool_cache_available",
    "1 while Memcached answers; 0 while this API process treats it as down (degraded: every "
    "lookup is a miss and goes to a worker, health stays SERVING).",
    registry=REGISTRY,
)
DEADLINE_EXCEEDED = Counter(
    "inferpool_deadline_exceeded",
    "Requests answered DEADLINE_EXCEEDED because no worker reply came before the caller's deadline.",
    ["model"],
    registry=REGISTRY,
)
WORKER_ROUNDTRIP = Histogram(
    "inferpool_worker_roundtrip_seconds",
    "For a cache miss: from handing it to the publisher to its worker reply (coalescing, queue, "
    "batch, reply list). Minus inferpool_queue_duration_seconds and compute, it is transport.",
    ["model"],
    buckets=shared.LATENCY_BUCKETS,
    registry=REGISTRY,
)
INFLIGHT = Gauge(
    "inferpool_inflight_requests",
    "Cache misses of this API process waiting for a worker reply now.",
    ["model"],
    registry=REGISTRY,
)
ENVELOPE_ITEMS = Histogram(
    "inferpool_envelope_items",
    "Requests per published queue message (envelope): _count is messages published, _sum the "
    "requests they carried; a mean above 1 means misses are being coalesced under load.",
    ["model"],
    buckets=shared.SIZE_BUCKETS,
    registry=REGISTRY,
)
SHED = Counter(
    "inferpool_shed",
    "Inference calls refused RESOURCE_EXHAUSTED at the door, before any cache lookup or validation, "
    "by reason: loop_lag (the event loop ran behind), spent (the call waited in gRPC's and the "
    "loop's queues until too little of its deadline was left).",
    ["reason"],
    registry=REGISTRY,
)
PUBLISH_FAILURES = Counter(
    "inferpool_publish_failures",
    "Envelopes that could not be put on the broker; their requests were answered UNAVAILABLE.",
    ["model"],
    registry=REGISTRY,
)
JOBS = Counter(
    "inferpool_jobs",
    "Bulk jobs that entered each state (QUEUED on submit, CANCELLED on cancel, ...) through this "
    "API process; summed with the workers' series it gives jobs by state.",
    ["model", "state"],
    registry=REGISTRY,
)

# kombu's Redis transport splits a queue into one list per priority step (0, 3, 6, 9)
# named "<queue>\x06\x16<step>"; step 0 is the queue's own name.
PRIORITY_STEPS = (0, 3, 6, 9)
PRIORITY_SEP = "\x06\x16"


def priority_lists(queue: str, steps: Sequence[int] = PRIORITY_STEPS, prefix: str = "") -> list[str]:
    """The Redis lists that hold a queue's ready messages, one per priority step."""
    return [f"{prefix}{queue}{PRIORITY_SEP}{step}" if step else f"{prefix}{queue}" for step in steps]


class QueueDepth(Collector):
    """Reads the broker at scrape time, in one pipelined round trip of O(1) calls:

    - `inferpool_queue_messages{queue}`: LLEN over each queue's priority lists;
    - `inferpool_broker_unacked_messages`: HLEN of kombu's `unacked` hash, all queues;
    - `inferpool_backlog_messages`: the two added, the pool's true backlog;
    - `inferpool_broker_up`: whether the broker answered.

    Per-queue reserved counts come from each worker (`inferpool_worker_reserved_messages`):
    finding them here would mean reading every unacked message body (see workers/metrics.py).
    """

    NAMES = (
        "inferpool_broker_up",
        "inferpool_queue_messages",
        "inferpool_broker_unacked_messages",
        "inferpool_backlog_messages",
    )

    def __init__(
        self,
        client: redis.Redis,
        queues: Iterable[str],
        key_prefix: str = "",
        priority_steps: Sequence[int] = PRIORITY_STEPS,
        shards: Sequence[tuple[redis.Redis, Iterable[str]]] = (),
    ) -> None:
        # (client, its queues): the main broker's, then each shard's (inferpool.shards);
        # the gauges add them up, and the broker is up only while all of them answer.
        self.groups = [(client, sorted(set(queues))), *((c, sorted(set(q))) for c, q in shards)]
        self.queues = [queue for _, queues in self.groups for queue in queues]
        self.key_prefix = key_prefix
        self.priority_steps = tuple(priority_steps)

    def describe(self) -> Iterator[GaugeMetricFamily]:
        # Lets the registry learn the names without a Redis round trip at register time.
        for name in self.NAMES:
            yield GaugeMetricFamily(name, "")

    def collect(self) -> Iterator[GaugeMetricFamily]:
        up = GaugeMetricFamily(
            "inferpool_broker_up",
            "1 when the last scrape could read the broker (each Redis of the shard map), else 0.",
        )
        try:
            lengths, unacked = [], 0
            for client, queues in self.groups:
                pipe = client.pipeline(transaction=False)
                for queue in queues:
                    for key in priority_lists(queue, self.priority_steps, self.key_prefix):
                        pipe.llen(key)
                pipe.hlen(f"{self.key_prefix}unacked")
                *ready_lengths, group_unacked = pipe.execute()
                lengths += ready_lengths
                unacked += group_unacked
        except redis.RedisError as exc:
            log.debug("queue depth scrape failed: %r", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        ready = GaugeMetricFamily(
            "inferpool_queue_messages",
            "Messages waiting in a queue's Redis lists (all priority steps), not yet taken by any "
            "worker: what KEDA's redis trigger reads.",
            labels=["queue"],
        )
        n = len(self.priority_steps)
        for i, queue in enumerate(self.queues):
            ready.add_metric([queue], sum(lengths[i * n : (i + 1) * n]))
        yield ready
        yield GaugeMetricFamily(
            "inferpool_broker_unacked_messages",
            "Messages delivered to workers and not acknowledged, all queues together (kombu's unacked "
            "hash): prefetched and not started, bulk chunks in progress, and those of a worker that "
            "died, until the visibility timeout restores them.",
            value=unacked,
        )
        yield GaugeMetricFamily(
            "inferpool_backlog_messages",
            "The pool's true backlog, all queues: inferpool_queue_messages summed plus "
            "inferpool_broker_unacked_messages. LLEN alone under-reads it by every worker's prefetch.",
            value=sum(lengths) + unacked,
        )


def register_queue_depth(
    redis_url: str,
    queues: Iterable[str],
    registry: CollectorRegistry = REGISTRY,
    shards: Sequence[tuple[str, Iterable[str]]] = (),
) -> QueueDepth:
    """Adds a QueueDepth collector with its own clients (one per broker URL: the main
    one, then each shard's with its queues): short timeouts and no retries, so a scrape
    reports the broker down instead of hanging on it, and blocking calls, because
    scrapes run on the HTTP server's thread, not the event loop."""

    def client(url: str) -> redis.Redis:
        return redis.Redis.from_url(
            url, socket_timeout=1.0, socket_connect_timeout=1.0, retry=Retry(NoBackoff(), 0)
        )

    collector = QueueDepth(client(redis_url), queues, shards=[(client(url), q) for url, q in shards])
    registry.register(collector)
    return collector


def serve(port: int, host: str = "127.0.0.1") -> tuple[WSGIServer, threading.Thread]:
    """Serves GET /metrics for REGISTRY on a daemon thread (port 0 picks a free one:
    `server.server_port`). Loopback by default: widen it only where the scraper runs."""
    return shared.serve(REGISTRY, port, host)


class ModelMetrics:
    """One model's labelled children of the per-model series, bound once (labels() takes
    a lock and builds a key on every call: a few per request add up on the hot path)."""

    def __init__(self, model: str) -> None:
        self.cache_hits = CACHE_HITS.labels(model)
        self.local_cache_hits = LOCAL_CACHE_HITS.labels(model)
        self.cache_misses = CACHE_MISSES.labels(model)
        self.inflight = INFLIGHT.labels(model)
        self.worker_roundtrip = WORKER_ROUNDTRIP.labels(model)
        self.deadline_exceeded = DEADLINE_EXCEEDED.labels(model)


_MODEL_METRICS: dict[str, ModelMetrics] = {}


def for_model(model: str) -> ModelMetrics:
    found = _MODEL_METRICS.get(model)
    if found is None:
        found = _MODEL_METRICS[model] = ModelMetrics(model)
    return found
