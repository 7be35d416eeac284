"""`inferpool-api`: the grpc.aio server with health and reflection."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import uuid

import grpc
import redis.asyncio as aioredis
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from inferpool import logs, tracing
from inferpool.api import auth, kserve, metrics, status
from inferpool.api.admission import Admission, LoopLag, SheddingInterceptor
from inferpool.api.brokers import Brokers
from inferpool.api.core import DataPlane
from inferpool.api.dispatcher import ReplyListener
from inferpool.api.front_cache import CacheReader, LocalCache
from inferpool.api.http.app import HttpFront
from inferpool.api.job_servicer import JobServicer
from inferpool.api.jobs import JobPlane
from inferpool.api.publisher import FlightLocks, Publisher
from inferpool.api.servicer import InferenceServicer
from inferpool.broker import make_celery
from inferpool.cache import Cache
from inferpool.heap import freeze_startup_heap, keep_large_buffers
from inferpool.names import bulk_queue_name, queue_name, reply_key
from inferpool.repository import Repository, RepositoryError
from inferpool.settings import Settings, SettingsError
from inferpool.shards import brokers_by_url
from inferpool.v1 import inference_pb2, inference_pb2_grpc, jobs_pb2, jobs_pb2_grpc

log = logging.getLogger("inferpool.api")
# How long past its grace the server, and then its background tasks, may take to stop.
STOP_OVERRUN_S = 5.0

SERVICE = inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name
JOB_SERVICE = jobs_pb2.DESCRIPTOR.services_by_name["JobService"].full_name


class ApiServer:
    """Owns the server and its background tasks; start() binds, stop() drains."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # First, so a bad tokens file or certificate (SettingsError) stops start-up
        # before anything connects.
        self.credentials = auth.server_credentials(settings)
        # Authentication outermost, so an unauthenticated call is refused before anything
        # else looks at it; the status interceptor then wraps every registered method.
        interceptors = [
            *auth.interceptors(settings),
            status.StatusInterceptor(
                counted_services=(SERVICE, JOB_SERVICE, kserve.SERVICE), access_log=settings.access_log
            ),
        ]
        self.repository = Repository.load(settings.model_repository)
        self.instance = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.redis = aioredis.Redis.from_url(
            settings.redis_url, socket_connect_timeout=1.0, health_check_interval=10
        )
        self.cache = Cache.from_settings(settings)
        self.cache_reads = CacheReader(self.cache)
        # Each model's requests on its own Redis when INFERPOOL_BROKER_SHARDS says so.
        self.brokers = Brokers.from_settings(settings, self.redis)
        self.replies = ReplyListener(self.brokers, reply_key(self.instance), settings.redis_reconnect_max_s)
        flight_locks = FlightLocks(self.brokers, self.replies.key)
        self.publisher = Publisher(
            make_celery(settings, main="inferpool-api"),
            self.brokers,
            settings.max_inflight_envelopes,
            settings.coalesce_window_ms,
            settings.max_envelope_items,
            flight_locks,
        )
        self.loop_lag = LoopLag()
        self.admission = Admission(settings.admit_share, settings.shed_loop_lag_ms / 1000, self.loop_lag)
        self.plane = DataPlane(
            self.repository,
            self.cache,
            self.cache_reads,
            self.publisher,
            self.replies,
            settings.default_deadline_ms,
            flight_locks=flight_locks,
            # Only where results may be cached at all: no Memcached configured, no caching.
            local_cache=LocalCache(
                settings.local_cache_items if self.cache.enabled else 0, settings.cache_ttl_s
            ),
            admission=self.admission,
        )
        self.jobs = JobPlane(
            self.plane,
            self.redis,
            settings.job_ttl_s,
            settings.bulk_chunk_items,
            settings.max_job_items,
            upload_idle_timeout_s=settings.upload_idle_timeout_s,
            upload_max_duration_s=settings.upload_max_duration_s,
            max_uploads_per_caller=settings.max_uploads_per_caller,
            max_uploads=settings.max_uploads,
            watch_max_duration_s=settings.watch_max_duration_s,
        )
        self.health = health.aio.HealthServicer()
        # Inner to auth: a caller without credentials is told so, not that we are busy.
        shedding = SheddingInterceptor(
            self.admission, frozenset({f"/{SERVICE}/Classify", f"/{kserve.SERVICE}/ModelInfer"})
        )
        self.server = grpc.aio.server(
            interceptors=[*interceptors, shedding],
            # Calls past the bound are refused by gRPC before any handler or queue sees
            # them: cheaper, and sooner, than letting them wait out their deadlines.
            maximum_concurrent_rpcs=settings.max_concurrent_rpcs or None,
            options=[
                ("grpc.max_receive_message_length", settings.max_message_bytes),
                ("grpc.max_send_message_length", settings.max_message_bytes),
                ("grpc.so_reuseport", 0),
                # Every connection, and so every stream on it (health Watch included),
                # ends in bounded time; a client that vanished is found by keepalive.
                ("grpc.max_connection_age_ms", int(settings.max_connection_age_s * 1000)),
                ("grpc.max_connection_age_grace_ms", int(settings.max_connection_age_grace_s * 1000)),
                ("grpc.keepalive_time_ms", int(settings.keepalive_time_s * 1000)),
                ("grpc.keepalive_timeout_ms", int(settings.keepalive_timeout_s * 1000)),
                ("grpc.keepalive_permit_without_calls", 1),
                (
                    "grpc.http2.min_ping_interval_without_data_ms",
                    int(settings.min_client_ping_interval_s * 1000),
                ),
                ("grpc.http2.max_ping_strikes", 2),
            ],
        )
        inference_pb2_grpc.add_InferenceServiceServicer_to_server(InferenceServicer(self.plane), self.server)
        jobs_pb2_grpc.add_JobServiceServicer_to_server(JobServicer(self.jobs), self.server)
        # The KServe v2 / Open Inference Protocol service, for Triton and KServe clients.
        kserve.add_to_server(self.server, self.plane, self.health)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (
                SERVICE,
                JOB_SERVICE,
                kserve.SERVICE,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            self.server,
        )
        self._tasks: list[asyncio.Task[None]] = []
        self.port = 0
        # The HTTP front (api/http/), on its own port, over the same planes, auth and health.
        self.http = HttpFront(self, interceptors) if settings.http_port else None
        self.http_port = 0

    async def start(self) -> int:
        address = f"{self.settings.grpc_host}:{self.settings.grpc_port}"
        if self.credentials is not None:
            self.port = self.server.add_secure_port(address, self.credentials)
        else:
            self.port = self.server.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"could not bind {self.settings.grpc_host}:{self.settings.grpc_port}")
        await self._probe_once()
        self._tasks = [
            asyncio.create_task(self.replies.run(), name="replies"),
            asyncio.create_task(self._probe_forever(), name="health-probe"),
            asyncio.create_task(self.loop_lag.run(), name="loop-lag"),
        ]
        await self.server.start()
        if self.http is not None:
            self.http_port = await self.http.start()
        log.info(
            "serving %s on %s:%d (models: %s)",
            SERVICE,
            self.settings.grpc_host,
            self.port,
            ", ".join(self.repository.names),
        )
        return self.port

    async def _probe_once(self) -> bool:
        try:
            async with asyncio.timeout(1.0):
                await self.redis.ping()
            ok = True
        except Exception:
            ok = False
        status = health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING
        # "" is the whole server, as grpc_health_probe and Kubernetes ask for it.
        await self.health.set("", status)
        await self.health.set(SERVICE, status)
        await self.health.set(JOB_SERVICE, status)
        await self.health.set(kserve.SERVICE, status)
        return ok

    async def _probe_forever(self) -> None:
        was_ok = True
        while True:
            await asyncio.sleep(self.settings.health_interval_s)
            ok = await self._probe_once()
            if ok != was_ok:
                log.warning(
                    "redis %s; health %s", "back" if ok else "unreachable", "SERVING" if ok else "NOT_SERVING"
                )
                was_ok = ok

    async def drain(self, drain_s: float, cut: asyncio.Event | None = None) -> None:
        """NOT_SERVING now, for good, while calls are still served for `drain_s` (or until
        `cut` is set): health-checking load balancers and clients stop sending here
        before this replica refuses anything."""
        await self.health.enter_graceful_shutdown()
        if drain_s > 0:
            log.info("draining: health NOT_SERVING, still serving for %g s", drain_s)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for((cut or asyncio.Event()).wait(), drain_s)

    async def stop(self, grace_s: float = 5.0) -> None:
        # Readiness goes first, so load balancers stop sending before we refuse.
        await self.health.enter_graceful_shutdown()
        if self.http is not None:
            await self.http.stop()
        try:
            # grpc.aio's stop can wait for ever on a streaming call cancelled mid-flight
            # (grpc/grpc#28999): a stopping replica must still exit.
            async with asyncio.timeout(grace_s + STOP_OVERRUN_S):
                await self.server.stop(grace_s)
        except TimeoutError:
            log.warning("gRPC server not stopped %g s after its grace; closing anyway", STOP_OVERRUN_S)
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            done, _ = await asyncio.wait(self._tasks, timeout=STOP_OVERRUN_S)
            for task in done:
                if not task.cancelled() and task.exception() is not None:
                    log.error("%s ended with %r", task.get_name(), task.exception())
        self.cache.close()
        try:
            async with asyncio.timeout(STOP_OVERRUN_S):
                await self.cache_reads.close()
                await self.brokers.close()
                await self.redis.aclose()
        except TimeoutError:
            log.warning("connections not closed within %g s; the exit closes them", STOP_OVERRUN_S)


async def serve(settings: Settings) -> None:
    server = ApiServer(settings)
    # Process-wide (one registry per process), so not in ApiServer: tests run several.
    if settings.metrics_port:
        # Each model's queue read on the Redis that carries it; bulk queues on the main one.
        groups = brokers_by_url(settings, server.repository.names)
        queues = [q for n in groups.pop(settings.redis_url) for q in (queue_name(n), bulk_queue_name(n))]
        queues += [bulk_queue_name(n) for models in groups.values() for n in models]
        shards = [(url, [queue_name(n) for n in models]) for url, models in groups.items()]
        metrics.register_queue_depth(settings.redis_url, queues, shards=shards)
        metrics.CACHE_AVAILABLE.set_function(lambda: float(server.cache.available))
        metrics.serve(settings.metrics_port, settings.metrics_host)
    tracing.setup(tracing.API_SERVICE)
    await server.start()
    freeze_startup_heap()
    stop, cut = asyncio.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        # The first signal drains; a second one ends the drain early.
        loop.add_signal_handler(sig, lambda: cut.set() if stop.is_set() else stop.set())
    await stop.wait()
    log.info("shutting down")
    await server.drain(settings.drain_s, cut)
    await server.stop(settings.shutdown_grace_s)
    tracing.shutdown()


def main() -> None:
    keep_large_buffers()
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        sys.exit(str(exc))
    logs.configure(settings.log_format)
    try:
        try:
            import uvloop
        except ImportError:
            asyncio.run(serve(settings))
        else:
            uvloop.run(serve(settings))
    except (RepositoryError, SettingsError) as exc:  # raised by ApiServer before anything is bound
        sys.exit(str(exc))


if __name__ == "__main__":
    main()
