"""Bulk jobs, transport-free: submit (record, cache, chunk, enqueue), read, watch, cancel.

A submission is validated item by item: items that do not match the model's
signature fail at once with their reason, items already in the cache are answered
from it, and the rest leave in chunks of `chunk_items` per queue message on the
model's bulk queue. The job is sealed (its total fixed) when the upload ends; from
then on the workers' result writes end it. Redis holds the record and results for
`job_ttl_s`; afterwards the job is gone (NOT_FOUND).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import AsyncIterator

import numpy as np
import redis.asyncio as aioredis

from api import metrics
from api.auth import caller
from api.core import DataPlane, top_classes
from inferpool import jobs
from inferpool.codec import ENVELOPE_VERSION, encode
from inferpool.errors import BackendUnavailable, InvalidInput, JobNotFound
from inferpool.names import bulk_queue_name, job_idempotency_key, job_key, job_results_key
from inferpool.repository import ModelConfig
from inferpool.v1 import envelope_pb2, jobs_pb2

log = logging.getLogger(__name__)

Reply = envelope_pb2.Reply

MAX_PAGE = 1000
# The shortest pause between two looks at a job being watched (next_look_s).
WATCH_MIN_INTERVAL_S = 0.01
MAX_IDEMPOTENCY_KEY = 256


def _now_ms() -> int:
    return int(time.time() * 1000)


def _bytes(value: bytes | str) -> bytes:
    return value.encode() if isinstance(value, str) else value


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class JobPlane:
    def __init__(
        self,
        plane: DataPlane,
        client: aioredis.Redis,
        job_ttl_s: int,
        chunk_items: int,
        max_job_items: int,
        watch_interval_s: float = 0.2,
    ) -> None:
        self.plane = plane
        self.redis = client
        self.job_ttl_s = job_ttl_s
        self.chunk_items = chunk_items
        self.max_job_items = max_job_items
        self.watch_interval_s = watch_interval_s
        self._record = client.register_script(jobs.RECORD)
        self._seal = client.register_script(jobs.SEAL)
        self._end = client.register_script(jobs.END)
        self._observe = client.register_script(jobs.OBSERVE)
        self.chunks_published = 0

    # -- submit
    async def submit(
        self, requests: AsyncIterator[jobs_pb2.SubmitJobRequest], owner: str = ""
    ) -> jobs_pb2.SubmitJobResponse:
        first = await anext(requests, None)
        if first is None:
            raise InvalidInput("the submission is empty: the first message must name the model")
        cfg = self.plane.resolve(first.model, first.version)
        if not (math.isfinite(first.timeout_s) and first.timeout_s >= 0):
            raise InvalidInput(f"timeout_s must be >= 0, got {first.timeout_s}")
        if len(first.idempotency_key) > MAX_IDEMPOTENCY_KEY:
            raise InvalidInput(f"idempotency_key is longer than {MAX_IDEMPOTENCY_KEY} characters")

        job_id = jobs.new_job_id()
        try:
            if first.idempotency_key:
                idem = job_idempotency_key(owner, first.idempotency_key)
                if not await self.redis.set(idem, job_id, nx=True, ex=self.job_ttl_s):
                    earlier = await self.redis.get(idem)
                    if earlier is not None:
                        job = await self._load(_text(earlier), owner)
                        return jobs_pb2.SubmitJobResponse(job_id=job.job_id, created=False, job=job)
                    # It expired in between: this submission takes the key.
                    await self.redis.set(idem, job_id, ex=self.job_ttl_s)
            now_ms = _now_ms()
            ttl_ms = self.job_ttl_s * 1000
            deadline_ms = now_ms + int(first.timeout_s * 1000) if first.timeout_s else 0
            record = jobs.new_record(cfg.name, cfg.version, max(1, first.top_k), now_ms, deadline_ms, owner)
            pipe = self.redis.pipeline(transaction=True)
            pipe.hset(job_key(job_id), mapping=record)
            pipe.pexpire(job_key(job_id), ttl_ms)
            await pipe.execute()
        except (OSError, aioredis.RedisError) as exc:
            raise BackendUnavailable("the job store is unavailable") from exc

        metrics.JOBS.labels(cfg.name, "QUEUED").inc()
        upload = _Upload(self, job_id, cfg, (deadline_ms or now_ms + ttl_ms) * 1_000_000)
        try:
            await upload.add(first)
            async for request in requests:
                if (request.model and request.model != cfg.name) or (
                    request.version and request.version != cfg.version
                ):
                    raise InvalidInput("every message of a submission must name the same model and version")
                await upload.add(request)
            await upload.flush()
            await self._seal(keys=[job_key(job_id)], args=[_now_ms(), upload.count])
        except BaseException as exc:
            # A job whose upload broke off would never end: fail it now, and free the
            # idempotency key so that the client's retry creates a fresh job.
            await asyncio.shield(self._abort(job_id, owner, first.idempotency_key, exc))
            if isinstance(exc, OSError | aioredis.RedisError):
                raise BackendUnavailable("the job store or queue is unavailable") from exc
            raise
        log.info(
            "job %s: %d items for %s v%d (%d chunks)",
            job_id,
            upload.count,
            cfg.name,
            cfg.version,
            upload.chunks,
        )
        return jobs_pb2.SubmitJobResponse(job_id=job_id, created=True, job=await self._load(job_id, owner))

    async def _abort(self, job_id: str, owner: str, idempotency_key: str, exc: BaseException) -> None:
        reason = str(exc) if isinstance(exc, InvalidInput) else "the upload did not complete"
        try:
            await self._end(keys=[job_key(job_id)], args=[_now_ms(), "FAILED", reason])
            if idempotency_key:
                idem = job_idempotency_key(owner, idempotency_key)
                if await self.redis.get(idem) == job_id.encode():
                    await self.redis.delete(idem)
        except Exception:
            log.exception("could not mark job %s failed", job_id)

    async def record(self, job_id: str, entries: list[tuple[int, str, bytes]]) -> None:
        args = jobs.record_args(_now_ms(), entries)
        await self._record(keys=[job_key(job_id), job_results_key(job_id)], args=args)

    async def publish(
        self, cfg: ModelConfig, job_id: str, indexes: list[int], pieces: list[np.ndarray], deadline_ns: int
    ) -> None:
        """One chunk: the job's items `indexes`, whose inputs are the rows of `pieces`
        (validated arrays [k, *input shape], in order), written out in one copy."""
        envelope = envelope_pb2.Envelope(
            envelope_version=ENVELOPE_VERSION,
            model=cfg.name,
            model_version=cfg.version,
            enqueued_unix_ns=time.time_ns(),
            job_id=job_id,
        )
        # Filled in place: a built BulkChunk or Tensor assigned to a field is copied
        # whole, ~90 us for each ~800 KB chunk.
        chunk = envelope.chunk
        chunk.job_indexes[:] = indexes
        chunk.deadline_unix_ns = deadline_ns
        chunk.cache_scope = self.plane.cache.keys.scope(caller())
        chunk.inputs.dtype = cfg.input_dtype  # type: ignore[assignment]
        chunk.inputs.shape[:] = (len(indexes), *cfg.input_shape)
        chunk.inputs.data = b"".join(piece.data for piece in pieces)
        # Onto the reliable bulk list (inferpool.bulkqueue): the body is the envelope itself.
        await self.redis.lpush(bulk_queue_name(cfg.name), encode(envelope))
        self.chunks_published += 1

    # -- read
    async def _read(self, job_id: str, owner: str) -> dict[str, str]:
        if not job_id:
            raise InvalidInput("job_id is required")
        try:
            raw = await self._observe(keys=[job_key(job_id)], args=[_now_ms()])
        except (OSError, aioredis.RedisError) as exc:
            raise BackendUnavailable("the job store is unavailable") from exc
        if not raw:
            raise JobNotFound(f"no job {job_id!r} (unknown, or expired)")
        record = jobs.decode_record(raw)
        if record.get("owner", "") != owner:
            raise JobNotFound(f"no job {job_id!r} (unknown, or expired)")
        return record

    async def _load(self, job_id: str, owner: str) -> jobs_pb2.Job:
        return jobs.to_proto(job_id, await self._read(job_id, owner))

    async def get(self, request: jobs_pb2.GetJobRequest, owner: str = "") -> jobs_pb2.Job:
        if request.offset < 0 or not 0 <= request.limit <= MAX_PAGE:
            raise InvalidInput(f"offset must be >= 0 and limit 0..{MAX_PAGE}")
        record = await self._read(request.job_id, owner)
        job = jobs.to_proto(request.job_id, record)
        total = job.counts.total if record["sealed"] == "1" else request.offset + request.limit
        end = min(request.offset + request.limit, total)
        job.next_offset = max(end, request.offset)
        if end <= request.offset:
            return job
        indexes = list(range(request.offset, end))
        try:
            payloads = await self.redis.hmget(job_results_key(request.job_id), indexes)
        except (OSError, aioredis.RedisError) as exc:
            raise BackendUnavailable("the job store is unavailable") from exc
        cfg = self.plane.repository.resolve(job.model, job.version)
        top_k = int(record["top_k"])
        for index, payload in zip(indexes, payloads, strict=True):
            if payload is None:
                continue
            reply = Reply()
            reply.ParseFromString(_bytes(payload))
            result = job.results.add(index=index, ok=reply.status == Reply.STATUS_OK, cached=reply.cached)
            if result.ok:
                result.classes.extend(top_classes(cfg, reply.scores.values, top_k))
                if request.include_scores:
                    result.scores.extend(reply.scores.values)
            else:
                result.error = reply.error or "the model could not compute this input"
        return job

    async def watch(self, job_id: str, owner: str = "") -> AsyncIterator[jobs_pb2.Job]:
        """Yields the job now and on every change, until it ends (the caller's deadline
        bounds the whole stream)."""
        last: tuple[object, ...] | None = None
        previous: tuple[float, int] | None = None  # when, and how many items had finished
        while True:
            job = await self._load(job_id, owner)
            key = (job.state, job.counts.done, job.counts.failed, job.counts.total)
            if key != last:
                last = key
                yield job
            if jobs.state_name(job.state) in jobs.TERMINAL:
                return
            now, finished = time.time(), job.counts.done + job.counts.failed
            if previous is None and job.HasField("started"):
                # The first look has no look before it: the pace since the job started.
                previous = (job.started.ToMilliseconds() / 1000, 0)
            await asyncio.sleep(next_look_s(self.watch_interval_s, job.counts.total, finished, now, previous))
            previous = (now, finished)

    async def cancel(self, job_id: str, owner: str = "") -> jobs_pb2.Job:
        record = await self._read(job_id, owner)
        try:
            state = await self._end(keys=[job_key(job_id)], args=[_now_ms(), "CANCELLED", ""])
        except (OSError, aioredis.RedisError) as exc:
            raise BackendUnavailable("the job store is unavailable") from exc
        if record["state"] in jobs.LIVE and state in (b"CANCELLED", "CANCELLED"):
            metrics.JOBS.labels(record["model"], "CANCELLED").inc()
        return await self._load(job_id, owner)


def next_look_s(
    interval_s: float, total: int, finished: int, now: float, previous: tuple[float, int] | None
) -> float:
    """When a watch looks at its job next: after interval_s, or sooner when the job's
    pace since the previous look (time, items finished) says it ends sooner. Its end is
    then seen within WATCH_MIN_INTERVAL_S rather than up to a whole interval later (half
    an interval on average: 10% of a 1 s job). A job that made no progress since the
    previous look, or whose total is not known yet (0 until the upload ends), is looked
    at after the full interval."""
    if previous is None or not total or finished <= previous[1] or now <= previous[0]:
        return interval_s
    rate = (finished - previous[1]) / (now - previous[0])
    return min(interval_s, max(WATCH_MIN_INTERVAL_S, (total - finished) / rate))


class _Upload:
    """One submission in progress: assigns item indexes, answers what it can at once,
    and publishes the rest chunk by chunk. Items stay in blocks (an input's rows as one
    array) from validation to the queue: hashing, lookup and chunking cost no array or
    tuple per item."""

    def __init__(self, jobs_plane: JobPlane, job_id: str, cfg: ModelConfig, deadline_ns: int) -> None:
        self.p = jobs_plane
        self.job_id = job_id
        self.cfg = cfg
        self.deadline_ns = deadline_ns
        # Read in the call's own context: the hashing may run on an executor thread.
        self.cache_scope = jobs_plane.plane.cache.keys.scope(caller())
        self.count = 0
        self.chunks = 0
        # Items waiting for a chunk, in job order: blocks of job indexes and their inputs.
        self._indexes: deque[np.ndarray] = deque()
        self._rows: deque[np.ndarray] = deque()
        self._waiting = 0

    async def add(self, request: jobs_pb2.SubmitJobRequest) -> None:
        cfg = self.cfg
        inputs = list(request.inputs)
        if self.count + sum(cfg.items_in(t) for t in inputs) > self.p.max_job_items:
            raise InvalidInput(f"a job holds at most {self.p.max_job_items} items")
        answered: list[tuple[int, str, bytes]] = []
        valid: list[tuple[np.ndarray, np.ndarray]] = []  # job indexes, their inputs
        for t, (rows, failed) in zip(inputs, cfg.validate_blocks(inputs), strict=True):
            first = self.count
            self.count += cfg.items_in(t)
            for row, problem in failed.items():
                reply = Reply(status=Reply.STATUS_INVALID_INPUT, error=str(problem))
                answered.append((first + row, jobs.FAILED, reply.SerializeToString()))
            if rows is None:
                continue
            indexes = np.arange(first, first + len(rows))
            if failed:
                keep = np.ones(len(rows), dtype=bool)
                keep[list(failed)] = False
                indexes, rows = indexes[keep], rows[keep]
            valid.append((indexes, rows))
        cache_keys = self.p.plane.cache.keys
        keys = [key for _, rows in valid for key in cache_keys.row_keys(cfg, rows, self.cache_scope)]
        loop = asyncio.get_running_loop()
        hits = await loop.run_in_executor(None, self.p.plane.cache.get_many, keys) if keys else {}
        at = 0
        for indexes, rows in valid:
            block_keys, at = keys[at : at + len(rows)], at + len(rows)
            if hits:
                values = [hits.get(key) for key in block_keys]
                missed = np.array([value is None for value in values], dtype=bool)
                for index, value in zip(indexes.tolist(), values, strict=True):
                    if value is not None:
                        reply = Reply(status=Reply.STATUS_OK, cached=True)
                        reply.scores.ParseFromString(value)
                        answered.append((index, jobs.CACHED, reply.SerializeToString()))
                indexes, rows = indexes[missed], rows[missed]
            if len(rows):
                self._indexes.append(indexes)
                self._rows.append(rows)
                self._waiting += len(rows)
        if self._waiting >= self.p.chunk_items:
            await self._publish(whole_chunks_only=True)
        if answered:
            await self.p.record(self.job_id, answered)

    async def flush(self) -> None:
        await self._publish(whole_chunks_only=False)

    async def _publish(self, whole_chunks_only: bool) -> None:
        """Publishes the waiting items in chunks of chunk_items; with whole_chunks_only,
        a last partial chunk keeps waiting for the next message's items."""
        size = self.p.chunk_items
        while self._waiting >= size or (self._waiting and not whole_chunks_only):
            indexes, pieces = self._take(min(size, self._waiting))
            await self.p.publish(self.cfg, self.job_id, indexes, pieces, self.deadline_ns)
            self.chunks += 1

    def _take(self, n: int) -> tuple[list[int], list[np.ndarray]]:
        """The first n waiting items: their job indexes, and their rows as views of the
        blocks they came in."""
        self._waiting -= n
        indexes: list[int] = []
        pieces: list[np.ndarray] = []
        while n:
            block_indexes, rows = self._indexes[0], self._rows[0]
            if len(rows) <= n:
                self._indexes.popleft()
                self._rows.popleft()
            else:
                self._indexes[0], self._rows[0] = block_indexes[n:], rows[n:]
                block_indexes, rows = block_indexes[:n], rows[:n]
            indexes += block_indexes.tolist()
            pieces.append(rows)
            n -= len(rows)
        return indexes, pieces
