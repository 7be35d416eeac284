"""Sends a cache miss to the workers and returns its reply: the one call a miss makes.

`Dispatcher.send` owns a miss's whole trip once the cache and the in-process
single-flight are behind it: admission (api.admission), the reply it waits for
(registered before the publish, withdrawn when its caller stops waiting), the publish
(api.publisher, which coalesces concurrent misses into envelopes), the in-flight slot
its envelope holds until its callers stop waiting, and the cross-replica flight lock:
taken in the publish's own round trip, freed when the caller is done, and, when
another replica holds it, polled while this caller waits for that replica's answer
through the cache.

Replies come back on one Redis list per API process. A single task (ReplyListener)
pops them in bulk (BLMPOP) and resolves the future registered under the request's
correlation id, so waiting costs a dict entry, not a thread or a connection.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import redis.asyncio as aioredis
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

from inferpool import tracing
from inferpool.api.admission import Admission
from inferpool.api.brokers import Brokers, brokers
from inferpool.api.front_cache import CacheReader
from inferpool.api.metrics import ModelMetrics
from inferpool.api.publisher import FlightLocks, FlightTaken, Publisher
from inferpool.broker import Reconnect
from inferpool.cache import Cache
from inferpool.errors import BackendUnavailable, DeadlineExceeded
from inferpool.names import flight_key
from inferpool.repository import ModelConfig
from inferpool.v1 import envelope_pb2, tensor_pb2

if TYPE_CHECKING:
    from inferpool.api.core import Counters

log = logging.getLogger(__name__)

Reply = envelope_pb2.Reply

POP_COUNT = 256
BLOCK_S = 1.0


class _Ids:
    """Ids unique across processes and time: 64 random bits drawn once per process,
    then a counter. (os.urandom per id cost a getrandom call each: 13% of a cache
    hit's handler time under load, in py-spy.)"""

    def __init__(self) -> None:
        self.reset()
        # A forked child would otherwise hand out its parent's ids.
        os.register_at_fork(after_in_child=self.reset)

    def reset(self) -> None:
        self.prefix = os.urandom(8).hex()
        self.counter = itertools.count()

    def next(self) -> str:
        return f"{self.prefix}{next(self.counter):016x}"


_IDS = _Ids()


def new_id() -> str:
    """32 hex digits, unique (a random per-process prefix and a counter)."""
    return _IDS.next()


@dataclass(slots=True)
class Miss:
    """One input this process must have computed, as DataPlane.infer hands it over."""

    cfg: ModelConfig
    key: str  # its cache key
    tensor: tensor_pb2.Tensor
    request_id: str  # the caller's own id (logs); the trace travels as traceparent
    cache_scope: str
    meter: ModelMetrics  # the model's metrics, looked up once per request


def deadline_exceeded() -> DeadlineExceeded:
    return DeadlineExceeded("no result before the deadline")


class Dispatcher:
    def __init__(
        self,
        publisher: Publisher,
        replies: ReplyListener,
        admission: Admission,
        cache: Cache,
        cache_reads: CacheReader,
        counters: Counters,
        flight_locks: FlightLocks | None = None,
    ) -> None:
        self.publisher = publisher
        self.replies = replies
        self.admission = admission
        self.cache = cache  # whether the key's Memcached node is up: followers of another replica read it
        self.cache_reads = cache_reads
        self.counters = counters
        # Where identical misses across API replicas agree on one leader (None: only
        # within this process).
        self.flight_locks = flight_locks

    async def send(self, miss: Miss, deadline: float) -> envelope_pb2.Reply:
        """The worker's reply to `miss` by `deadline` (the loop's clock), or a domain
        error: DeadlineExceeded, Overloaded (admission), BackendUnavailable.

        Single-flight across API replicas: a short Redis lock per cache key, taken as
        the miss is published, names the replica that computes; the others wait for the
        cache entry its worker writes, and compute for themselves only if the lock goes
        away without one (leader failed) while their own deadline allows."""
        if self.flight_locks is None or not self.cache.available_for(miss.key):
            return await self._compute(miss, deadline)
        lock = flight_key(miss.key)
        leader = True
        try:
            return await self._compute(miss, deadline, flight=lock)
        except FlightTaken:
            leader = False
        finally:
            if leader:
                # Frees it only if this replica holds it: the caller may have left before
                # its publish, or the publish failed with the lock taken or not.
                self.flight_locks.release(lock, miss.cfg.name)
        return await self._follow(miss, deadline, lock)

    async def _follow(self, miss: Miss, deadline: float, lock: str) -> envelope_pb2.Reply:
        """Waits for another replica's answer to `miss` through the cache."""
        assert self.flight_locks is not None
        self.counters.coalesced_remote += 1
        loop = asyncio.get_running_loop()
        delay_s = 0.002
        while (left := deadline - loop.time()) > 0:
            await asyncio.sleep(min(delay_s, left))
            delay_s = min(delay_s * 2, 0.02)
            # The lock first, then the cache: a leader writes the entry before it frees
            # the lock, so a lock seen gone here means the entry, if any, is readable next
            # (the other order computed again whenever both happened between the reads).
            held = await self.flight_locks.held(lock, miss.cfg.name)
            cached = await self.cache_reads.get(miss.key)
            if cached is not None:
                reply = envelope_pb2.Reply(status=Reply.STATUS_OK, cached=True)
                reply.scores.ParseFromString(cached)
                return reply
            if not held:
                break  # the leader finished without a cache entry, or gave up
        return await self._compute(miss, deadline)

    async def _compute(self, miss: Miss, deadline: float, flight: str = "") -> envelope_pb2.Reply:
        """Publishes `miss` and waits for its reply (FlightTaken: `flight` is another
        replica's, and nothing was published)."""
        budget_s = deadline - asyncio.get_running_loop().time()
        if budget_s <= 0:
            raise deadline_exceeded()
        cfg = miss.cfg
        with tracing.span("inferpool.admission"):
            self.admission.admit(cfg, budget_s)
        admitted_at = time.monotonic()
        # Correlate on our own id: callers' request ids need not be unique.
        correlation = new_id()
        item = envelope_pb2.EnvelopeItem(
            request_id=correlation,
            input=miss.tensor,
            deadline_unix_ns=time.time_ns() + int(budget_s * 1e9),
            reply_key=self.replies.key,
            traceparent=tracing.traceparent(),
            cache_scope=miss.cache_scope,
        )
        published = self.publisher.enqueue(cfg, item, flight)
        waiter = self.replies.expect(correlation, cfg.name)
        answered = False
        inflight = miss.meter.inflight
        inflight.inc()
        t0 = time.perf_counter()
        try:
            async with asyncio.timeout(budget_s):
                # Shielded: on timeout it is withdrawn below instead of cancelled blindly.
                with tracing.span("inferpool.publish") as span:
                    tracing.published(span, await asyncio.shield(published))
                with tracing.span("inferpool.reply_wait"):
                    reply = await waiter
            miss.meter.worker_roundtrip.observe(time.perf_counter() - t0, tracing.exemplar())
            answered = True
            return reply
        except TimeoutError:
            raise deadline_exceeded() from None
        finally:
            inflight.dec()
            self.replies.forget(correlation)
            self.admission.settle(cfg, answered, time.monotonic() - admitted_at, budget_s)
            self.publisher.done_with(published)


def _listening_client(client: aioredis.Redis) -> aioredis.Redis:
    """A client of the listener's own, connected as `client` is (address, credentials,
    TLS), without redis-py's retries: they wait up to a second between attempts, and a
    reply list nobody reads for that second after Redis is back holds every answer."""
    shared = client.connection_pool
    kwargs = {**shared.connection_kwargs, "retry": Retry(NoBackoff(), 0)}
    pool = type(shared)(connection_class=shared.connection_class, max_connections=2, **kwargs)
    return aioredis.Redis(connection_pool=pool)


class ReplyListener:
    """Receives worker replies for this API process and wakes the waiting requests: its
    reply list is popped on every Redis that carries requests (api.brokers), and a lost
    Redis fails only the calls whose replies were to come over it."""

    def __init__(self, client: aioredis.Redis | Brokers, key: str, reconnect_max_s: float = 0.25) -> None:
        self.brokers = brokers(client)
        self.clients = [_listening_client(c) for c in self.brokers.all]
        self._shard = {id(c): i for i, c in enumerate(self.brokers.all)}
        self.key = key
        self.reconnect_max_s = reconnect_max_s
        # request id -> (its future, the index in clients its reply comes over)
        self._waiting: dict[str, tuple[asyncio.Future[envelope_pb2.Reply], int]] = {}
        self.unmatched = 0

    def expect(self, request_id: str, model: str = "") -> asyncio.Future[envelope_pb2.Reply]:
        """Register before publishing, so a fast reply can never arrive unmatched."""
        fut: asyncio.Future[envelope_pb2.Reply] = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = (fut, self._shard[id(self.brokers.of(model))])
        return fut

    def forget(self, request_id: str) -> None:
        self._waiting.pop(request_id, None)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def _dispatch(self, raw: bytes) -> None:
        reply = envelope_pb2.Reply()
        reply.ParseFromString(raw)
        entry = self._waiting.pop(reply.request_id, None)
        if entry is None or entry[0].done():
            # The caller gave up (deadline) before the reply came.
            self.unmatched += 1
            return
        entry[0].set_result(reply)

    async def run(self) -> None:
        if len(self.clients) == 1:
            await self._listen(0)
        else:
            await asyncio.gather(*(self._listen(shard) for shard in range(len(self.clients))))

    async def _listen(self, shard: int) -> None:
        client = self.clients[shard]
        reconnect = Reconnect("reply listener", self.reconnect_max_s, log)
        try:
            while True:
                try:
                    popped = await client.blmpop(BLOCK_S, 1, self.key, direction="LEFT", count=POP_COUNT)
                    reconnect.reset()
                except (RedisError, OSError) as exc:
                    self._fail_all(BackendUnavailable("lost the connection to the reply store"), shard)
                    await asyncio.sleep(reconnect.lost(exc))
                    continue
                if popped:
                    values: list[bytes] = popped[1]  # type: ignore[assignment]  # [key, [value, ...]]
                    for raw in values:
                        try:
                            self._dispatch(raw)
                        except Exception:
                            log.exception("undecodable reply on %s", self.key)
        finally:
            await client.aclose(close_connection_pool=True)

    def _fail_all(self, exc: Exception, shard: int) -> None:
        failing = [rid for rid, (_, on) in self._waiting.items() if on == shard]
        for rid in failing:
            fut = self._waiting.pop(rid)[0]
            if not fut.done():
                fut.set_exception(exc)
