"""The transport-free data plane: validate, look up the cache, enqueue, wait.

The gRPC servicer is a thin shell over this; it raises domain errors from
inferpool.errors and never sees a status code.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass
from typing import NoReturn

import numpy as np

from api.publisher import Publisher
from api.replies import ReplyListener
from inferpool.cache import Cache, input_key
from inferpool.errors import DeadlineExceeded, InvalidInput, ModelFailed
from inferpool.names import MODEL_NAME_RE
from inferpool.repository import ModelConfig, Repository
from inferpool.v1 import envelope_pb2, inference_pb2

log = logging.getLogger(__name__)

Reply = envelope_pb2.Reply


@dataclass
class Counters:
    requests: int = 0
    hits: int = 0
    misses: int = 0
    deadline_exceeded: int = 0


class DataPlane:
    def __init__(
        self,
        repository: Repository,
        cache: Cache,
        publisher: Publisher,
        replies: ReplyListener,
        default_deadline_ms: float,
    ) -> None:
        self.repository = repository
        self.cache = cache
        self.publisher = publisher
        self.replies = replies
        self.default_timeout_s = default_deadline_ms / 1000
        self.counters = Counters()

    async def classify(
        self, request: inference_pb2.ClassifyRequest, timeout_s: float | None
    ) -> inference_pb2.ClassifyResponse:
        t0 = time.perf_counter()
        self.counters.requests += 1
        if not request.model:
            raise InvalidInput("model is required")
        if not MODEL_NAME_RE.match(request.model):
            raise InvalidInput("model name must be 1-64 characters of letters, digits, '_', '.', '-'")
        if request.version < 0:
            raise InvalidInput(f"version must be >= 0 (0 = latest), got {request.version}")
        cfg = self.repository.resolve(request.model, request.version)
        if not request.HasField("input"):
            raise InvalidInput("input is required")
        cfg.validate(request.input)
        top_k = max(1, request.top_k)  # capped at the number of classes when answering
        request_id = request.request_id or uuid.uuid4().hex

        key = input_key(cfg.name, cfg.version, request.input)
        cached = self.cache.get(key)
        if cached is not None:
            scores = envelope_pb2.Scores()
            scores.ParseFromString(cached)
            self.counters.hits += 1
            return self._response(cfg, request_id, scores, top_k, True, t0, None)
        self.counters.misses += 1

        budget_s = self.default_timeout_s if timeout_s is None else timeout_s
        if budget_s <= 0:
            self._deadline_exceeded()
        reply = await self._compute(cfg, request, request_id, budget_s)
        if reply.status == Reply.STATUS_INVALID_INPUT:
            raise InvalidInput(reply.error)
        if reply.status != Reply.STATUS_OK:
            raise ModelFailed(reply.error or "the model could not compute this input")
        return self._response(cfg, request_id, reply.scores, top_k, False, t0, reply)

    async def _compute(
        self, cfg: ModelConfig, request: inference_pb2.ClassifyRequest, request_id: str, budget_s: float
    ) -> envelope_pb2.Reply:
        # Correlate on our own id: callers' request ids need not be unique.
        correlation = uuid.uuid4().hex
        item = envelope_pb2.EnvelopeItem(
            request_id=correlation,
            input=request.input,
            deadline_unix_ns=time.time_ns() + int(budget_s * 1e9),
            reply_key=self.replies.key,
            trace_id=request_id,
        )
        waiter = self.replies.expect(correlation)
        published = self.publisher.enqueue(cfg, item)
        try:
            async with asyncio.timeout(budget_s):
                # Shielded: on timeout we withdraw it below instead of cancelling blindly.
                await asyncio.shield(published)
                return await waiter
        except TimeoutError:
            self._deadline_exceeded()
        finally:
            self.replies.forget(correlation)
            if not published.done():
                published.cancel()
            elif not published.cancelled() and published.exception() is None:
                published.result().release()

    def _deadline_exceeded(self) -> NoReturn:
        self.counters.deadline_exceeded += 1
        raise DeadlineExceeded("no result before the deadline")

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
        values = np.asarray(scores.values, dtype=np.float32)
        k = min(top_k, len(values))
        best = np.argpartition(-values, k - 1)[:k] if k < len(values) else np.arange(len(values))
        best = best[np.argsort(-values[best], kind="stable")]
        response = inference_pb2.ClassifyResponse(
            classes=[
                inference_pb2.ClassScore(index=int(i), label=cfg.label(int(i)), score=float(values[i]))
                for i in best
            ],
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
