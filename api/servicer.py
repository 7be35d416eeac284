"""Thin gRPC servicer over the data plane."""

from __future__ import annotations

import grpc

from inferpool.api.core import DataPlane
from inferpool.v1 import inference_pb2, inference_pb2_grpc


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane

    async def Classify(
        self, request: inference_pb2.ClassifyRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.ClassifyResponse:
        return await self.plane.classify(request, context.time_remaining())
