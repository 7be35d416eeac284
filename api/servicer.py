"""Thin gRPC servicer over the data plane."""

from __future__ import annotations

import grpc

from api.core import DataPlane
from api.metrics import instrumented
from api.status import abort
from inferpool.v1 import inference_pb2, inference_pb2_grpc


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane

    @instrumented("Classify")
    async def Classify(
        self, request: inference_pb2.ClassifyRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.ClassifyResponse:
        try:
            return await self.plane.classify(request, context.time_remaining())
        except Exception as exc:
            await abort(context, exc, "Classify")
