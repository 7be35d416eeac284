"""The transport-free data plane: validate, look up the cache, enqueue, wait.

The gRPC servicer is a thin shell over this; it raises domain errors from
inferpool.errors and never sees a status code.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from inferpool import tracing
from inferpool.api import metrics
from inferpool.api.admission import Admission
from inferpool.api.auth import caller
from inferpool.api.dispatcher import Dispatcher, Miss, ReplyListener, deadline_exceeded, new_id
from inferpool.api.front_cache import CacheReader, FrontCache, LocalCache
from inferpool.api.publisher import FlightLocks, Publisher
from inferpool.cache import Cache
from inferpool.errors import DeadlineExceeded, InferpoolError, InvalidInput, ModelFailed
from inferpool.names import MODEL_NAME_RE
from inferpool.repository import ModelConfig, Repository
from inferpool.v1 import envelope_pb2, inference_pb2, tensor_pb2

log = logging.getLogger(__name__)

Reply = envelope_pb2.Reply


# Up to this many classes a plain sort beats numpy, whose per-call cost dominates on
# tiny arrays (measured: 2 µs against 10 µs for ten classes).
SMALL_OUTPUT = 64
# The longest any call waits for a worker, whatever deadline it brings.
MAX_WAIT_S = 86400.0


def top_classes(
    cfg: ModelConfig, probabilities: Sequence[float], top_k: int
) -> list[inference_pb2.ClassScore]:
    """The k best classes, best first (ties in index order)."""
    n = len(probabilities)
    k = min(max(1, top_k), n)
    if k == 1 and n <= SMALL_OUTPUT:
        values = list(probabilities)
        highest = max(values)
        i = values.index(highest)  # the first of equal scores, as the sort below keeps them
        return [inference_pb2.ClassScore(index=i, label=cfg.label(i), score=highest)]
    if n <= SMALL_OUTPUT:
        values = list(probabilities)
        # sorted() is stable, so equal scores keep their index order.
        best: Sequence[int] = sorted(range(n), key=values.__getitem__, reverse=True)[:k]
        scores: Sequence[float] = values
    else:
        array = np.asarray(probabilities, dtype=np.float32)
        top = np.argpartition(-array, k - 1)[:k] if k < n else np.arange(n)
        best = top[np.argsort(-array[top], kind="stable")].tolist()
        scores = array.tolist()
    return [inference_pb2.ClassScore(index=i, label=cfg.label(i), score=float(scores[i])) for i in best]


@dataclass(slots=True)
class Inferred:
    """The model's full output for one input, and how it was obtained."""

    scores: envelope_pb2.Scores  # class probabilities
    cached: bool
    reply: envelope_pb2.Reply | None  # the worker's reply (timings); None on a cache hit


@dataclass
class Counters:
    requests: int = 0
    hits: int = 0
    misses: int = 0
    deadline_exceeded: int = 0
    coalesced: int = 0  # misses answered by an identical request's computation
    coalesced_remote: int = 0  # ... when another API replica computed it


class DataPlane:
    def __init__(
        self,
        repository: Repository,
        cache: Cache,
        cache_reads: CacheReader,
        publisher: Publisher,
        replies: ReplyListener,
        default_deadline_ms: float,
        flight_locks: FlightLocks | None = None,
        local_cache: LocalCache | None = None,
        admission: Admission | None = None,
    ) -> None:
        self.repository = repository
        # The LRU, then Memcached read without blocking the loop; filled from both
        # Memcached and worker replies.
        self.results = FrontCache(
            cache, cache_reads, local_cache if local_cache is not None else LocalCache(0, 0)
        )
        self.cache = cache
        self.default_timeout_s = default_deadline_ms / 1000
        self.counters = Counters()
        # Sends the misses this process computes; admission decides, before anything is
        # queued, whether a miss can be answered in time.
        self.dispatcher = Dispatcher(
            publisher,
            replies,
            admission if admission is not None else Admission(),
            cache,
            cache_reads,
            self.counters,
            flight_locks,
        )
        self._flights: dict[str, asyncio.Future[envelope_pb2.Reply]] = {}

    def resolve(self, model: str, version: int) -> ModelConfig:
        """The model config a request names (ModelNotFound / InvalidInput otherwise)."""
        if not model:
            raise InvalidInput("model is required")
        if not MODEL_NAME_RE.match(model):
            raise InvalidInput("model name must be 1-64 characters of letters, digits, '_', '.', '-'")
        if version < 0:
            raise InvalidInput(f"version must be >= 0 (0 = latest), got {version}")
        return self.repository.resolve(model, version)

    async def infer(
        self, cfg: ModelConfig, tensor: tensor_pb2.Tensor, request_id: str, timeout_s: float | None
    ) -> Inferred:
        """One input through the whole path: validation, cache, queue, worker. Every
        protocol front (inferpool.v1, KServe v2) calls this; it raises domain errors."""
        self.counters.requests += 1
        data = tensor.data  # each read of a bytes field copies it: once
        # The signature first, before anything is hashed or kept: its cost is bounded by
        # the model's, whatever shape a client claims (a rank of millions included).
        shape = tensor.shape
        if (
            tensor.dtype != cfg.input_dtype
            or len(shape) != len(cfg.request_shape)
            or tuple(shape) != cfg.request_shape
            or len(data) != cfg.input_nbytes
        ):
            cfg.validate(tensor)  # raises, saying what does not fit
        keys = self.cache.keys
        scope = keys.scope(caller())
        key = keys.input_key(cfg, data, scope)
        meter = metrics.for_model(cfg.name)
        # Only inputs whose values passed validation are ever cached: an input found here
        # is valid, and checking its values again would be a third of a hit's handler time.
        with tracing.span("inferpool.cache_lookup") as lookup:
            scores = self.results.get_local(key)
            if scores is not None:
                meter.local_cache_hits.inc()
            else:
                with tracing.span("inferpool.validate"):
                    cfg.validate(tensor)
                scores = await self.results.get(key)
            lookup.set_attribute("inferpool.cache.hit", scores is not None)
        if scores is not None:
            self.counters.hits += 1
            meter.cache_hits.inc()
            return Inferred(scores, True, None)
        self.counters.misses += 1
        meter.cache_misses.inc()

        # A deadline centuries away (gRPC allows ~11,000 years) would overflow the
        # envelope's int64 nanoseconds: no wait here is longer than a day anyway.
        budget_s = min(MAX_WAIT_S, self.default_timeout_s if timeout_s is None else timeout_s)
        deadline = asyncio.get_running_loop().time() + budget_s
        try:
            if budget_s <= 0:
                raise deadline_exceeded()
            with tracing.span("inferpool.single_flight", {"inferpool.flight.role": "leader"}):
                reply = await self._single_flight(Miss(cfg, key, tensor, request_id, scope, meter), deadline)
        except DeadlineExceeded:
            self.counters.deadline_exceeded += 1
            meter.deadline_exceeded.inc()
            raise
        if reply.status == Reply.STATUS_INVALID_INPUT:
            raise InvalidInput(reply.error)
        if reply.status != Reply.STATUS_OK:
            raise ModelFailed(reply.error or "the model could not compute this input")
        self.results.put(key, reply.scores)
        return Inferred(reply.scores, reply.cached, None if reply.cached else reply)

    async def classify(
        self, request: inference_pb2.ClassifyRequest, timeout_s: float | None
    ) -> inference_pb2.ClassifyResponse:
        t0 = time.perf_counter()
        cfg = self.resolve(request.model, request.version)
        if not request.HasField("input"):
            raise InvalidInput("input is required")
        top_k = max(1, request.top_k)  # capped at the number of classes when answering
        request_id = request.request_id or new_id()
        result = await self.infer(cfg, request.input, request_id, timeout_s)
        return self._response(cfg, request_id, result.scores, top_k, result.cached, t0, result.reply)

    async def _single_flight(self, miss: Miss, deadline: float) -> envelope_pb2.Reply:
        """Identical concurrent misses share one computation: the first caller leads, the
        others follow (each within its own deadline). A leader that fails for a reason of
        its own (its shorter deadline, its caller gone, its admission) must not fail
        followers with time left, nor send them all off to compute: the first follower to
        wake takes the flight over and the others follow it, so a failed leader costs one
        more publish, not one per follower, whether or not the cache is up."""
        key = miss.key
        following = False
        while (leader := self._flights.get(key)) is not None:
            if not following:
                self.counters.coalesced += 1
                following = True
                tracing.annotate("inferpool.flight.role", "follower")
            try:
                async with asyncio.timeout_at(deadline):
                    await asyncio.shield(leader)
            except TimeoutError:
                raise deadline_exceeded() from None
            except InferpoolError:
                # The leader's flight was removed with its failure: whoever of its
                # followers runs first finds none and leads; the rest find its flight.
                if self._flights.get(key) is leader:  # never spin on a failed flight
                    del self._flights[key]
                continue
            return leader.result()
        if deadline <= asyncio.get_running_loop().time():
            raise deadline_exceeded()
        flight: asyncio.Future[envelope_pb2.Reply] = asyncio.get_running_loop().create_future()
        self._flights[key] = flight
        try:
            reply = await self.dispatcher.send(miss, deadline)
        except BaseException as exc:
            flight.set_exception(exc if isinstance(exc, InferpoolError) else ModelFailed("leader failed"))
            flight.exception()  # retrieved: followers may be gone
            raise
        else:
            flight.set_result(reply)
            return reply
        finally:
            if self._flights.get(key) is flight:
                del self._flights[key]

    @staticmethod
    def _response(
        cfg: ModelConfig,
        request_id: str,
        scores: envelope_pb2.Scores,
        top_k: int,
        cached: bool,
        t0: float,
        reply: envelope_pb2.Reply | None,
    ) -> inference_pb2.ClassifyResponse:
        response = inference_pb2.ClassifyResponse(
            classes=top_classes(cfg, scores.values, top_k),
            model=cfg.name,
            version=cfg.version,
            cached=cached,
            request_id=request_id,
        )
        timings = response.timings
        if reply is not None:
            timings.queue_ms = reply.queue_ms
            timings.compute_ms = reply.compute_ms
            timings.batch_size = reply.batch_size
        timings.total_ms = (time.perf_counter() - t0) * 1000
        return response
