"""Python clients for the inferpool.v1 API: `Client` (blocking) and `AsyncClient` (asyncio)."""

from __future__ import annotations

from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from inferpool import tensor
from inferpool.v1 import inference_pb2, inference_pb2_grpc

ClassifyResponse = inference_pb2.ClassifyResponse


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


class Client:
    """Blocking client. `timeout_s` becomes the gRPC deadline, which bounds the server's wait."""

    def __init__(self, target: str = "127.0.0.1:50051", *, channel: grpc.Channel | None = None) -> None:
        self.channel = channel or grpc.insecure_channel(target)
        self.stub = inference_pb2_grpc.InferenceServiceStub(self.channel)
        self._health = health_pb2_grpc.HealthStub(self.channel)

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
    def __init__(self, target: str = "127.0.0.1:50051") -> None:
        self.channel = grpc.aio.insecure_channel(target)
        self.stub = inference_pb2_grpc.InferenceServiceStub(self.channel)

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
