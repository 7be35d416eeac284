"""KServe v2 ModelInfer messages <-> inferpool tensors, for api/kserve.py's servicer.

Decoding: a request's one input checked against the model's config (name, datatype,
rank and shape, batch size, byte or value count) and split into single-row tensors;
its scheduling parameters and requested outputs range-checked. Encoding: the rows'
probabilities as Triton answers them (raw FP32, or classification strings as BYTES).
Every refusal is InvalidInput naming the field, echoing at most a short prefix.
"""

from __future__ import annotations

import math
import re
import struct
from collections.abc import Sequence

import numpy as np

from inferpool import tensor
from inferpool.api.core import Inferred
from inferpool.errors import InvalidInput
from inferpool.repository import ModelConfig
from inferpool.triton import grpc_service_pb2 as pb
from inferpool.v1 import tensor_pb2

# Workers always answer softmax probabilities, whatever the model's own output is
# (config output.kind), so the one output is named for what it holds.
OUTPUT_NAME = "probabilities"
# Triton's per-output parameter: answer the top k classes as "score:index:label" strings.
CLASSIFICATION = "classification"
# Response parameter: how many of the request's rows were answered from the cache.
CACHE_HITS = "inferpool_cache_hits"
# Response parameters when a row was computed: its wait in the queue, its batch's compute
# time and size, as the worker reported them.
QUEUE_MS = "inferpool_queue_ms"
COMPUTE_MS = "inferpool_compute_ms"
BATCH_SIZE = "inferpool_batch_size"
# Triton's request parameters for scheduling: `timeout` in microseconds (0: none), a
# bound on the request's wait besides its gRPC deadline, and `priority` (0: the
# model's default), accepted and not used (interactive requests have one priority).
TIMEOUT = "timeout"
PRIORITY = "priority"
MAX_TIMEOUT_US = 24 * 3600 * 10**6

# KServe datatype <-> inferpool.tensor dtype name (the dtypes a model may declare).
_DATATYPES = {
    "BOOL": "bool",
    "UINT8": "uint8",
    "INT8": "int8",
    "INT32": "int32",
    "INT64": "int64",
    "FP16": "float16",
    "FP32": "float32",
    "FP64": "float64",
}
_KSERVE_NAMES = {name: datatype for datatype, name in _DATATYPES.items()}
# Where each datatype travels when a client sends typed `contents` instead of raw bytes.
_CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "INT8": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}
_VERSION_RE = re.compile(r"[1-9][0-9]{0,17}")


def parse_version(version: str) -> int:
    """KServe versions are strings: "" is the latest (our 0), otherwise a positive integer."""
    if version == "":
        return 0
    if not _VERSION_RE.fullmatch(version):
        raise InvalidInput(f"model version must be '' (latest) or a positive integer, got {version[:32]!r}")
    return int(version)


def contents_field(datatype: str) -> str | None:
    """The typed `contents` field that carries `datatype`'s values (None: raw bytes only)."""
    return _CONTENTS_FIELD.get(datatype)


def kserve_datatype(dtype: int) -> str:
    return _KSERVE_NAMES[tensor.dtype_name(dtype)]


def split_rows(cfg: ModelConfig, request: pb.ModelInferRequest) -> list[tensor_pb2.Tensor]:
    """The request's one input as N single-row tensors shaped as the model takes them."""
    if len(request.inputs) != 1:
        raise InvalidInput(f"model {cfg.name!r} takes exactly one input ({cfg.input_name!r})")
    spec = request.inputs[0]
    if spec.name != cfg.input_name:
        raise InvalidInput(f"model {cfg.name!r} has input {cfg.input_name!r}, got {spec.name[:64]!r}")
    want = kserve_datatype(cfg.input_dtype)
    if spec.datatype != want:
        raise InvalidInput(f"input {spec.name!r} takes {want}, got {spec.datatype[:16]!r}")
    # The rank first: a claimed shape of millions of dimensions is neither copied nor echoed.
    if len(spec.shape) != len(cfg.input_shape) + 1:
        raise InvalidInput(
            f"input {spec.name!r} takes shape {[-1, *cfg.input_shape]}, got {len(spec.shape)} dimensions"
        )
    shape = tuple(spec.shape)
    if shape[1:] != cfg.input_shape:
        raise InvalidInput(f"input {spec.name!r} takes shape {[-1, *cfg.input_shape]}, got {list(shape)}")
    rows = shape[0]
    # Each row is its own cache lookup and queue item: bound the fan-out like Triton does.
    if not 1 <= rows <= cfg.max_batch_size:
        raise InvalidInput(f"batch size must be 1..{cfg.max_batch_size} for model {cfg.name!r}, got {rows}")
    dtype = np.dtype(_DATATYPES[want]).newbyteorder("<")
    count = math.prod(shape)
    if request.raw_input_contents:
        if len(request.raw_input_contents) != 1:
            raise InvalidInput("raw_input_contents must hold one entry per input")
        if spec.HasField("contents"):
            raise InvalidInput(f"input {spec.name!r} has both raw and typed contents")
        raw = request.raw_input_contents[0]
        if len(raw) != count * dtype.itemsize:
            raise InvalidInput(
                f"input {spec.name!r} of shape {list(shape)} {want} needs {count * dtype.itemsize} bytes, "
                f"got {len(raw)}"
            )
        array = np.frombuffer(raw, dtype=dtype)
    else:
        field = _CONTENTS_FIELD.get(want)
        if field is None:
            raise InvalidInput(f"{want} inputs must be sent as raw_input_contents")
        values = getattr(spec.contents, field)
        if len(values) != count:
            raise InvalidInput(
                f"input {spec.name!r} of shape {list(shape)} needs {count} values, got {len(values)}"
            )
        wide = np.asarray(values)
        array = wide.astype(dtype)
        if dtype.kind in "iu" and not np.array_equal(array, wide):
            raise InvalidInput(f"input {spec.name!r} has values out of {want} range")
    batch = array.reshape(shape)
    return [tensor.to_proto(batch[i : i + 1]) for i in range(rows)]


def _int_parameter(request: pb.ModelInferRequest, name: str, limit: int) -> int:
    """A non-negative integer request parameter (0 when absent), as int64 or uint64."""
    if name not in request.parameters:
        return 0
    param = request.parameters[name]
    kind = param.WhichOneof("parameter_choice")
    if kind not in ("int64_param", "uint64_param"):
        raise InvalidInput(f"parameter {name!r} must be an int64 or uint64 parameter, got {kind}")
    value: int = getattr(param, kind)
    if not 0 <= value <= limit:
        raise InvalidInput(f"parameter {name!r} must be 0..{limit}, got {value}")
    return value


def request_timeout_s(request: pb.ModelInferRequest, remaining_s: float | None) -> float | None:
    """The request's wait bound: its gRPC deadline, shortened by a `timeout` parameter."""
    _int_parameter(request, PRIORITY, 2**63 - 1)
    timeout_us = _int_parameter(request, TIMEOUT, MAX_TIMEOUT_US)
    if not timeout_us:
        return remaining_s
    return timeout_us / 1e6 if remaining_s is None else min(remaining_s, timeout_us / 1e6)


def requested_outputs(cfg: ModelConfig, request: pb.ModelInferRequest) -> list[tuple[str, int]]:
    """(name, classification k or 0) per output to answer; none requested means all."""
    if not request.outputs:
        return [(OUTPUT_NAME, 0)]
    wanted: list[tuple[str, int]] = []
    for out in request.outputs:
        if out.name != OUTPUT_NAME:
            raise InvalidInput(f"model {cfg.name!r} has output {OUTPUT_NAME!r}, not {out.name[:64]!r}")
        if any(name == out.name for name, _ in wanted):
            raise InvalidInput(f"output {out.name!r} is requested twice")
        k = 0
        if CLASSIFICATION in out.parameters:
            param = out.parameters[CLASSIFICATION]
            if param.WhichOneof("parameter_choice") != "int64_param" or param.int64_param <= 0:
                raise InvalidInput(f"{CLASSIFICATION!r} must be a positive int64 parameter")
            k = param.int64_param
        wanted.append((out.name, k))
    return wanted


def classification(cfg: ModelConfig, probs: np.ndarray, k: int) -> list[bytes]:
    """Triton's classification strings, row-major [N, k]: best first, "%f:index[:label]"."""
    k = min(k, probs.shape[1])
    out = []
    for row in probs:
        for j in np.argsort(-row, kind="stable")[:k]:
            text = f"{row[j]:f}:{j}" + (f":{cfg.label(int(j))}" if cfg.labels else "")
            out.append(text.encode())
    return out


def serialize_bytes(items: Sequence[bytes]) -> bytes:
    """Triton's raw BYTES layout: each element as a little-endian uint32 length, then the bytes."""
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


def infer_response(
    cfg: ModelConfig, request: pb.ModelInferRequest, outputs: list[tuple[str, int]], results: list[Inferred]
) -> pb.ModelInferResponse:
    probs = np.stack([np.asarray(r.scores.values, dtype="<f4") for r in results])
    response = pb.ModelInferResponse(model_name=cfg.name, model_version=str(cfg.version), id=request.id)
    response.parameters[CACHE_HITS].int64_param = sum(r.cached for r in results)
    # Where a computed row's time went, for people watching (the slowest row's figures).
    computed = [r.reply for r in results if r.reply is not None]
    if computed:
        response.parameters[QUEUE_MS].double_param = max(r.queue_ms for r in computed)
        response.parameters[COMPUTE_MS].double_param = max(r.compute_ms for r in computed)
        response.parameters[BATCH_SIZE].int64_param = max(r.batch_size for r in computed)
    # Always raw, as Triton answers: tritonclient's as_numpy reads only raw_output_contents.
    for name, k in outputs:
        if k:
            strings = classification(cfg, probs, k)
            shape = [len(results), len(strings) // len(results)]
            response.outputs.add(name=name, datatype="BYTES", shape=shape)
            response.raw_output_contents.append(serialize_bytes(strings))
        else:
            response.outputs.add(name=name, datatype="FP32", shape=list(probs.shape))
            response.raw_output_contents.append(probs.tobytes())
    return response
