"""The KServe v2 / Open Inference Protocol gRPC front (`inference.GRPCInferenceService`).

Protocol translation only, so that unmodified Triton and KServe clients work: a
ModelInfer batch of N rows becomes N single-item DataPlane.infer calls, exactly the
path inferpool.v1 Classify takes (validation, cache, coalescing, queue, deadline).
Domain errors become status codes in api.status, as for every other front. The
messages' tensors are decoded and encoded in api/kserve_tensors.py.

The contract is Triton's `grpc_service.proto` (vendored in protos/inferpool/triton/), a
wire-compatible superset of KServe's: besides the KServe RPCs it answers Triton's
ModelConfig and ModelStatistics, which perf_analyzer needs; the other Triton-only RPCs
(streaming, repository control, shared memory, trace and log settings) are UNIMPLEMENTED.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2

import inferpool
from inferpool.api.auth import caller
from inferpool.api.core import DataPlane, Inferred, new_id
from inferpool.api.kserve_tensors import (
    CLASSIFICATION,
    OUTPUT_NAME,
    infer_response,
    kserve_datatype,
    parse_version,
    request_timeout_s,
    requested_outputs,
    split_rows,
)
from inferpool.errors import InvalidInput, ModelNotFound
from inferpool.repository import ModelConfig
from inferpool.triton import grpc_service_pb2 as pb
from inferpool.triton import grpc_service_pb2_grpc as pb_grpc
from inferpool.triton import model_config_pb2 as mc

SERVICE: str = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name

# Triton's name for TorchScript models (its PyTorch backend), in ModelMetadata and ModelConfig.
PLATFORM = "pytorch_libtorch"
BACKEND = "pytorch"
# Triton's (platform, backend) for each repository platform.
TRITON_PLATFORMS = {
    "torchscript": (PLATFORM, BACKEND),
    "torch_export": ("torch_export", BACKEND),
    "onnxruntime": ("onnxruntime_onnx", "onnxruntime"),
}


def model_metadata(plane: DataPlane, cfg: ModelConfig) -> pb.ModelMetadataResponse:
    classes = len(cfg.labels) or -1  # the model's width is unknown without labels
    return pb.ModelMetadataResponse(
        name=cfg.name,
        versions=[str(v) for v in plane.repository.versions(cfg.name)],
        platform=TRITON_PLATFORMS[cfg.platform][0],
        inputs=[
            pb.ModelMetadataResponse.TensorMetadata(
                name=cfg.input_name, datatype=kserve_datatype(cfg.input_dtype), shape=[-1, *cfg.input_shape]
            )
        ],
        outputs=[
            pb.ModelMetadataResponse.TensorMetadata(name=OUTPUT_NAME, datatype="FP32", shape=[-1, classes])
        ],
    )


def model_config(plane: DataPlane, cfg: ModelConfig) -> mc.ModelConfig:
    """Triton's ModelConfig for one repository model version, as Triton would report it
    after auto-completion: dims without the batch dimension, which max_batch_size implies."""
    classes = len(cfg.labels) or -1
    return mc.ModelConfig(
        name=cfg.name,
        platform=TRITON_PLATFORMS[cfg.platform][0],
        backend=TRITON_PLATFORMS[cfg.platform][1],
        # Every version in the repository is served (version "" picks the latest).
        version_policy=mc.ModelVersionPolicy(all=mc.ModelVersionPolicy.All()),
        max_batch_size=cfg.max_batch_size,
        input=[
            mc.ModelInput(
                name=cfg.input_name,
                data_type=f"TYPE_{kserve_datatype(cfg.input_dtype)}",  # TYPE_FP32 etc.
                dims=list(cfg.input_shape),
            )
        ],
        output=[mc.ModelOutput(name=OUTPUT_NAME, data_type=mc.TYPE_FP32, dims=[classes])],
        # Workers merge queued rows into batches of up to max_batch_size, waiting at most max_delay_ms.
        dynamic_batching=mc.ModelDynamicBatching(max_queue_delay_microseconds=round(cfg.max_delay_ms * 1000)),
        response_cache=mc.ModelResponseCache(enable=plane.cache.enabled),
    )


@dataclass
class ModelStats:
    """Triton's per-model statistics, for the ModelInfer requests this front answered
    (inferpool.v1 Classify traffic is not in them). Durations are wall-clock nanoseconds:
    success/fail for whole requests; queue and compute_infer as the workers report them for
    each computed row. Cache lookups and tensor (de)serialization are not timed separately:
    compute_input, compute_output, cache_hit and cache_miss carry counts with 0 ns."""

    last_inference_ms: int = 0
    ok: int = 0
    ok_ns: int = 0
    failed: int = 0
    failed_ns: int = 0
    hits: int = 0
    misses: int = 0
    queue_ns: int = 0
    compute_ns: int = 0
    # Sum of 1/batch_size over computed rows: the batches, were all their rows from this front.
    executions: float = 0.0

    def succeeded(self, results: Sequence[Inferred], elapsed_ns: int) -> None:
        self.last_inference_ms = time.time_ns() // 1_000_000
        self.ok += 1
        self.ok_ns += elapsed_ns
        for result in results:
            reply = result.reply
            if reply is None:
                self.hits += 1
                continue
            self.misses += 1
            self.queue_ns += round(reply.queue_ms * 1e6)
            self.compute_ns += round(reply.compute_ms * 1e6)
            self.executions += 1 / max(1, reply.batch_size)

    def failure(self, elapsed_ns: int) -> None:
        self.last_inference_ms = time.time_ns() // 1_000_000
        self.failed += 1
        self.failed_ns += elapsed_ns

    def to_proto(self, cfg: ModelConfig) -> pb.ModelStatistics:
        d = pb.StatisticDuration
        return pb.ModelStatistics(
            name=cfg.name,
            version=str(cfg.version),
            last_inference=self.last_inference_ms,
            inference_count=self.misses,  # as Triton counts: rows the model computed, not cache hits
            execution_count=round(self.executions),
            inference_stats=pb.InferStatistics(
                success=d(count=self.ok, ns=self.ok_ns),
                fail=d(count=self.failed, ns=self.failed_ns),
                queue=d(count=self.misses, ns=self.queue_ns),
                compute_input=d(count=self.misses),
                compute_infer=d(count=self.misses, ns=self.compute_ns),
                compute_output=d(count=self.misses),
                cache_hit=d(count=self.hits),
                cache_miss=d(count=self.misses),
            ),
        )


class KServeServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, plane: DataPlane, health_servicer: health.aio.HealthServicer | None = None) -> None:
        self.plane = plane
        self.health = health_servicer
        # By (scope, model, version): with cache keys scoped per caller, each caller sees
        # only its own calls' statistics (hit counts would tell it about other tenants').
        self.stats: defaultdict[tuple[str, str, int], ModelStats] = defaultdict(ModelStats)

    def _scope(self) -> str:
        return self.plane.cache.keys.scope(caller())

    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerReadyResponse:
        if self.health is None:
            return pb.ServerReadyResponse(ready=True)
        # The same answer as grpc.health.v1 for the whole server: Redis reachable and not draining.
        status = await self.health.Check(health_pb2.HealthCheckRequest(service=""), context)
        return pb.ServerReadyResponse(ready=status.status == health_pb2.HealthCheckResponse.SERVING)

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(
            name="inferpool", version=inferpool.__version__, extensions=[CLASSIFICATION]
        )

    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelReadyResponse:
        try:
            self.plane.resolve(request.name, parse_version(request.version))
        except ModelNotFound:
            # As Triton does: an unknown model is simply not ready.
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        cfg = self.plane.resolve(request.name, parse_version(request.version))
        return model_metadata(self.plane, cfg)

    async def ModelConfig(
        self, request: pb.ModelConfigRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelConfigResponse:
        cfg = self.plane.resolve(request.name, parse_version(request.version))
        return pb.ModelConfigResponse(config=model_config(self.plane, cfg))

    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelStatisticsResponse:
        """As Triton: no name means every model, no version every version of it."""
        repository = self.plane.repository
        if request.name:
            version = parse_version(request.version)
            self.plane.resolve(request.name, version)  # NOT_FOUND for unknown ones
            versions = [version] if version else repository.versions(request.name)
            configs = [repository.resolve(request.name, v) for v in versions]
        elif request.version:
            raise InvalidInput("a model version needs a model name")
        else:
            configs = repository.all()
        scope = self._scope()
        stats = [self.stats.get((scope, c.name, c.version), ModelStats()).to_proto(c) for c in configs]
        return pb.ModelStatisticsResponse(model_stats=stats)

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        t0 = time.perf_counter_ns()
        stats: ModelStats | None = None
        try:
            cfg = self.plane.resolve(request.model_name, parse_version(request.model_version))
            stats = self.stats[self._scope(), cfg.name, cfg.version]
            rows = split_rows(cfg, request)
            outputs = requested_outputs(cfg, request)
            request_id = request.id or new_id()
            timeout_s = request_timeout_s(request, context.time_remaining())
            # One task per row, so each is cached, coalesced and batched on its own; the
            # first failure fails the request and cancels the rows still waiting.
            try:
                async with asyncio.TaskGroup() as group:
                    tasks = [
                        group.create_task(
                            self.plane.infer(
                                cfg, row, request_id if len(rows) == 1 else f"{request_id}/{i}", timeout_s
                            )
                        )
                        for i, row in enumerate(rows)
                    ]
            except ExceptionGroup as failed:
                raise failed.exceptions[0] from None
            results = [t.result() for t in tasks]
            response = infer_response(cfg, request, outputs, results)
            stats.succeeded(results, time.perf_counter_ns() - t0)
            return response
        except Exception:
            if stats is not None:
                stats.failure(time.perf_counter_ns() - t0)
            raise


def add_to_server(
    server: grpc.aio.Server, plane: DataPlane, health_servicer: health.aio.HealthServicer | None = None
) -> str:
    """Serves the KServe v2 service (Triton's superset) on `server`; returns its full name for reflection and
    health. With the server's health servicer, ServerReady follows its overall status."""
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(KServeServicer(plane, health_servicer), server)
    return SERVICE
