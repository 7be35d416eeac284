"""Thin gRPC servicer over the job plane. Every call passes the authenticated caller's
name (api/auth.py; "" with auth off) as the job owner: jobs are invisible to other names."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from inferpool.api.auth import caller
from inferpool.api.jobs import JobPlane
from inferpool.v1 import jobs_pb2, jobs_pb2_grpc


async def _one(request: jobs_pb2.SubmitJobRequest) -> AsyncIterator[jobs_pb2.SubmitJobRequest]:
    yield request


class JobServicer(jobs_pb2_grpc.JobServiceServicer):
    def __init__(self, plane: JobPlane) -> None:
        self.plane = plane

    async def SubmitJob(
        self, request: jobs_pb2.SubmitJobRequest, context: grpc.aio.ServicerContext
    ) -> jobs_pb2.SubmitJobResponse:
        return await self.plane.submit(_one(request), caller(context), streamed=False)

    async def SubmitJobStream(
        self, request_iterator: AsyncIterator[jobs_pb2.SubmitJobRequest], context: grpc.aio.ServicerContext
    ) -> jobs_pb2.SubmitJobResponse:
        return await self.plane.submit(request_iterator, caller(context), peer=context.peer())

    async def GetJob(
        self, request: jobs_pb2.GetJobRequest, context: grpc.aio.ServicerContext
    ) -> jobs_pb2.Job:
        return await self.plane.get(request, caller(context))

    async def WatchJob(
        self, request: jobs_pb2.WatchJobRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[jobs_pb2.Job]:
        async for job in self.plane.watch(request.job_id, caller(context)):
            yield job

    async def CancelJob(
        self, request: jobs_pb2.CancelJobRequest, context: grpc.aio.ServicerContext
    ) -> jobs_pb2.Job:
        return await self.plane.cancel(request.job_id, caller(context))
