"""Publishes cache misses to the model queues, coalescing concurrent misses.

Per model version, at most `max_inflight` envelopes are outstanding (published,
not yet answered) from this process. A miss goes out at once while fewer are in
flight; otherwise it waits for one to be answered and leaves with every other miss
that queued up meanwhile, in one envelope (one broker message) of up to
`max_batch_size` items. A full envelope never waits. So an idle system adds no
delay, and a busy one pays the per-message broker cost once per batch instead of
once per request: the backlog accumulates here as batches, not in Redis as single
messages. Envelopes ready together leave in one pipelined round trip from the event
loop, as Celery task messages (inferpool.taskwire) that workers consume unchanged. A
miss that carries a cross-replica flight lock (api.publisher.FlightLocks) takes it in that same round
trip; one whose lock another replica holds is left out and its envelope pushed again
without it.

Flight locks (FlightLocks): each miss has a short lock on its cache key (SET NX PX)
naming the replica that computes it. Taking it in a round trip of its own would cost
every miss a Redis round trip before its publish (~0.15 ms of a lone miss's ~2.8 ms,
measured), so the locks of an envelope's items are taken and the envelope pushed in one
script call: the message is pushed only if every lock was free. Releases are batched
per loop iteration and delete only locks this replica still owns. When to take, free
and poll a lock is api.dispatcher's decision.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from celery import Celery
from redis.asyncio.client import Pipeline
from redis.exceptions import RedisError

from inferpool import codec
from inferpool.api import metrics
from inferpool.api.brokers import Brokers, brokers
from inferpool.codec import ENVELOPE_VERSION
from inferpool.errors import BackendUnavailable
from inferpool.names import queue_name, task_name
from inferpool.repository import ModelConfig
from inferpool.taskwire import task_payload
from inferpool.v1 import envelope_pb2

log = logging.getLogger(__name__)

# A publish that Redis does not confirm within this fails its callers with UNAVAILABLE
# (the redis client's own reconnect retries could otherwise hold them to their deadline).
PUBLISH_TIMEOUT_S = 2.0


# KEYS: the queue, then the items' locks. ARGV: the message, the owner, then each lock's
# ttl in ms. Returns 1 (taken) or 0 (held by another) per lock; pushes only if all were 1.
_CLAIM_AND_PUSH = """
local taken, all = {}, true
for i = 2, #KEYS do
  if redis.call('SET', KEYS[i], ARGV[2], 'NX', 'PX', ARGV[i + 1]) then
    taken[i - 1] = 1
  else
    taken[i - 1] = 0
    all = false
  end
end
if all then redis.call('LPUSH', KEYS[1], ARGV[1]) end
return taken
"""

# KEYS: locks. ARGV: the owner. A lock that expired and was taken by another replica
# since is not ours to free.
_RELEASE = """
local freed = 0
for _, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[1] then freed = freed + redis.call('DEL', key) end
end
return freed
"""


class FlightTaken(Exception):
    """Another replica holds this miss's lock: it computes, this caller waits for it."""


class FlightLocks:
    def __init__(self, client: aioredis.Redis | Brokers, owner: str) -> None:
        # A model's locks live on its model's Redis, beside the queue they are pushed with.
        self.brokers = brokers(client)
        self.owner = owner  # the lock's value: which replica computes (for operators, and release)
        self._releasing: dict[int, tuple[aioredis.Redis, list[str]]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def claim_and_push(
        self, pipe: Pipeline, queue: str, message: bytes, locks: Sequence[tuple[str, int]]
    ) -> None:
        """Queues on `pipe`: take each (key, ttl_ms) lock for this replica and push
        `message` onto `queue` only if all were free. Its result is a 1/0 list, per lock."""
        pipe.eval(
            _CLAIM_AND_PUSH,
            1 + len(locks),
            queue,
            *(key for key, _ in locks),
            message,
            self.owner,
            *(max(1, ttl_ms) for _, ttl_ms in locks),
        )

    def release(self, key: str, model: str = "") -> None:
        """Frees `key`, a lock of `model`'s, soon if this replica holds it, without
        waiting: a lock left behind expires by itself."""
        if not self._releasing:
            task = asyncio.get_running_loop().create_task(self._flush_release())
            # The loop keeps only weak references to tasks.
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        client = self.brokers.of(model)
        self._releasing.setdefault(id(client), (client, []))[1].append(key)

    async def held(self, key: str, model: str = "") -> bool:
        return bool(await self.brokers.of(model).exists(key))

    async def _flush_release(self) -> None:
        # Runs once the current loop iteration is over: every release() it made joins.
        await asyncio.sleep(0)
        releasing, self._releasing = self._releasing, {}
        for client, keys in releasing.values():
            try:
                await client.eval(_RELEASE, len(keys), *keys, self.owner)
            except (OSError, RedisError) as exc:
                log.debug("could not free %d flight locks (they expire by themselves): %r", len(keys), exc)


class Published:
    """One published envelope; each of its requests releases it once when done waiting."""

    def __init__(self, group: _Group, count: int, publisher: Publisher, nbytes: int = 0) -> None:
        self._group = group
        self._left = count
        self._publisher = publisher
        self.items = count  # the envelope's, for its callers' trace spans
        self.nbytes = nbytes

    def release(self) -> None:
        self._left -= 1
        if self._left == 0:
            self._group.inflight -= 1
            self._publisher._kick(self._group)


# One queued miss: its item, the future its caller awaits the publish on, and the flight
# lock to take for it ("": none).
_Entry = tuple[envelope_pb2.EnvelopeItem, asyncio.Future[Published], str]


@dataclass
class _Group:
    cfg: ModelConfig
    # A deque: under overload thousands may wait, and each leaves from the front.
    pending: deque[_Entry] = field(default_factory=deque)
    inflight: int = 0
    flushing: bool = False


class Publisher:
    def __init__(
        self,
        celery: Celery | None,
        broker: aioredis.Redis | Brokers | None,
        max_inflight: int = 1,
        coalesce_window_ms: float = 0.0,
        max_envelope_items: int = 0,
        flights: FlightLocks | None = None,
    ) -> None:
        self.celery = celery  # builds the task messages (no I/O)
        # Each model's envelopes go to its model's Redis (api.brokers).
        self.brokers = None if broker is None else brokers(broker)
        self.flights = flights
        # 0: up to the model's max_batch_size. 1 turns coalescing off (one message per
        # miss), the naive queue path the benchmarks compare against.
        self.max_envelope_items = max_envelope_items
        self.max_inflight = max_inflight
        self.window_s = coalesce_window_ms / 1000
        self._groups: dict[tuple[str, int], _Group] = {}
        self._flushers: set[asyncio.Task[None]] = set()
        self.messages = 0
        self.items = 0

    def enqueue(
        self, cfg: ModelConfig, item: envelope_pb2.EnvelopeItem, flight: str = ""
    ) -> asyncio.Future[Published]:
        """Resolves once the item is on the broker (BackendUnavailable if it cannot be;
        FlightTaken if `flight`, a lock key taken until the item's deadline, is held by
        another replica: the item is then not published). Cancel it to withdraw an item
        that has not left yet. Whether the item may be queued at all is api.admission's
        question, asked before this."""
        group = self._groups.get((cfg.name, cfg.version))
        if group is None:
            group = self._groups[cfg.name, cfg.version] = _Group(cfg)
        done: asyncio.Future[Published] = asyncio.get_running_loop().create_future()
        group.pending.append((item, done, flight))
        self._kick(group)
        return done

    @staticmethod
    def done_with(published: asyncio.Future[Published]) -> None:
        """The caller of `enqueue` stopped waiting (answered or not): its item is withdrawn
        if it has not left yet, or its share of the envelope's in-flight slot is freed."""
        if not published.done():
            published.cancel()
        elif not published.cancelled() and published.exception() is None:
            published.result().release()

    def _envelope_items(self, cfg: ModelConfig) -> int:
        if self.max_envelope_items:
            return min(self.max_envelope_items, cfg.max_batch_size)
        return cfg.max_batch_size

    def _ready(self, group: _Group) -> bool:
        return bool(group.pending) and (
            group.inflight < self.max_inflight or len(group.pending) >= self._envelope_items(group.cfg)
        )

    def _kick(self, group: _Group) -> None:
        if group.flushing or not self._ready(group):
            return
        group.flushing = True
        task = asyncio.get_running_loop().create_task(self._flush(group))
        # The loop keeps only weak references to tasks.
        self._flushers.add(task)
        task.add_done_callback(self._flushers.discard)

    async def _flush(self, group: _Group) -> None:
        try:
            # Let requests that arrived in the same loop iteration (or window) join.
            await asyncio.sleep(self.window_s)
            while self._ready(group):
                batches = self._take(group)
                if batches:
                    await self._publish(group, batches)
        finally:
            group.flushing = False
        self._kick(group)

    def _take(self, group: _Group) -> list[list[_Entry]]:
        """Every envelope that may leave now (each counted in flight), as its items."""
        batches = []
        while self._ready(group):
            take: list[_Entry] = []
            while group.pending and len(take) < self._envelope_items(group.cfg):
                entry = group.pending.popleft()
                if not entry[1].done():  # withdrawn by a caller whose deadline passed
                    take.append(entry)
            if take:
                group.inflight += 1
                batches.append(take)
        return batches

    async def _publish(self, group: _Group, batches: list[list[_Entry]]) -> None:
        # A second pass only for envelopes that lost an item's flight lock.
        while batches:
            pushed = await self._push(group, batches)
            if pushed is None:
                return
            batches = self._published(group, batches, *pushed)

    async def _push(self, group: _Group, batches: list[list[_Entry]]) -> tuple[list[Any], list[int]] | None:
        """One round trip: each envelope's message, and its items' flight locks; the
        results and each envelope's size. None when it failed (its callers were told)."""
        model = group.cfg.name
        try:
            if self.celery is None or self.brokers is None:
                raise RuntimeError("this publisher has no broker")
            pipe = self.brokers.of(model).pipeline(transaction=False)
            queue = queue_name(model)
            now_ns = time.time_ns()
            sizes: list[int] = []
            for take in batches:
                envelope = envelope_pb2.Envelope(
                    envelope_version=ENVELOPE_VERSION,
                    model=model,
                    model_version=group.cfg.version,
                    items=[item for item, _, _ in take],
                    enqueued_unix_ns=now_ns,
                )
                # Workers discard the message unseen once no caller in it is still waiting.
                latest_ns = max(item.deadline_unix_ns for item, _, _ in take)
                body = codec.encode(envelope)
                sizes.append(len(body))
                message = task_payload(self.celery, task_name(model), queue, body, latest_ns)
                # Held no longer than its caller waits: a crashed leader frees it by itself.
                locks = [
                    (flight, (item.deadline_unix_ns - now_ns) // 1_000_000)
                    for item, _, flight in take
                    if flight
                ]
                if locks and self.flights is not None:
                    self.flights.claim_and_push(pipe, queue, message, locks)
                else:
                    pipe.lpush(queue, message)
            async with asyncio.timeout(PUBLISH_TIMEOUT_S):
                results: list[Any] = await pipe.execute()
            return results, sizes
        except Exception as exc:  # Redis down or slow, mostly: callers see UNAVAILABLE
            group.inflight -= len(batches)
            metrics.PUBLISH_FAILURES.labels(model).inc(len(batches))
            log.warning("publish to %s failed: %r", queue_name(model), exc)
            error = BackendUnavailable("the request queue is unavailable")
            for take in batches:
                for _, done, _ in take:
                    if not done.done():
                        done.set_exception(error)
            return None

    def _published(
        self, group: _Group, batches: list[list[_Entry]], results: list[Any], sizes: list[int]
    ) -> list[list[_Entry]]:
        """Tells the callers of pushed envelopes, and those whose flight lock another
        replica holds; returns the envelopes to push again without the latter (their
        other items hold their locks now)."""
        again: list[list[_Entry]] = []
        pushed: list[tuple[list[_Entry], int]] = []
        for take, result, size in zip(batches, results, sizes, strict=True):
            if not isinstance(result, list) or all(result):
                pushed.append((take, size))
                continue
            taken = iter(result)
            kept: list[_Entry] = []
            for item, done, flight in take:
                if not flight or next(taken):
                    kept.append((item, done, ""))
                elif not done.done():
                    done.set_exception(FlightTaken(flight))
            if kept:
                again.append(kept)
            else:
                group.inflight -= 1  # nothing left to send: _flush sends what waits next
        model = group.cfg.name
        for take, size in pushed:
            self.messages += 1
            self.items += len(take)
            metrics.ENVELOPE_ITEMS.labels(model).observe(len(take))
            published = Published(group, len(take), self, size)
            for _, done, _ in take:
                if done.done():
                    published.release()  # its caller gave up while we were publishing
                else:
                    done.set_result(published)
        return again
