"""The worker's Celery app: one task per model, feeding that model's batchers.

A message is submitted to its batcher from Celery's consumer thread when it can be
(`_admit`, through workers/strategy.py), else on a pool thread (`handle`); either way
at most `worker_concurrency` envelopes are in the batchers at once (`_slots`).

Importing this module reads the model repository's configs (cheap, no torch).
Weights are loaded and warmed up once the worker starts (`worker_init`), so
`celery -A workers.app inspect ...` stays light.
"""

from __future__ import annotations

import functools
import logging
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import redis
from celery import signals
from celery.exceptions import Reject
from celery.worker import state as worker_state
from celery.worker.control import Panel, inspect_command
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry

from inferpool import codec
from inferpool.broker import defer_unacked_while, make_celery
from inferpool.cache import Cache, key_secret
from inferpool.errors import InvalidInput
from inferpool.heap import freeze_startup_heap
from inferpool.names import DEAD_LETTER_MAX, dead_letter_key, queue_name, task_name
from inferpool.repository import ModelConfig, Repository
from inferpool.settings import Settings, SettingsError
from inferpool.v1 import envelope_pb2
from workers import metrics
from workers.batcher import Batcher, Pending, Ticket
from workers.bulk import BulkConsumer
from workers.sinks import JobSink, ReplySink
from workers.stats import STATS
from workers.strategy import inline_or_stock

log = logging.getLogger("inferpool.worker")


def _checked(settings: Settings) -> Settings:
    """What the worker needs of its settings beyond each one's own check."""
    if settings.bulk_lease_renew_s * 2 > settings.bulk_lease_s:
        # One late renewal must not make a live worker look dead.
        raise SettingsError(
            f"invalid inferpool settings:\n  INFERPOOL_BULK_LEASE_RENEW_S={settings.bulk_lease_renew_s}: "
            f"must be at most half of INFERPOOL_BULK_LEASE_S={settings.bulk_lease_s}"
        )
    return settings


settings = _checked(Settings.from_env())
key_secret(settings)  # a missing cache key secret stops start-up here, before Celery starts
repository = Repository.load(settings.model_repository)
app = make_celery(settings, main="inferpool-worker")


class Runtime:
    """What a running worker holds: a batcher (and model) per model version."""

    def __init__(
        self,
        settings: Settings,
        repository: Repository,
        hostname: str | None = None,
        task_events: bool = False,
    ) -> None:
        from workers.runtime import ModelRunner, configure_threads, pick_device

        threads = configure_threads(settings.torch_threads)
        device = pick_device(settings.device)
        log.info("torch on %s with %d intra-op threads", device, threads)
        self.cache = Cache.from_settings(settings)
        # Replies and result writes may be repeated (a reply nobody waits for any more is
        # dropped, results are written once per index): redis-py's retries stay, at the
        # reconnect pace of the rest of the worker instead of its default (up to 1 s apart).
        retry = Retry(ExponentialWithJitterBackoff(cap=settings.redis_reconnect_max_s, base=0.01), 10)
        client = redis.Redis.from_url(
            settings.redis_url, socket_timeout=5.0, socket_connect_timeout=2.0, retry=retry
        )
        self.sink = ReplySink(client, settings.reply_ttl_s)
        self.jobs = JobSink(client)
        self.batchers: dict[tuple[str, int], Batcher] = {}
        for cfg in repository.all():
            runner = ModelRunner(cfg, device)
            warm_s = runner.warm_up()
            log.info("loaded %s v%d on %s (warm-up %.2fs)", cfg.name, cfg.version, device, warm_s)
            batcher = Batcher(cfg, runner, self.sink, self.jobs, self.cache, STATS)
            batcher.start()
            self.batchers[cfg.name, cfg.version] = batcher
        self.bulk = BulkConsumer(
            app,
            settings.redis_url,
            self.batchers,
            self.jobs,
            STATS,
            settings.bulk_prefetch_chunks,
            lease_s=settings.bulk_lease_s,
            renew_s=settings.bulk_lease_renew_s,
            reconnect_max_s=settings.redis_reconnect_max_s,
            hostname=hostname,
            task_events=task_events,
        )
        self.bulk.start()

    def stop(self) -> None:
        # Bulk first: it lets the batchers finish the chunks it holds before they stop.
        self.bulk.stop()
        self.bulk.join(timeout=self.bulk.drain_s + 5)
        for b in self.batchers.values():
            b.stop()
        for b in self.batchers.values():
            b.join(timeout=5)
        self.cache.close()


_runtime: Runtime | None = None
_runtime_ready = threading.Event()

# Inspection and task-event switches are all Flower and the operators need; the rest
# (shutdown, pool_restart, cancel_consumer, revoke, ...) would let anyone who can
# publish on the broker stop or starve the pool. Costly inspections go too.
_COSTLY_INSPECTIONS = frozenset({"objgraph", "memdump", "memsample"})


def restrict_remote_control(allowed: frozenset[str]) -> list[str]:
    """Removes from Celery's control panel every control command not in `allowed`
    ('all': Celery's whole set) and the costly inspections; returns what it removed."""
    if "all" in allowed:
        return []
    removed = [
        name
        for name, meta in Panel.meta.items()
        if (meta.type == "control" and name not in allowed) or name in _COSTLY_INSPECTIONS
    ]
    for name in removed:
        Panel.data.pop(name, None)
        Panel.meta.pop(name, None)
    return removed


@signals.worker_init.connect
def _start_runtime(sender: Any = None, **_: Any) -> None:
    global _runtime
    # The worker's threads hand each request on several times (consumer, task thread when
    # the consumer declines it, batcher); with the default 5 ms GIL switch interval each
    # handoff can wait behind a thread decoding a bulk chunk. 0.5 ms keeps interactive
    # latency low under bulk load.
    sys.setswitchinterval(0.0005)
    # A message delivered while a pool thread is free starts at once: kombu's unacked
    # bookkeeping for it (two Redis round trips) is deferred, and skipped if it did.
    removed = restrict_remote_control(frozenset(settings.worker_control_commands.split(",")))
    if removed:
        log.info("remote control: %d Celery commands off (INFERPOOL_WORKER_CONTROL_COMMANDS)", len(removed))
    concurrency = settings.worker_concurrency
    defer_unacked_while(lambda: len(worker_state.reserved_requests) < concurrency)
    # The sender is the WorkController: whether it sends task events (-E), and the
    # hostname that ties the bulk consumer's events to this worker.
    _runtime = Runtime(
        settings, repository, getattr(sender, "hostname", None), bool(getattr(sender, "task_events", False))
    )
    _runtime_ready.set()


@signals.worker_ready.connect
def _follow_task_events(sender: Any = None, **_: Any) -> None:
    # The sender is the Consumer: its dispatcher's groups change when Flower (or
    # `celery control enable_events`) turns task events on or off at runtime.
    dispatcher = getattr(sender, "event_dispatcher", None)
    if _runtime is not None and dispatcher is not None:
        _runtime.bulk.follow_events(dispatcher)


@signals.worker_ready.connect
def _freeze_heap(**_: Any) -> None:
    # Models loaded, consumer connected: what exists now lives as long as the worker.
    freeze_startup_heap()


@signals.worker_shutdown.connect
def _stop_runtime(**_: Any) -> None:
    if _runtime is not None:
        _runtime.stop()


@signals.task_revoked.connect
def _count_expired(expired: bool = False, **_: Any) -> None:
    # Celery discards messages whose `expires` (the caller's deadline) passed before
    # they were executed; count them so "not computed" is observable.
    if expired:
        STATS.add("messages_expired")


@inspect_command()
def inferpool_stats(state: Any) -> dict[str, Any]:
    """`celery inspect inferpool_stats`: the counters in workers/stats.py."""
    return STATS.snapshot()


def _reject(
    item: envelope_pb2.EnvelopeItem, error: str, status: int = envelope_pb2.Reply.STATUS_INVALID_INPUT
) -> tuple[str, bytes]:
    reply = envelope_pb2.Reply(request_id=item.request_id, status=status, error=error)  # type: ignore[arg-type]
    return item.reply_key, reply.SerializeToString()


def _submit(
    batcher: Batcher, envelope: envelope_pb2.Envelope, on_done: Callable[[Ticket], None] | None = None
) -> tuple[Ticket, list[Pending]]:
    """Validates an envelope's items, answers those that fail, and hands the rest to the
    batcher; on_done(ticket) runs once every item is answered or dropped."""
    assert _runtime is not None
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
            _runtime.sink.push(rejected)
            invalid = sum(len(v) for v in rejected.values())
            STATS.add("items_failed", invalid)
            metrics.DROPPED.labels(cfg.name, "invalid").inc(invalid)
        ticket = Ticket(len(accepted), envelope.enqueued_unix_ns, on_done=on_done)
        pending = [Pending(item, array, ticket) for item, array in accepted]
        batcher.submit(pending)
    finally:
        batcher.arriving(-1)
    return ticket, pending


def _settled(ticket: Ticket) -> bool:
    """Whether a message counts as a success: the model failed on none, or not on all, of its items."""
    return ticket.count == 0 or ticket.failed < ticket.count


# Envelopes a worker holds in its batchers at once, whichever path they took: the consumer
# thread (workers/strategy.py) takes a slot without waiting, a pool thread waits for one.
_slots = threading.BoundedSemaphore(settings.worker_concurrency)
_inline_lock = threading.Lock()
_inline_held: Counter[str] = Counter()  # per queue, for inferpool_worker_active_messages


def _admit(model: str, message: Any, ack: Callable[[], None]) -> bool:
    """Runs on Celery's consumer thread (workers/strategy.py): takes a message whose
    envelope this worker can batch now and submits it, or declines it to Celery's pool."""
    runtime = _runtime
    # Requests reserved for the pool (waiting for a thread or a slot) go first: a message
    # taken here ahead of them would jump the queue.
    if runtime is None or worker_state.reserved_requests or not _slots.acquire(blocking=False):
        return False
    try:
        envelope = codec.decode(message.decode()[0][0])
        batcher = runtime.batchers.get((model, envelope.model_version))
    except Exception:
        batcher = None  # poison, or another serializer: the pool path dead-letters it
    if batcher is None or envelope.model != model:
        _slots.release()
        return False
    queue = queue_name(model)
    name = task_name(model)
    once = threading.Lock()

    def done(ticket: Ticket | None) -> None:
        if not once.acquire(blocking=False):
            return  # the batcher finished a ticket whose submit then raised
        with _inline_lock:
            _inline_held[queue] -= 1
        _slots.release()
        ok = ticket is not None and _settled(ticket)
        metrics.TASKS.labels(name, "succeeded" if ok else "failed").inc()

    with _inline_lock:
        _inline_held[queue] += 1
    # What Celery's task_accepted counts (`celery inspect stats`: total).
    worker_state.total_count[name] += 1
    worker_state.all_total_count[0] += 1
    STATS.add("messages_inline")
    ack()
    try:
        _submit(batcher, envelope, on_done=done)
    except Exception:
        # Acknowledged already, as Celery would have before running the task: its callers
        # time out at their deadlines.
        log.exception("submitting a message for %s failed", model)
        done(None)
    return True


def inline_held(queue: str) -> int:
    with _inline_lock:
        return _inline_held[queue]


def handle(model: str, body: bytes) -> dict[str, int]:
    """Runs one queue message on a pool thread: decode, hand the items to the batcher, wait."""
    if not _runtime_ready.wait(timeout=60):
        raise RuntimeError("worker runtime did not start")
    assert _runtime is not None
    try:
        envelope = codec.decode(body)
        if envelope.model != model:
            raise codec.PoisonMessage(f"envelope for {envelope.model!r} on the {model!r} task")
    except codec.PoisonMessage as exc:
        STATS.add("messages_poison")
        log.error("dead-lettering poison message on %s: %s", model, exc)
        dead = dead_letter_key(queue_name(model))
        try:
            pipe = _runtime.sink.client.pipeline()
            pipe.lpush(dead, body)
            pipe.ltrim(dead, 0, DEAD_LETTER_MAX - 1)
            pipe.execute()
        except redis.RedisError:
            log.exception("could not dead-letter a poison message on %s", model)
        # Rejected, not returned: Celery (and Flower) must not show it as a success.
        raise Reject(str(exc), requeue=False) from exc
    batcher = _runtime.batchers.get((model, envelope.model_version))
    if batcher is None:
        # A worker deployed with another repository than the API: answer rather than
        # let the callers wait out their deadlines.
        error = f"worker {socket.gethostname()} does not serve {model} v{envelope.model_version}"
        log.error(error)
        replies: dict[str, list[bytes]] = {}
        for item in envelope.items:
            key, value = _reject(item, error, envelope_pb2.Reply.STATUS_INTERNAL)
            replies.setdefault(key, []).append(value)
        _runtime.sink.push(replies)
        STATS.add("items_failed", len(envelope.items))
        return {"items": len(envelope.items), "failed": len(envelope.items)}
    latest_ns = max((item.deadline_unix_ns for item in envelope.items), default=0)
    left_s = max(0.0, (latest_ns - time.time_ns()) / 1e9)
    # A slot frees when a held envelope is answered. Not getting one within the callers'
    # deadlines means they have passed: the batcher drops the items as expired.
    slot = _slots.acquire(timeout=left_s)
    # Bounded: every item's deadline is at most this far away, plus one batch.
    wait_s = left_s + 5.0
    try:
        ticket, pending = _submit(batcher, envelope)
        if not ticket.done.wait(timeout=wait_s):
            # A task shown as SUCCESS must have succeeded: this one did not finish.
            raise TimeoutError(f"batch for {model} did not settle within {wait_s:.1f}s")
    finally:
        if slot:
            _slots.release()
    if not _settled(ticket):
        raise RuntimeError(f"the model failed on all {len(pending)} items of this message")
    return {
        "items": len(envelope.items),
        "computed": ticket.computed,
        "expired": ticket.expired,
        "failed": ticket.failed + len(envelope.items) - len(pending),
    }


def _register(model: str) -> None:
    def classify(body: bytes) -> dict[str, int]:
        return handle(model, body)

    classify.__name__ = classify.__qualname__ = f"classify_{model}"
    app.task(
        name=task_name(model),
        ignore_result=True,
        acks_late=False,
        # A partial, not a function: Celery reads it off the task class, where a function
        # would become a bound method.
        Strategy=functools.partial(inline_or_stock, admit=functools.partial(_admit, model)),
    )(classify)
    queue = queue_name(model)
    metrics.HELD.add_source(queue, reserved=lambda: 0, active=lambda: inline_held(queue))


for _name in repository.names:
    _register(_name)
