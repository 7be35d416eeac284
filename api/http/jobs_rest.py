"""Bulk jobs over HTTP, over the same JobPlane as gRPC's JobService (same tenancy: the
caller's token name owns the job; same idempotency keys).

Submit (`POST /v1/jobs?model=...`) takes JSON for small jobs, or a body streamed into
the job store as it arrives: a `.npy` file (`application/x-npy`) or raw rows of the
model's input dtype (`application/octet-stream`). A streamed body becomes a streamed
submission whose end-of-upload marker (`last`, with the item count) is sent only once
the body completed; a body cut short, stalled or over its declared size fails its job.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from inferpool import tensor
from inferpool.api.auth import caller
from inferpool.api.http.body import chunks, declared_length, read_body
from inferpool.api.http.errors import HttpError, response_for
from inferpool.api.jobs import JobPlane
from inferpool.errors import InvalidInput
from inferpool.repository import ModelConfig
from inferpool.v1 import jobs_pb2

# Rows per submission message of a streamed body: about this many bytes each.
MESSAGE_BYTES = 1 << 20
# A .npy header is at most this long (numpy's own default bound).
MAX_NPY_HEADER = 10_000
PAGE = 1000


def job_json(job: jobs_pb2.Job) -> dict[str, Any]:
    def when(field: str) -> str | None:
        return getattr(job, field).ToJsonString() if job.HasField(field) else None

    doc: dict[str, Any] = {
        "job_id": job.job_id,
        "model": job.model,
        "version": job.version,
        "state": jobs_pb2.JobState.Name(job.state).removeprefix("JOB_STATE_"),
        "counts": {
            "total": job.counts.total,
            "done": job.counts.done,
            "failed": job.counts.failed,
            "cached": job.counts.cached,
        },
        "created": when("created"),
        "started": when("started"),
        "finished": when("finished"),
        "next_offset": job.next_offset,
    }
    if job.error:
        doc["error"] = job.error
    if job.results:
        doc["results"] = [result_json(r) for r in job.results]
    return doc


def result_json(r: jobs_pb2.JobResult) -> dict[str, Any]:
    doc: dict[str, Any] = {"index": r.index, "ok": r.ok, "cached": r.cached}
    if r.ok:
        doc["classes"] = [{"index": c.index, "label": c.label, "score": c.score} for c in r.classes]
        if r.scores:
            doc["scores"] = list(r.scores)
    else:
        doc["error"] = r.error
    return doc


def _query_int(request: Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise InvalidInput(f"query parameter {name!r} must be an integer, got {raw[:32]!r}") from None
    if not low <= value <= high:
        raise InvalidInput(f"query parameter {name!r} must be {low}..{high}, got {value}")
    return value


def _first(request: Request, doc: dict[str, Any] | None = None) -> jobs_pb2.SubmitJobRequest:
    """The submission's first message, from the query (or a JSON body's fields)."""
    doc = doc or {}
    q = request.query_params

    def pick(name: str, default: Any) -> Any:
        return doc[name] if name in doc else q.get(name, default)

    try:
        timeout_s = float(pick("timeout_s", 0))
        first = jobs_pb2.SubmitJobRequest(
            model=str(pick("model", ""))[:64],
            version=int(pick("version", 0)),
            top_k=int(pick("top_k", 1)),
            timeout_s=timeout_s if math.isfinite(timeout_s) else -1.0,
            idempotency_key=str(pick("idempotency_key", request.headers.get("idempotency-key", "")))[:1024],
        )
    except (TypeError, ValueError, OverflowError):
        raise InvalidInput("version, top_k and timeout_s must be numbers") from None
    return first


class JobsRest:
    def __init__(self, plane: JobPlane, max_json_bytes: int, body_timeout_s: float) -> None:
        self.plane = plane
        self.max_json_bytes = max_json_bytes
        self.body_timeout_s = body_timeout_s

    def routes(self) -> list[tuple[str, Any, list[str]]]:
        return [
            ("/v1/jobs", self.submit, ["POST"]),
            ("/v1/jobs/{job_id}", self.get, ["GET"]),
            ("/v1/jobs/{job_id}", self.cancel, ["DELETE"]),
            ("/v1/jobs/{job_id}/cancel", self.cancel, ["POST"]),
            ("/v1/jobs/{job_id}/results", self.results, ["GET"]),
            ("/v1/jobs/{job_id}/watch", self.watch, ["GET"]),
        ]

    async def submit(self, request: Request) -> Response:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        owner = _owner()
        if ctype == "application/json":
            body = await read_body(request, self.max_json_bytes, self.body_timeout_s)
            try:
                doc = json.loads(body)
            except (UnicodeDecodeError, ValueError) as exc:
                raise InvalidInput(f"the job is not valid JSON: {str(exc)[:120]}") from None
            if not isinstance(doc, dict):
                raise InvalidInput("the job must be a JSON object")
            first = _first(request, doc)
            cfg = self.plane.plane.resolve(first.model, first.version)
            try:
                rows = np.asarray(doc.get("inputs"), dtype=tensor.numpy_dtype(cfg.input_dtype))
            except (TypeError, ValueError):
                raise InvalidInput(
                    f"inputs must be a list of {list(cfg.input_shape)} arrays of numbers"
                ) from None
            if rows.ndim != len(cfg.input_shape) + 1 or rows.shape[1:] != cfg.input_shape or not len(rows):
                raise InvalidInput(f"inputs must have shape [n, {', '.join(map(str, cfg.input_shape))}]")
            first.inputs.append(tensor.to_proto(rows))
            first.last, first.total_items = True, len(rows)
            got = await self.plane.submit(_one(first), owner, streamed=False)
        elif ctype in ("application/x-npy", "application/octet-stream"):
            first = _first(request)
            cfg = self.plane.plane.resolve(first.model, first.version)
            declared_length(request, (self.plane.max_job_items + 1) * cfg.input_nbytes + MAX_NPY_HEADER)
            stream = chunks(request, self.plane.upload_idle_timeout_s)
            messages = _stream(
                first, cfg, stream, npy=ctype == "application/x-npy", max_items=self.plane.max_job_items
            )
            client = request.scope.get("client") or ("", 0)
            got = await self.plane.submit(messages, owner, peer=f"ipv4:{client[0]}:{client[1]}")
        else:
            raise HttpError(
                415,
                f"content type {ctype[:64]!r}: send application/json, application/x-npy or "
                "application/octet-stream",
            )
        return JSONResponse(
            {"job_id": got.job_id, "created": got.created, "job": job_json(got.job)},
            status_code=201 if got.created else 200,
        )

    async def get(self, request: Request) -> Response:
        job = await self.plane.get(
            jobs_pb2.GetJobRequest(
                job_id=request.path_params["job_id"][:64],
                offset=_query_int(request, "offset", 0, 0, self.plane.max_job_items),
                limit=_query_int(request, "limit", 0, 0, PAGE),
                include_scores=request.query_params.get("include_scores", "") in ("1", "true"),
            ),
            _owner(),
        )
        return JSONResponse(job_json(job))

    async def cancel(self, request: Request) -> Response:
        return JSONResponse(job_json(await self.plane.cancel(request.path_params["job_id"][:64], _owner())))

    async def results(self, request: Request) -> Response:
        """Every result as JSON Lines, read a page at a time (the first page before the
        answer starts, so a bad id or a stranger's job is a plain 404)."""
        job_id = request.path_params["job_id"][:64]
        owner = _owner()
        scores = request.query_params.get("include_scores", "") in ("1", "true")

        def page(offset: int) -> jobs_pb2.GetJobRequest:
            return jobs_pb2.GetJobRequest(job_id=job_id, offset=offset, limit=PAGE, include_scores=scores)

        job = await self.plane.get(page(0), owner)

        async def lines() -> AsyncIterator[bytes]:
            current, offset = job, 0
            while True:
                yield b"".join(json.dumps(result_json(r)).encode() + b"\n" for r in current.results)
                if current.next_offset >= current.counts.total or current.next_offset <= offset:
                    return
                offset = current.next_offset
                current = await self.plane.get(page(offset), owner)

        return StreamingResponse(
            lines(),
            media_type="application/x-ndjson",
            headers={"Content-Disposition": f'attachment; filename="{job_id}.jsonl"'},
        )

    async def watch(self, request: Request) -> Response:
        """Server-Sent Events: the job now and on every change, until it ends."""
        job_id = request.path_params["job_id"][:64]
        owner = _owner()
        stream = self.plane.watch(job_id, owner)
        # The first state before the answer starts, so that errors are plain statuses.
        first = await anext(stream)

        async def events() -> AsyncIterator[bytes]:
            yield _event(first)
            try:
                async for job in stream:
                    yield _event(job)
            except Exception as exc:
                err = response_for(exc, "/v1/jobs/{job_id}/watch")
                yield b"event: error\ndata: " + bytes(err.body) + b"\n\n"

        return StreamingResponse(
            events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )


def _event(job: jobs_pb2.Job) -> bytes:
    return b"event: job\ndata: " + json.dumps(job_json(job)).encode() + b"\n\n"


def _owner() -> str:
    return caller()


async def _one(request: jobs_pb2.SubmitJobRequest) -> AsyncIterator[jobs_pb2.SubmitJobRequest]:
    yield request


async def _stream(
    first: jobs_pb2.SubmitJobRequest,
    cfg: ModelConfig,
    body: AsyncIterator[bytes],
    *,
    npy: bool,
    max_items: int,
) -> AsyncIterator[jobs_pb2.SubmitJobRequest]:
    """A streamed body as submission messages: the first names the model, each next one
    carries about MESSAGE_BYTES of whole rows, and the last (`last`, total_items) is sent
    only after the body ended with whole rows (and, for .npy, exactly the rows declared)."""
    yield first
    dtype = np.dtype(tensor.numpy_dtype(cfg.input_dtype)).newbyteorder("<")
    row_bytes = cfg.input_nbytes
    per_message = max(1, MESSAGE_BYTES // row_bytes)
    buffer = bytearray()
    declared: int | None = None
    source_dtype = dtype
    count = 0
    async for chunk in body:
        buffer += chunk
        if npy and declared is None:
            parsed = _npy_header(
                bytes(buffer[: MAX_NPY_HEADER + 16]), cfg, len(buffer) >= MAX_NPY_HEADER + 16
            )
            if parsed is None:
                continue
            skip, declared, source_dtype = parsed
            if declared > max_items:
                raise InvalidInput(f"a job holds at most {max_items} items; the .npy declares {declared}")
            row_bytes = source_dtype.itemsize * math.prod(cfg.input_shape)
            per_message = max(1, MESSAGE_BYTES // row_bytes)
            del buffer[:skip]
        while len(buffer) >= per_message * row_bytes:
            take = per_message * row_bytes
            count += per_message
            if count > (declared if declared is not None else max_items):
                raise InvalidInput(
                    "the body holds more rows than "
                    + ("its .npy header declares" if npy else "a job may hold")
                )
            yield _rows(cfg, bytes(buffer[:take]), source_dtype, dtype)
            del buffer[:take]
    if npy and declared is None:
        raise InvalidInput("the body ended before its .npy header did")
    if len(buffer) % row_bytes:
        raise InvalidInput(f"the body ends {len(buffer) % row_bytes} bytes into a row of {row_bytes} bytes")
    rest = len(buffer) // row_bytes
    if rest:
        count += rest
        if declared is not None and count > declared:
            raise InvalidInput("the body holds more rows than its .npy header declares")
        yield _rows(cfg, bytes(buffer), source_dtype, dtype)
    if declared is not None and count != declared:
        raise InvalidInput(f"the .npy header declares {declared} rows but the body held {count}")
    yield jobs_pb2.SubmitJobRequest(last=True, total_items=count)


def _rows(cfg: ModelConfig, data: bytes, source: np.dtype, dtype: np.dtype) -> jobs_pb2.SubmitJobRequest:
    array = np.frombuffer(data, dtype=source).astype(dtype, copy=False).reshape(-1, *cfg.input_shape)
    return jobs_pb2.SubmitJobRequest(inputs=[tensor.to_proto(array)])


def _npy_header(head: bytes, cfg: ModelConfig, complete: bool) -> tuple[int, int, np.dtype] | None:
    """(header bytes, rows, dtype) of a .npy body's start, None while more is needed."""
    if len(head) < 10:
        if complete:
            raise InvalidInput("the body is not a .npy file")
        return None
    if head[:6] != b"\x93NUMPY":
        raise InvalidInput("the body is not a .npy file (no \\x93NUMPY magic)")
    major = head[6]
    if major not in (1, 2, 3):
        raise InvalidInput(f".npy format version {major} is not supported")
    size_bytes = 2 if major == 1 else 4
    if len(head) < 8 + size_bytes:
        return None
    length = int.from_bytes(head[8 : 8 + size_bytes], "little")
    skip = 8 + size_bytes + length
    if skip > MAX_NPY_HEADER:
        raise InvalidInput(f"the .npy header is over {MAX_NPY_HEADER} bytes")
    if len(head) < skip:
        return None
    f = io.BytesIO(head[:skip])
    try:
        version = np.lib.format.read_magic(f)
        shape, fortran, source = (
            np.lib.format.read_array_header_1_0(f)
            if version[0] == 1
            else np.lib.format.read_array_header_2_0(f)
        )
    except (ValueError, SyntaxError) as exc:
        raise InvalidInput(f"the .npy header is malformed: {str(exc)[:120]}") from None
    if fortran:
        raise InvalidInput("the .npy array must be in C order")
    if source.kind not in "biuf" or source.hasobject:
        raise InvalidInput(f"the .npy dtype must be numeric, got {str(source)[:32]}")
    if len(shape) != len(cfg.input_shape) + 1 or tuple(shape[1:]) != cfg.input_shape:
        raise InvalidInput(
            f"the .npy array must have shape [n, {', '.join(map(str, cfg.input_shape))}], "
            f"got {list(shape)[:8]}"
        )
    return skip, int(shape[0]), source
