"""Bulk jobs, transport-free: submit (record, cache, chunk, enqueue), read, watch, cancel.

A submission is validated item by item: items that do not match the model's
signature fail at once with their reason, items already in the cache are answered
from it, and the rest leave in chunks of `chunk_items` per queue message on the
model's bulk queue. The job is sealed (its total fixed) at the message the client
marks last, if its item count agrees; from then on the workers' result writes end it.
An upload that ends any other way fails its job. Redis holds the record and results for
`job_ttl_s`; afterwards the job is gone (NOT_FOUND).
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from collections.abc import AsyncIterator

import numpy as np
import redis.asyncio as aioredis

from inferpool import jobs, tracing
from inferpool.api import metrics
from inferpool.api.auth import caller
from inferpool.api.core import DataPlane, top_classes
from inferpool.api.job_watch import watch_job
from inferpool.api.upload import Upload
from inferpool.bulkqueue import push_chunk
from inferpool.codec import ENVELOPE_VERSION, encode
from inferpool.errors import BackendUnavailable, DeadlineExceeded, InvalidInput, JobNotFound, Overloaded, clip
from inferpool.jobs import State, now_ms
from inferpool.names import bulk_queue_name, job_idempotency_key
from inferpool.repository import ModelConfig
from inferpool.v1 import envelope_pb2, jobs_pb2

log = logging.getLogger(__name__)

Reply = envelope_pb2.Reply

MAX_PAGE = 1000
MAX_IDEMPOTENCY_KEY = 256
MAX_TOP_K = 1000
# Inputs per message. Each input costs Python work (and, when it fails, a result) however
# few bytes it holds: ~10 bytes each could otherwise make one 4 MB message cost seconds of
# the API's CPU and 50 MB of Redis. Clients put a message's rows in one input [k, ...].
MAX_INPUTS_PER_MESSAGE = 1024
# Client text quoted in an error message is cut to this many characters.
ECHO_CHARS = 40
JOB_ID_RE = re.compile(r"[0-9a-f]{32}")
# grpc ends a server's request stream the same way whether the client closed it or the
# call broke (cancelled, deadline, peer gone): only the client's marker tells them apart.
BROKEN_UPLOAD = (
    "the upload broke off before a message marked last (cancelled, past its deadline, "
    "the client gone, or a client too old to mark it)"
)


def check_job_id(job_id: str) -> None:
    if not JOB_ID_RE.fullmatch(job_id):
        raise InvalidInput(f"job_id must be 32 lowercase hex digits, got {clip(job_id, ECHO_CHARS)}")


class UploadBroken(DeadlineExceeded):
    """An upload stalled or ran too long; its job is failed."""


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _peer_host(peer: str) -> str:
    """grpc's peer ("ipv4:127.0.0.1:5555", "ipv6:[::1]:5555", "unix:...") without its
    port: every connection of one host counts as one anonymous caller."""
    kind, _, address = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        return kind + ":" + address.rpartition(":")[0]
    return peer


class JobPlane:
    def __init__(
        self,
        plane: DataPlane,
        client: aioredis.Redis,
        job_ttl_s: int,
        chunk_items: int,
        max_job_items: int,
        watch_interval_s: float = 0.2,
        *,
        upload_idle_timeout_s: float = 30.0,
        upload_max_duration_s: float = 3600.0,
        max_uploads_per_caller: int = 8,
        max_uploads: int = 64,
        watch_max_duration_s: float = 600.0,
    ) -> None:
        self.plane = plane
        self.redis = client
        self.job_ttl_s = job_ttl_s
        self.chunk_items = chunk_items
        self.max_job_items = max_job_items
        self.watch_interval_s = watch_interval_s
        self.upload_idle_timeout_s = upload_idle_timeout_s
        self.upload_max_duration_s = upload_max_duration_s
        self.max_uploads_per_caller = max_uploads_per_caller
        self.max_uploads = max_uploads
        self.watch_max_duration_s = watch_max_duration_s
        self.store = jobs.AsyncJobStore(client, job_ttl_s)
        self.chunks_published = 0
        # Streamed uploads open now, by caller (one event loop: no lock needed).
        self._uploads: dict[str, int] = {}

    @property
    def uploads_open(self) -> int:
        return sum(self._uploads.values())

    # -- submit
    async def submit(
        self,
        requests: AsyncIterator[jobs_pb2.SubmitJobRequest],
        owner: str = "",
        *,
        streamed: bool = True,
        peer: str = "",
    ) -> jobs_pb2.SubmitJobResponse:
        """Records and enqueues a job. A streamed submission is complete only at its
        message with `last` (and the right total_items); one that ends otherwise, stalls
        or is cancelled fails its job. `peer` names an unauthenticated caller for the
        per-caller cap on open uploads."""
        if not streamed:
            return await self._submit(requests, owner, streamed=False)
        who = owner or _peer_host(peer)
        if self.uploads_open >= self.max_uploads:
            raise Overloaded(f"too many job uploads open (at most {self.max_uploads} per server)")
        if self._uploads.get(who, 0) >= self.max_uploads_per_caller:
            raise Overloaded(f"too many job uploads open (at most {self.max_uploads_per_caller} per caller)")
        self._uploads[who] = self._uploads.get(who, 0) + 1
        try:
            return await self._submit(requests, owner, streamed=True)
        finally:
            self._uploads[who] -= 1
            if not self._uploads[who]:
                del self._uploads[who]

    def _check_first(self, first: jobs_pb2.SubmitJobRequest) -> ModelConfig:
        """Everything about the first message that can be refused before a job exists,
        so that a refused submission leaves no record behind."""
        if first.version < 0:
            raise InvalidInput(f"version must be >= 0 (0 = latest), got {first.version}")
        if not (math.isfinite(first.timeout_s) and 0 <= first.timeout_s <= self.job_ttl_s):
            raise InvalidInput(
                f"timeout_s must be 0..{self.job_ttl_s} (the job TTL), got {first.timeout_s:.6g}"
            )
        if first.top_k > MAX_TOP_K:
            raise InvalidInput(f"top_k must be 0..{MAX_TOP_K}, got {first.top_k}")
        if first.total_items < 0:
            raise InvalidInput(f"total_items must be >= 0, got {first.total_items}")
        if len(first.idempotency_key) > MAX_IDEMPOTENCY_KEY:
            raise InvalidInput(f"idempotency_key is longer than {MAX_IDEMPOTENCY_KEY} characters")
        return self.plane.resolve(first.model, first.version)

    @staticmethod
    def check_inputs(request: jobs_pb2.SubmitJobRequest) -> None:
        if len(request.inputs) > MAX_INPUTS_PER_MESSAGE:
            raise InvalidInput(
                f"inputs: a message carries at most {MAX_INPUTS_PER_MESSAGE} inputs, got "
                f"{len(request.inputs)}; put many rows in one input [k, *input shape]"
            )

    def count_items(self, cfg: ModelConfig, request: jobs_pb2.SubmitJobRequest) -> int:
        """The items of a message from its inputs' headers and byte counts (no values);
        InvalidInput for a structurally bad input or too many items. Per input: run off
        the event loop."""
        n = sum(cfg.items_in(t) for t in request.inputs)  # after check_inputs()
        if n > self.max_job_items:
            raise InvalidInput(f"a job holds at most {self.max_job_items} items")
        return n

    async def _next(
        self, requests: AsyncIterator[jobs_pb2.SubmitJobRequest], started: float
    ) -> jobs_pb2.SubmitJobRequest | None:
        """The next message, or None when the stream ended; UploadBroken when the client
        sends nothing for upload_idle_timeout_s or the upload outlives upload_max_duration_s."""
        left = self.upload_max_duration_s - (time.monotonic() - started)
        wait = min(self.upload_idle_timeout_s, left)
        try:
            return await asyncio.wait_for(anext(requests, None), max(0.0, wait))
        except TimeoutError:
            if wait < self.upload_idle_timeout_s:
                raise UploadBroken(
                    f"the upload was still open after {self.upload_max_duration_s:g} s (the server's bound)"
                ) from None
            raise UploadBroken(
                f"the upload sent nothing for {self.upload_idle_timeout_s:g} s (the server's idle bound)"
            ) from None

    async def _submit(
        self, requests: AsyncIterator[jobs_pb2.SubmitJobRequest], owner: str, *, streamed: bool
    ) -> jobs_pb2.SubmitJobResponse:
        started = time.monotonic()
        first = await self._next(requests, started)
        if first is None:
            raise InvalidInput("the submission is empty: the first message must name the model")
        cfg = self._check_first(first)
        self.check_inputs(first)
        if first.inputs or first.last:
            # Refused here, a bad first message leaves no job behind (not even a failed one).
            n = await asyncio.get_running_loop().run_in_executor(None, self.count_items, cfg, first)
            if first.last and first.total_items != n:
                raise InvalidInput(f"total_items is {first.total_items} but the server counted {n} items")

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
            created_ms = now_ms()
            deadline_ms = created_ms + int(first.timeout_s * 1000) if first.timeout_s else 0
            top_k = max(1, first.top_k)
            await self.store.create(
                job_id, jobs.new_record(cfg.name, cfg.version, top_k, created_ms, deadline_ms, owner)
            )
        except (OSError, aioredis.RedisError) as exc:
            raise BackendUnavailable("the job store is unavailable") from exc

        metrics.JOBS.labels(cfg.name, State.QUEUED).inc()
        upload = Upload(self, job_id, cfg, (deadline_ms or created_ms + self.job_ttl_s * 1000) * 1_000_000)
        try:
            request: jobs_pb2.SubmitJobRequest | None = first
            while True:
                assert request is not None
                if request is not first and (
                    (request.model and request.model != cfg.name)
                    or (request.version and request.version != cfg.version)
                ):
                    raise InvalidInput("every message of a submission must name the same model and version")
                await upload.add(request)
                if request.last:
                    if request.total_items != upload.count:
                        raise InvalidInput(
                            f"total_items is {request.total_items} but the server counted "
                            f"{upload.count} items; the job is failed, submit it again"
                        )
                    break
                if not streamed:
                    break  # one message is the whole submission
                request = await self._next(requests, started)
                if request is None:
                    raise InvalidInput(BROKEN_UPLOAD + "; the job is failed, submit it again")
            await upload.flush()
            await self.store.seal(job_id, upload.count)
        except BaseException as exc:
            # A job whose upload broke off would never end: fail it now, so that workers
            # drop its queued chunks, and free the idempotency key so that the client's
            # retry creates a fresh job.
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
        reason = str(exc) if isinstance(exc, InvalidInput | UploadBroken) else BROKEN_UPLOAD
        log.info("job %s: upload failed: %s", job_id, reason)
        idem = job_idempotency_key(owner, idempotency_key) if idempotency_key else ""
        try:
            await self.store.abort(job_id, idem, reason)
        except Exception:
            log.exception("could not mark job %s failed", job_id)

    async def record(self, job_id: str, entries: list[tuple[int, str, bytes]]) -> None:
        await self.store.record(job_id, entries)

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
        chunk.traceparent = tracing.traceparent()  # the job's trace: SubmitJob's span
        chunk.inputs.dtype = cfg.input_dtype  # type: ignore[assignment]
        chunk.inputs.shape[:] = (len(indexes), *cfg.input_shape)
        chunk.inputs.data = b"".join(piece.data for piece in pieces)
        await push_chunk(self.redis, bulk_queue_name(cfg.name), encode(envelope))
        self.chunks_published += 1

    # -- read
    async def _read(self, job_id: str, owner: str) -> dict[str, str]:
        check_job_id(job_id)
        try:
            record = await self.store.observe(job_id)
        except (OSError, aioredis.RedisError) as exc:
            raise BackendUnavailable("the job store is unavailable") from exc
        if record is None or record.get("owner", "") != owner:
            raise JobNotFound(f"no job {job_id!r} (unknown, or expired)")
        return record

    async def _load(self, job_id: str, owner: str) -> jobs_pb2.Job:
        return jobs.to_proto(job_id, await self._read(job_id, owner))

    async def get(self, request: jobs_pb2.GetJobRequest, owner: str = "") -> jobs_pb2.Job:
        check_job_id(request.job_id)
        if not 0 <= request.offset <= self.max_job_items:
            raise InvalidInput(f"offset must be 0..{self.max_job_items}, got {request.offset}")
        if not 0 <= request.limit <= MAX_PAGE:
            raise InvalidInput(f"limit must be 0..{MAX_PAGE}, got {request.limit}")
        record = await self._read(request.job_id, owner)
        job = jobs.to_proto(request.job_id, record)
        total = job.counts.total if record["sealed"] == "1" else request.offset + request.limit
        end = min(request.offset + request.limit, total)
        job.next_offset = max(end, request.offset)
        if end <= request.offset:
            return job
        indexes = list(range(request.offset, end))
        try:
            payloads = await self.store.results(request.job_id, indexes)
        except (OSError, aioredis.RedisError) as exc:
            raise BackendUnavailable("the job store is unavailable") from exc
        cfg = self.plane.repository.resolve(job.model, job.version)
        top_k = int(record["top_k"])
        for index, payload in zip(indexes, payloads, strict=True):
            if payload is None:
                continue
            reply = Reply()
            reply.ParseFromString(payload)
            result = job.results.add(index=index, ok=reply.status == Reply.STATUS_OK, cached=reply.cached)
            if result.ok:
                result.classes.extend(top_classes(cfg, reply.scores.values, top_k))
                if request.include_scores:
                    result.scores.extend(reply.scores.values)
            else:
                result.error = reply.error or "the model could not compute this input"
        return job

    def watch(self, job_id: str, owner: str = "") -> AsyncIterator[jobs_pb2.Job]:
        """The job now and on every change, until it ends or watch_max_duration_s passes."""
        check_job_id(job_id)
        return watch_job(lambda: self._load(job_id, owner), self.watch_interval_s, self.watch_max_duration_s)

    async def cancel(self, job_id: str, owner: str = "") -> jobs_pb2.Job:
        check_job_id(job_id)
        record = await self._read(job_id, owner)
        try:
            state = await self.store.end(job_id, State.CANCELLED)
        except (OSError, aioredis.RedisError) as exc:
            raise BackendUnavailable("the job store is unavailable") from exc
        if record["state"] in jobs.LIVE and state == State.CANCELLED:
            metrics.JOBS.labels(record["model"], State.CANCELLED).inc()
        return await self._load(job_id, owner)
