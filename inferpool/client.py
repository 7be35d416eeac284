"""Python clients for the inferpool.v1 API: `Client` (blocking) and `AsyncClient` (asyncio).

Bulk work goes through `Client.submit(...)`, which returns a `Job` handle:
`job.wait()` follows its progress (a server stream, no polling), `job.results()`
pages through the results in index order, `job.cancel()` stops it. `AsyncClient`
has the same calls as coroutines, with `AsyncJob` handles. The handles live in
inferpool.jobclient; this module re-exports them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from inferpool import tensor
from inferpool.channel_policy import (
    MAX_ATTEMPTS,
    Attempts,
    channel_options,
    health_checked,
    new_idempotency_key,
    options_for,
    service_config,
)
from inferpool.channels import channel_credentials, open_aio_channel, open_channel
from inferpool.jobclient import AsyncJob, Job, JobTimeout, created_id
from inferpool.v1 import inference_pb2, inference_pb2_grpc, jobs_pb2, jobs_pb2_grpc

__all__ = [
    "MAX_ATTEMPTS",
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
    "created_id",
    "health_checked",
    "service_config",
    "submit_requests",
]

ClassifyResponse = inference_pb2.ClassifyResponse

# Upload messages stay well under gRPC's default 4 MiB receive limit.
UPLOAD_MESSAGE_BYTES = 1 << 20


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


def _upload(
    inputs: np.ndarray,
    model: str,
    version: int,
    top_k: int,
    idempotency_key: str,
    job_timeout_s: float,
    on_sent: Callable[[int], None] | None,
) -> Callable[[], Iterator[jobs_pb2.SubmitJobRequest]]:
    """A fresh stream of one submission's messages per attempt, every attempt with the
    same idempotency key (made here when the caller gave none), so a retried upload
    never makes a second job."""
    key = idempotency_key or new_idempotency_key()
    return lambda: submit_requests(
        inputs,
        model,
        version=version,
        top_k=top_k,
        idempotency_key=key,
        timeout_s=job_timeout_s,
        on_sent=on_sent,
    )


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
        self.channel = channel or open_channel(
            target,
            options_for(target, max_attempts, health_check),
            token=token,
            tls=tls,
            root_certificates=root_certificates,
            private_key=private_key,
            certificate_chain=certificate_chain,
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
        upload = _upload(inputs, model, version, top_k, idempotency_key, job_timeout_s, on_sent)
        attempts = Attempts(self.max_attempts, timeout_s)
        while True:
            requests = upload()
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
        self.max_attempts = max_attempts
        self.channel = open_aio_channel(
            target,
            options_for(target, max_attempts, health_check),
            token=token,
            tls=tls,
            root_certificates=root_certificates,
            private_key=private_key,
            certificate_chain=certificate_chain,
        )
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
        upload = _upload(inputs, model, version, top_k, idempotency_key, job_timeout_s, on_sent)
        attempts = Attempts(self.max_attempts, timeout_s)
        while True:
            requests = upload()
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
