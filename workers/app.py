"""The worker's Celery app: one task per model, feeding that model's batchers.

`create_app(settings)` builds it: it checks the settings, reads the model
repository's configs (cheap, no torch) and registers one classify task per model,
whose messages go through workers/intake.py. Weights are loaded and warmed up once
the worker starts (`worker_init`, building the `Runtime`), so
`celery -A inferpool.workers.app inspect ...` stays light. Nothing is built at import:
`inferpool.workers.app.app` is made from the environment on first use, for Celery's `-A`.
"""

from __future__ import annotations

import functools
import logging
import sys
from pathlib import Path
from typing import Any

import redis
from celery import Celery, signals
from celery.worker import state as worker_state
from celery.worker.control import Panel, inspect_command
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry

from inferpool import tracing
from inferpool.broker import defer_unacked_while, make_celery
from inferpool.cache import Cache, key_secret
from inferpool.heap import freeze_startup_heap
from inferpool.jobs import JobStore
from inferpool.names import queue_name, task_name
from inferpool.repository import Repository
from inferpool.settings import Settings, SettingsError
from inferpool.shards import worker_broker
from inferpool.workers import metrics, stats
from inferpool.workers.batcher import Batcher
from inferpool.workers.bulk import BulkConsumer
from inferpool.workers.eventflush import TaskEventFlush
from inferpool.workers.intake import Intake
from inferpool.workers.sinks import ReplySink
from inferpool.workers.strategy import inline_or_stock

log = logging.getLogger("inferpool.worker")


def checked(settings: Settings) -> Settings:
    """What the worker needs of its settings beyond each one's own check."""
    if settings.bulk_lease_renew_s * 2 > settings.bulk_lease_s:
        # One late renewal must not make a live worker look dead.
        raise SettingsError(
            f"invalid inferpool settings:\n  INFERPOOL_BULK_LEASE_RENEW_S={settings.bulk_lease_renew_s}: "
            f"must be at most half of INFERPOOL_BULK_LEASE_S={settings.bulk_lease_s}"
        )
    return settings


class Runtime:
    """What a running worker holds: a batcher (and model) per model version."""

    def __init__(
        self,
        settings: Settings,
        repository: Repository,
        app: Celery,
        hostname: str | None = None,
        task_events: bool = False,
    ) -> None:
        from inferpool.workers.backends import LoadOptions, ModelLoadError
        from inferpool.workers.backends.base import usable_cache_dir
        from inferpool.workers.runtime import ModelRunner, configure_threads, needs_torch, pick_device

        use_torch = needs_torch(repository.all())
        threads = configure_threads(settings.torch_threads, use_torch)
        device = pick_device(settings.device, use_torch)
        log.info("models on %s with %d intra-op threads", device, threads)
        options = LoadOptions(usable_cache_dir(settings.compiled_cache_dir), threads)
        self.failed: dict[tuple[str, int], str] = {}
        self.cache = Cache.from_settings(settings)
        # Replies and result writes may be repeated (a reply nobody waits for any more is
        # dropped, results are written once per index): redis-py's retries stay, at the
        # reconnect pace of the rest of the worker instead of its default (up to 1 s apart).
        retry = Retry(ExponentialWithJitterBackoff(cap=settings.redis_reconnect_max_s, base=0.01), 10)
        client = redis.Redis.from_url(
            settings.redis_url, socket_timeout=5.0, socket_connect_timeout=2.0, retry=retry
        )
        # Replies go back on the Redis the requests came from (the models' shard).
        broker = worker_broker(settings, repository.names)
        replies = client
        if broker != settings.redis_url:
            replies = redis.Redis.from_url(
                broker, socket_timeout=5.0, socket_connect_timeout=2.0, retry=retry
            )
        self.sink = ReplySink(replies, settings.reply_ttl_s)
        self.jobs = JobStore(client)
        self.batchers: dict[tuple[str, int], Batcher] = {}
        for cfg in repository.all():
            try:
                runner = ModelRunner(cfg, device, options)
            except ModelLoadError as exc:
                # The other models still serve; this one's messages are answered with an error.
                log.error("not serving: %s", exc)
                self.failed[cfg.name, cfg.version] = str(exc)
                continue
            warm_s = runner.warm_up()
            log.info("loaded %s v%d on %s (warm-up %.2fs)", cfg.name, cfg.version, device, warm_s)
            batcher = Batcher(cfg, runner, self.sink, self.jobs, self.cache)
            batcher.start()
            self.batchers[cfg.name, cfg.version] = batcher
        self.bulk = BulkConsumer(
            app,
            settings.redis_url,
            self.batchers,
            self.jobs,
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


def inferpool_stats(state: Any) -> dict[str, Any]:
    """`celery inspect inferpool_stats`: the worker's counts, read from its Prometheus metrics."""
    return stats.snapshot()


class _Lifecycle:
    """The worker's signal handlers, for one app: Celery's signals are process-wide, so
    each handler first checks that its sender belongs to this app."""

    def __init__(self, settings: Settings, repository: Repository, app: Celery, intake: Intake) -> None:
        self.settings = settings
        self.repository = repository
        self.app = app
        self.intake = intake

    def connect(self) -> None:
        signals.worker_init.connect(self.start_runtime, weak=False)
        signals.worker_ready.connect(self.follow_task_events, weak=False)
        signals.worker_ready.connect(self.freeze_heap, weak=False)
        signals.worker_ready.connect(self.announce_ready, weak=False)
        signals.worker_shutdown.connect(self.stop_runtime, weak=False)

    def _ours(self, sender: Any) -> bool:
        return getattr(sender, "app", None) is self.app

    def start_runtime(self, sender: Any = None, **_: Any) -> None:
        if not self._ours(sender):
            return
        # The worker's threads hand each request on several times (consumer, task thread when
        # the consumer declines it, batcher); with the default 5 ms GIL switch interval each
        # handoff can wait behind a thread decoding a bulk chunk. 0.5 ms keeps interactive
        # latency low under bulk load.
        sys.setswitchinterval(0.0005)
        removed = restrict_remote_control(frozenset(self.settings.worker_control_commands.split(",")))
        if removed:
            log.info(
                "remote control: %d Celery commands off (INFERPOOL_WORKER_CONTROL_COMMANDS)", len(removed)
            )
        # A message delivered while a pool thread is free starts at once: kombu's unacked
        # bookkeeping for it (two Redis round trips) is deferred, and skipped if it did.
        concurrency = self.settings.worker_concurrency
        defer_unacked_while(lambda: len(worker_state.reserved_requests) < concurrency)
        # The sender is the WorkController: whether it sends task events (-E), and the
        # hostname that ties the bulk consumer's events to this worker.
        self.intake.started(
            Runtime(
                self.settings,
                self.repository,
                self.app,
                getattr(sender, "hostname", None),
                bool(getattr(sender, "task_events", False)),
            )
        )

    def follow_task_events(self, sender: Any = None, **_: Any) -> None:
        # The sender is the Consumer: its dispatcher's groups change when Flower (or
        # `celery control enable_events`) turns task events on or off at runtime.
        dispatcher = getattr(sender, "event_dispatcher", None)
        runtime = self.intake.runtime
        if self._ours(sender) and runtime is not None and dispatcher is not None:
            runtime.bulk.follow_events(dispatcher)

    def freeze_heap(self, sender: Any = None, **_: Any) -> None:
        # Models loaded, consumer connected: what exists now lives as long as the worker.
        if self._ours(sender):
            freeze_startup_heap()

    def announce_ready(self, sender: Any = None, **_: Any) -> None:
        # Models warmed up (worker_init built them) and the consumer connected.
        if self._ours(sender) and self.intake.runtime is not None and self.settings.ready_file:
            Path(self.settings.ready_file).write_text("ready\n")

    def stop_runtime(self, sender: Any = None, **_: Any) -> None:
        runtime = self.intake.runtime
        if self._ours(sender) and self.settings.ready_file:
            Path(self.settings.ready_file).unlink(missing_ok=True)
        if self._ours(sender) and runtime is not None:
            runtime.stop()
            tracing.force_flush()  # what the last batches traced


def served_repository(settings: Settings) -> Repository:
    """The models this worker serves: INFERPOOL_WORKER_MODELS of the repository, or all."""
    repository = Repository.load(settings.model_repository)
    if settings.worker_models:
        repository = repository.only(settings.worker_models.split(","))
    return repository


def create_app(settings: Settings, repository: Repository | None = None) -> Celery:
    """The worker's Celery app for these settings and the model repository they name
    (or `repository`). Raises SettingsError or RepositoryError with a clear message."""
    checked(settings)
    key_secret(settings)  # a missing cache key secret stops start-up here, before Celery starts
    if repository is None:
        repository = served_repository(settings)
    # Its models' shard (inferpool.shards); bulk chunks and job records stay on redis_url.
    app = make_celery(settings, main="inferpool-worker", broker_url=worker_broker(settings, repository.names))
    app.steps["consumer"].add(TaskEventFlush.every(settings.task_events_flush_ms))
    intake = Intake(settings.worker_concurrency)
    _Lifecycle(settings, repository, app, intake).connect()
    inspect_command()(inferpool_stats)
    for model in repository.names:
        _register(app, intake, model)
    return app


def _register(app: Celery, intake: Intake, model: str) -> None:
    def classify(body: bytes) -> dict[str, int]:
        return intake.handle(model, body)

    classify.__name__ = classify.__qualname__ = f"classify_{model}"
    app.task(
        name=task_name(model),
        ignore_result=True,
        acks_late=False,
        # A partial, not a function: Celery reads it off the task class, where a function
        # would become a bound method.
        Strategy=functools.partial(inline_or_stock, admit=functools.partial(intake.admit, model)),
    )(classify)
    queue = queue_name(model)
    metrics.HELD.add_source(queue, reserved=lambda: 0, active=lambda: intake.inline_held(queue))


def __getattr__(name: str) -> Any:
    # `celery -A inferpool.workers.app ...` (inspect, control) looks for `app` here.
    if name != "app":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    app = create_app(Settings.from_env())
    globals()["app"] = app
    return app
