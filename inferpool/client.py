"""Python clients for the inferpool.v1 API: `Client` (blocking) and `AsyncClient` (asyncio).

Bulk work goes through `Client.submit(...)`, which returns a `Job` handle:
`job.wait()` follows its progress (a server stream, no polling), `job.results()`
pages through the results in index order, `job.cancel()` stops it. `AsyncClient`
has the same calls as coroutines, with `AsyncJob` handles. The handles live in
inferpool.jobclient; this module re-exports them.
"""

from __future__ import annotations

import asyncio
import collections
import json
import random
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from inferpool import tensor
from inferpool.jobclient import AsyncJob, Job, JobTimeout, created_id
from inferpool.v1 import inference_pb2, inference_pb2_grpc, jobs_pb2, jobs_pb2_grpc

__all__ = [
    "UPLOAD_MESSAGE_BYTES",
    "AsyncClient",
    "AsyncJob",
    "ClassifyResponse",
    "Client",
    "Job",
    "JobTimeout",
    "channel_credentials",
    "channel_options",
    "classify_request",
    "health_checked",
    "service_config",
    "submit_requests",
]

ClassifyResponse = inference_pb2.ClassifyResponse

# Upload messages stay well under gRPC's default 4 MiB receive limit.
UPLOAD_MESSAGE_BYTES = 1 << 20

# Attempts per call, the first included (gRPC caps a retry policy at 5).
MAX_ATTEMPTS = 4
INITIAL_BACKOFF_S = 0.05
MAX_BACKOFF_S = 1.0
BACKOFF_MULTIPLIER = 2.0
# Keepalive matched to the server's defaults (inferpool/settings.py): the server drops a
# client that pings more often than min_client_ping_interval_s (10 s) while no call is
# open, so the client pings every 30 s, and only while calls are open.
KEEPALIVE_TIME_S = 30.0
KEEPALIVE_TIMEOUT_S = 10.0

# The calls a retry cannot harm: reading, classifying (the same input gives the same
# answer; a retry at worst computes it twice), cancelling (a cancelled job stays
# cancelled), health. A submit creates a job, so it is not here: the channel cannot tell
# whether a submit carries an idempotency key, and `submit()` retries on its own, with
# the key it always sends (see docs/scaling.md).
RETRYABLE_METHODS: tuple[tuple[str, str], ...] = (
    ("inferpool.v1.InferenceService", ""),
    ("inference.GRPCInferenceService", ""),
    ("inferpool.v1.JobService", "GetJob"),
    ("inferpool.v1.JobService", "WatchJob"),
    ("inferpool.v1.JobService", "CancelJob"),
    ("grpc.health.v1.Health", "Check"),
)
# Only UNAVAILABLE: the call did not run (no replica, a replica draining or gone, the
# connection cut before an answer). RESOURCE_EXHAUSTED means "overloaded": an immediate
# retry adds load where it hurts. DEADLINE_EXCEEDED has used the caller's time.
RETRYABLE_CODES = ("UNAVAILABLE",)


def health_checked(target: str) -> bool:
    """Whether a channel to `target` watches each address's health by default: yes for
    a target naming replicas through a resolver (`dns:`, `ipv4:`, `ipv6:`), no for a
    plain host:port, which is usually a proxy: its health answer would be the one of
    whichever replica the proxy picked, and the proxy checks its replicas itself."""
    return target.split(":", 1)[0] in ("dns", "ipv4", "ipv6")


def service_config(max_attempts: int = MAX_ATTEMPTS, *, health_check: bool = False) -> str:
    """The gRPC service config (JSON) every client channel carries: `round_robin` over
    every address the target resolves to (`dns:///api:50051`, `ipv4:10.0.0.1:50051,
    10.0.0.2:50051`), and a retry policy for UNAVAILABLE on the calls safe to repeat.
    gRPC jitters each backoff (uniform in [0, backoff]) and never retries past the
    call's deadline. `max_attempts` 1 turns retries off. With `health_check`, an
    address whose `grpc.health.v1` status is not SERVING (a replica draining, or
    without Redis) gets no calls; a server without the health service counts as up."""
    config: dict[str, Any] = {"loadBalancingConfig": [{"round_robin": {}}]}
    if health_check:
        config["healthCheckConfig"] = {"serviceName": ""}
    if max_attempts > 1:
        config["methodConfig"] = [
            {
                "name": [{"service": s, **({"method": m} if m else {})} for s, m in RETRYABLE_METHODS],
                "retryPolicy": {
                    "maxAttempts": min(max_attempts, 5),
                    "initialBackoff": f"{INITIAL_BACKOFF_S}s",
                    "maxBackoff": f"{MAX_BACKOFF_S}s",
                    "backoffMultiplier": BACKOFF_MULTIPLIER,
                    "retryableStatusCodes": list(RETRYABLE_CODES),
                },
            }
        ]
    return json.dumps(config)


def channel_options(max_attempts: int = MAX_ATTEMPTS, *, health_check: bool = False) -> list[tuple[str, Any]]:
    """The options of a client channel: the service config, and keepalive the server accepts."""
    return [
        ("grpc.service_config", service_config(max_attempts, health_check=health_check)),
        ("grpc.enable_retries", 1 if max_attempts > 1 else 0),
        ("grpc.keepalive_time_ms", int(KEEPALIVE_TIME_S * 1000)),
        ("grpc.keepalive_timeout_ms", int(KEEPALIVE_TIMEOUT_S * 1000)),
        ("grpc.keepalive_permit_without_calls", 0),
        # A long WatchJob may carry no data for minutes; keep pinging it.
        ("grpc.http2.max_pings_without_data", 0),
    ]


class _Attempts:
    """Client-side retries for submits (which the service config leaves alone): bounded
    attempts, exponential backoff with full jitter, never past the caller's deadline."""

    def __init__(self, max_attempts: int, timeout_s: float | None) -> None:
        self.left = max(1, max_attempts)
        self.ends = None if timeout_s is None else time.monotonic() + timeout_s
        self.backoff_s = INITIAL_BACKOFF_S

    def timeout(self) -> float | None:
        """The next attempt's deadline: what is left of the caller's."""
        return None if self.ends is None else max(0.0, self.ends - time.monotonic())

    def pause(self, exc: grpc.RpcError) -> float | None:
        """How long to wait before the next attempt, or None: give up (raise `exc`)."""
        self.left -= 1
        if self.left <= 0 or exc.code() != grpc.StatusCode.UNAVAILABLE:
            return None
        pause = random.uniform(0, self.backoff_s)
        self.backoff_s = min(self.backoff_s * BACKOFF_MULTIPLIER, MAX_BACKOFF_S)
        if self.ends is not None and time.monotonic() + pause >= self.ends:
            return None
        return pause


def new_idempotency_key() -> str:
    return uuid.uuid4().hex


class _Bearer(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds `authorization: Bearer <token>` to every call. An interceptor rather than
    call credentials, because grpc refuses call credentials on plain-text channels and
    tests and loopback deployments run without TLS (there the token travels in clear)."""

    def __init__(self, token: str) -> None:
        self._header = ("authorization", f"Bearer {token}")

    def _details(self, details: Any) -> Any:
        return _CallDetails(
            details.method,
            details.timeout,
            [*(details.metadata or ()), self._header],
            details.credentials,
            details.wait_for_ready,
            details.compression,
        )

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return continuation(self._details(details), request_iterator)


class _CallDetails(
    collections.namedtuple(
        "_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")
    ),
    grpc.ClientCallDetails,
):
    pass


class _AsyncBearer(
    grpc.aio.UnaryUnaryClientInterceptor,
    grpc.aio.UnaryStreamClientInterceptor,
    grpc.aio.StreamUnaryClientInterceptor,
):
    """The asyncio twin of _Bearer."""

    def __init__(self, token: str) -> None:
        self._header = ("authorization", f"Bearer {token}")

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(details.metadata or ()), self._header)
        return details._replace(metadata=metadata)

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)

    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)

    async def intercept_stream_unary(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return await continuation(self._details(details), request_iterator)


def channel_credentials(
    root_certificates: bytes | None = None,
    private_key: bytes | None = None,
    certificate_chain: bytes | None = None,
) -> grpc.ChannelCredentials:
    """TLS credentials: `root_certificates` (PEM) verifies the server (None: the system
    roots); a key and certificate chain are the client's, for mutual TLS."""
    return grpc.ssl_channel_credentials(root_certificates, private_key, certificate_chain)


def _channel(
    target: str,
    token: str | None,
    tls: bool,
    root_certificates: bytes | None,
    private_key: bytes | None,
    certificate_chain: bytes | None,
    options: list[tuple[str, Any]],
) -> grpc.Channel:
    if tls or root_certificates or private_key or certificate_chain:
        creds = channel_credentials(root_certificates, private_key, certificate_chain)
        channel = grpc.secure_channel(target, creds, options=options)
    else:
        channel = grpc.insecure_channel(target, options=options)
    return grpc.intercept_channel(channel, _Bearer(token)) if token else channel


def classify_request(
    array: np.ndarray, model: str, *, version: int = 0, top_k: int = 1, request_id: str = ""
) -> inference_pb2.ClassifyRequest:
    """A request for one input; `array` carries the batch dimension of 1."""
    return inference_pb2.ClassifyRequest(
        model=model,
        version=version,
        input=tensor.to_proto(array),
        top_k=top_k,
        request_id=request_id,
    )


def submit_requests(
    inputs: np.ndarray,
    model: str,
    *,
    version: int = 0,
    top_k: int = 1,
    idempotency_key: str = "",
    timeout_s: float = 0.0,
    message_bytes: int = UPLOAD_MESSAGE_BYTES,
    on_sent: Callable[[int], None] | None = None,
) -> Iterator[jobs_pb2.SubmitJobRequest]:
    """The messages of a streamed submission: `inputs` is [N, *input shape]; item i is
    inputs[i:i+1]. Each message carries its items as one multi-row input (a bytes
    slice of the array: no work per item); the last one is marked `last` with the
    item count, without which the server fails the job instead of sealing it (a
    stream that merely ends may have been cut). Built lazily, so a large job never
    exists twice in memory."""
    if inputs.ndim < 1:
        raise ValueError("inputs must have a leading item dimension")
    dtype = tensor.to_proto(inputs[:0]).dtype  # ValueError for dtypes the API does not speak
    array = np.ascontiguousarray(inputs, dtype=tensor.numpy_dtype(dtype))
    request = jobs_pb2.SubmitJobRequest(
        model=model, version=version, top_k=top_k, idempotency_key=idempotency_key, timeout_s=timeout_s
    )
    per_message = max(1, message_bytes // max(1, array[:1].nbytes))
    for start in range(0, len(array), per_message):
        rows = array[start : start + per_message]
        request.inputs.add(dtype=dtype, shape=rows.shape, data=rows.tobytes())
        if start + per_message >= len(array):
            request.last, request.total_items = True, len(array)
        yield request
        if on_sent is not None:
            on_sent(len(rows))
        request = jobs_pb2.SubmitJobRequest()
    if request.model:  # the first message always goes, even for an empty job
        request.last, request.total_items = True, 0
        yield request
        if on_sent is not None:
            on_sent(0)


class Client:
    """Blocking client. `timeout_s` becomes the gRPC deadline, which bounds the server's wait."""

    def __init__(
        self,
        target: str = "127.0.0.1:50051",
        *,
        channel: grpc.Channel | None = None,
        token: str | None = None,
        tls: bool = False,
        root_certificates: bytes | None = None,
        private_key: bytes | None = None,
        certificate_chain: bytes | None = None,
        max_attempts: int = MAX_ATTEMPTS,
        health_check: bool | None = None,
    ) -> None:
        """`token` is sent as `authorization: Bearer <token>` on every call. TLS is on
        with `tls=True` or any of the PEM arguments: `root_certificates` verifies the
        server (None: system roots); `private_key` + `certificate_chain` for mutual TLS.
        `target` may name several replicas (`dns:///api:50051`, `ipv4:a:p,b:p`): calls
        go round-robin over them, skipping those not SERVING (`health_check`; by
        default on for such targets, off for a plain host:port, e.g. a proxy). Calls
        safe to repeat are tried up to `max_attempts` times on UNAVAILABLE, within
        their deadline (1: never retried)."""
        self.max_attempts = max_attempts
        self.channel = channel or _channel(
            target,
            token,
            tls,
            root_certificates,
            private_key,
            certificate_chain,
            channel_options(
                max_attempts, health_check=health_checked(target) if health_check is None else health_check
            ),
        )
        self.stub = inference_pb2_grpc.InferenceServiceStub(self.channel)
        self.jobs = jobs_pb2_grpc.JobServiceStub(self.channel)
        self._health = health_pb2_grpc.HealthStub(self.channel)

    def submit(
        self,
        inputs: np.ndarray,
        model: str,
        *,
        version: int = 0,
        top_k: int = 1,
        idempotency_key: str = "",
        job_timeout_s: float = 0.0,
        timeout_s: float | None = 600.0,
        on_sent: Callable[[int], None] | None = None,
    ) -> Job:
        """Uploads a bulk job ([N, *input shape]) and returns once it is recorded and
        enqueued. `job_timeout_s` bounds the job's run time (0: the server's TTL);
        `timeout_s` bounds the upload, retries included. Without an `idempotency_key`
        one is made here, so an upload that failed UNAVAILABLE is sent again (up to
        `max_attempts` times) and never makes a second job."""
        key = idempotency_key or new_idempotency_key()
        attempts = _Attempts(self.max_attempts, timeout_s)
        while True:
            requests = submit_requests(
                inputs,
                model,
                version=version,
                top_k=top_k,
                idempotency_key=key,
                timeout_s=job_timeout_s,
                on_sent=on_sent,
            )
            try:
                response: jobs_pb2.SubmitJobResponse = self.jobs.SubmitJobStream(
                    requests, timeout=attempts.timeout()
                )
            except grpc.RpcError as exc:
                pause = attempts.pause(exc)
                if pause is None:
                    raise
                time.sleep(pause)
                continue
            return Job(self, created_id(response, len(inputs)))

    def job(self, job_id: str) -> Job:
        return Job(self, job_id)

    def classify(
        self, array: np.ndarray, model: str, *, timeout_s: float | None = 10.0, **kwargs: Any
    ) -> ClassifyResponse:
        response: ClassifyResponse = self.stub.Classify(
            classify_request(array, model, **kwargs), timeout=timeout_s
        )
        return response

    def classify_future(
        self, array: np.ndarray, model: str, *, timeout_s: float | None = 10.0, **kwargs: Any
    ) -> grpc.Future:
        """Non-blocking: many calls in flight from one thread; `.result()` waits for one."""
        return self.stub.Classify.future(classify_request(array, model, **kwargs), timeout=timeout_s)

    def health(self, service: str = "", timeout_s: float = 2.0) -> str:
        resp = self._health.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status))

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        grpc.channel_ready_future(self.channel).result(timeout=timeout_s)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient:
    def __init__(
        self,
        target: str = "127.0.0.1:50051",
        *,
        token: str | None = None,
        tls: bool = False,
        root_certificates: bytes | None = None,
        private_key: bytes | None = None,
        certificate_chain: bytes | None = None,
        max_attempts: int = MAX_ATTEMPTS,
        health_check: bool | None = None,
    ) -> None:
        """The same `token`, TLS, target and retry options as `Client`."""
        interceptors = [_AsyncBearer(token)] if token else None
        self.max_attempts = max_attempts
        options = channel_options(
            max_attempts, health_check=health_checked(target) if health_check is None else health_check
        )
        if tls or root_certificates or private_key or certificate_chain:
            creds = channel_credentials(root_certificates, private_key, certificate_chain)
            self.channel = grpc.aio.secure_channel(target, creds, options=options, interceptors=interceptors)
        else:
            self.channel = grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)
        self.stub = inference_pb2_grpc.InferenceServiceStub(self.channel)
        self.jobs = jobs_pb2_grpc.JobServiceStub(self.channel)

    async def submit(
        self,
        inputs: np.ndarray,
        model: str,
        *,
        version: int = 0,
        top_k: int = 1,
        idempotency_key: str = "",
        job_timeout_s: float = 0.0,
        timeout_s: float | None = 600.0,
        on_sent: Callable[[int], None] | None = None,
    ) -> AsyncJob:
        """As `Client.submit`: uploads a bulk job (its last message marked) and returns
        its handle once it is recorded and enqueued; retried as `Client.submit` is."""
        key = idempotency_key or new_idempotency_key()
        attempts = _Attempts(self.max_attempts, timeout_s)
        while True:
            requests = submit_requests(
                inputs,
                model,
                version=version,
                top_k=top_k,
                idempotency_key=key,
                timeout_s=job_timeout_s,
                on_sent=on_sent,
            )
            try:
                response: jobs_pb2.SubmitJobResponse = await self.jobs.SubmitJobStream(
                    requests, timeout=attempts.timeout()
                )
            except grpc.RpcError as exc:
                pause = attempts.pause(exc)
                if pause is None:
                    raise
                await asyncio.sleep(pause)
                continue
            return AsyncJob(self, created_id(response, len(inputs)))

    def job(self, job_id: str) -> AsyncJob:
        return AsyncJob(self, job_id)

    async def classify(
        self, array: np.ndarray, model: str, *, timeout_s: float | None = 10.0, **kwargs: Any
    ) -> ClassifyResponse:
        response: ClassifyResponse = await self.stub.Classify(
            classify_request(array, model, **kwargs), timeout=timeout_s
        )
        return response

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
