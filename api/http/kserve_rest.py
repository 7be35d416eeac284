"""KServe v2 / Open Inference Protocol over HTTP/REST, as Triton serves it.

Protocol translation only: a REST call becomes the gRPC front's message and goes through
the same servicer (api/kserve.py), so validation, cache, coalescing, admission, queue
and deadline are those of every other front. What is HTTP's own is here: JSON tensors,
Triton's binary tensor data extension (a JSON head of `Inference-Header-Content-Length`
bytes, then each binary tensor's bytes in order, sized by its `binary_data_size`
parameter), and Triton's error JSON.

The time budget: Triton's `timeout` request parameter (microseconds), and the
`Inferpool-Timeout-Ms` header, counted from the request's arrival; with neither, the
server's default deadline, as for a gRPC call without one.
"""

from __future__ import annotations

import json
import math
import struct
import time
from typing import Any

import numpy as np
from google.protobuf.json_format import MessageToDict
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

import inferpool
from inferpool.api.http.access import REQUEST_ID
from inferpool.api.http.body import read_body
from inferpool.api.http.errors import HttpError
from inferpool.api.kserve import KServeServicer, model_config, model_metadata
from inferpool.api.kserve_tensors import CLASSIFICATION, contents_field, parse_version
from inferpool.errors import InvalidInput, Overloaded
from inferpool.triton import grpc_service_pb2 as pb

HEADER_LENGTH = "inference-header-content-length"
TIMEOUT_HEADER = "inferpool-timeout-ms"
BINARY_SIZE = "binary_data_size"
MAX_TIMEOUT_MS = 24 * 3600 * 1000
# Int64 fields of Triton's ModelConfig that protobuf's JSON writes as strings; Triton's
# HTTP answer has them as numbers, and so do its clients' users.
_INT64_KEYS = frozenset({"dims", "max_queue_delay_microseconds"})


class _Context:
    """What the gRPC servicer asks of its call context, for an HTTP request."""

    def __init__(self, deadline: float | None) -> None:
        self.deadline = deadline

    def time_remaining(self) -> float | None:
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())

    def peer(self) -> str:
        return ""

    async def abort(self, code: Any, message: str = "") -> None:
        raise HttpError(500, message or str(code))


def deadline_of(request: Request) -> float | None:
    """The monotonic deadline of the request's `Inferpool-Timeout-Ms` header, from its arrival."""
    raw = request.headers.get(TIMEOUT_HEADER)
    if raw is None:
        return None
    try:
        ms = float(raw)
    except ValueError:
        ms = math.nan
    if not (math.isfinite(ms) and 0 < ms <= MAX_TIMEOUT_MS):
        raise InvalidInput(f"header Inferpool-Timeout-Ms must be 0..{MAX_TIMEOUT_MS} ms, got {raw[:32]!r}")
    arrived: float = request.scope.get("inferpool.arrived", time.monotonic())
    return arrived + ms / 1000


def _int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not -(2**63) <= value < 2**63:
        raise InvalidInput(f"{what} must be an integer")
    return value


def _set_parameter(params: Any, name: str, value: Any) -> None:
    if isinstance(value, bool):
        params[name].bool_param = value
    elif isinstance(value, int):
        params[name].int64_param = _int(value, f"parameter {name[:64]!r}")
    elif isinstance(value, float):
        params[name].double_param = value
    elif isinstance(value, str):
        params[name].string_param = value
    else:
        raise InvalidInput(f"parameter {name[:64]!r} must be a boolean, number or string")


def _json_object(data: bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidInput(f"{what} is not valid JSON: {str(exc)[:120]}") from None
    if not isinstance(value, dict):
        raise InvalidInput(f"{what} must be a JSON object")
    return value


def parse_infer(
    body: bytes, head_length: int | None, model: str, version: str
) -> tuple[pb.ModelInferRequest, dict[str, bool], bool]:
    """The gRPC request a REST infer body stands for, which outputs go back as binary
    data, and the default for outputs that do not say."""
    if head_length is None:
        head, blobs = body, b""
    else:
        if head_length > len(body):
            raise InvalidInput(
                f"Inference-Header-Content-Length is {head_length} but the body has {len(body)} bytes"
            )
        head, blobs = body[:head_length], body[head_length:]
    doc = _json_object(head, "the inference request")
    request = pb.ModelInferRequest(model_name=model, model_version=version)
    if "id" in doc:
        if not isinstance(doc["id"], str):
            raise InvalidInput("id must be a string")
        request.id = doc["id"][:256]
    params = doc.get("parameters", {})
    if not isinstance(params, dict):
        raise InvalidInput("parameters must be a JSON object")
    default_binary = params.get("binary_data_output", False) is True
    for name, value in params.items():
        if name != "binary_data_output":
            _set_parameter(request.parameters, name, value)
    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise InvalidInput("inputs must be a non-empty list")
    offset = 0
    for i, item in enumerate(inputs[:8]):
        if not isinstance(item, dict):
            raise InvalidInput(f"inputs[{i}] must be a JSON object")
        name, datatype, shape = item.get("name"), item.get("datatype"), item.get("shape")
        if not isinstance(name, str) or not isinstance(datatype, str):
            raise InvalidInput(f"inputs[{i}] needs a name and a datatype (strings)")
        if not isinstance(shape, list) or len(shape) > 16:
            raise InvalidInput(f"inputs[{i}].shape must be a list of at most 16 integers")
        spec = request.inputs.add(name=name[:64], datatype=datatype[:16])
        spec.shape.extend(_int(d, f"inputs[{i}].shape") for d in shape)
        in_params = item.get("parameters", {})
        if not isinstance(in_params, dict):
            raise InvalidInput(f"inputs[{i}].parameters must be a JSON object")
        size = in_params.get(BINARY_SIZE)
        if size is not None:
            size = _int(size, f"inputs[{i}].parameters.binary_data_size")
            if "data" in item:
                raise InvalidInput(f"inputs[{i}] has both data and binary_data_size")
            if size < 0 or offset + size > len(blobs):
                raise InvalidInput(
                    f"inputs[{i}] claims {size} bytes of binary data; {len(blobs) - offset} follow the header"
                )
            request.raw_input_contents.append(blobs[offset : offset + size])
            offset += size
            continue
        if "data" not in item:
            raise InvalidInput(f"inputs[{i}] needs data or a binary_data_size parameter")
        field = contents_field(datatype)
        if field is None:
            raise InvalidInput(f"inputs[{i}]: {datatype[:16]!r} data must be sent as binary data")
        try:
            values = np.asarray(item["data"])
        except ValueError:
            raise InvalidInput(f"inputs[{i}].data must be a (nested) list of numbers") from None
        if values.dtype.kind not in "biuf":
            raise InvalidInput(f"inputs[{i}].data must be a (nested) list of numbers")
        try:
            getattr(spec.contents, field).extend(values.ravel().tolist())
        except (TypeError, ValueError):
            raise InvalidInput(f"inputs[{i}].data does not fit datatype {datatype[:16]!r}") from None
    if offset != len(blobs):
        raise InvalidInput(f"{len(blobs) - offset} bytes after the header belong to no input")
    binary: dict[str, bool] = {}
    outputs = doc.get("outputs", [])
    if not isinstance(outputs, list):
        raise InvalidInput("outputs must be a list")
    for i, item in enumerate(outputs[:8]):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise InvalidInput(f"outputs[{i}] must be a JSON object with a name")
        out = request.outputs.add(name=item["name"][:64])
        out_params = item.get("parameters", {})
        if not isinstance(out_params, dict):
            raise InvalidInput(f"outputs[{i}].parameters must be a JSON object")
        if CLASSIFICATION in out_params:
            out.parameters[CLASSIFICATION].int64_param = _int(
                out_params[CLASSIFICATION], f"outputs[{i}].parameters.classification"
            )
        if "binary_data" in out_params:
            binary[out.name] = out_params["binary_data"] is True
    return request, binary, default_binary


def _strings(raw: bytes) -> list[str]:
    """Triton's raw BYTES layout (little-endian uint32 length, then the bytes) as text."""
    out, i = [], 0
    while i < len(raw):
        (n,) = struct.unpack_from("<I", raw, i)
        out.append(raw[i + 4 : i + 4 + n].decode())
        i += 4 + n
    return out


def encode_infer(response: pb.ModelInferResponse, binary: dict[str, bool], default_binary: bool) -> Response:
    doc: dict[str, Any] = {"model_name": response.model_name, "model_version": response.model_version}
    if response.id:
        doc["id"] = response.id
    # inferpool_cache_hits among them: how many rows the cache answered.
    doc["parameters"] = {
        k: getattr(v, v.WhichOneof("parameter_choice")) for k, v in response.parameters.items()
    }
    blobs: list[bytes] = []
    outs = []
    for out, raw in zip(response.outputs, response.raw_output_contents, strict=True):
        entry: dict[str, Any] = {"name": out.name, "datatype": out.datatype, "shape": list(out.shape)}
        if binary.get(out.name, default_binary):
            entry["parameters"] = {BINARY_SIZE: len(raw)}
            blobs.append(raw)
        elif out.datatype == "BYTES":
            entry["data"] = _strings(raw)
        else:
            entry["data"] = np.frombuffer(raw, dtype="<f4").tolist()
        outs.append(entry)
    doc["outputs"] = outs
    head = json.dumps(doc, separators=(",", ":")).encode()
    if not blobs:
        return Response(head, media_type="application/json")
    return Response(
        b"".join([head, *blobs]),
        media_type="application/octet-stream",
        headers={"Inference-Header-Content-Length": str(len(head))},
    )


def _int64_numbers(value: Any, key: str = "") -> Any:
    if isinstance(value, dict):
        return {k: _int64_numbers(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_int64_numbers(v, key) for v in value]
    if key in _INT64_KEYS and isinstance(value, str):
        return int(value)
    return value


class KServeRest:
    """The REST routes' handlers, over one KServe servicer (its statistics are this front's)."""

    def __init__(self, servicer: KServeServicer, max_body_bytes: int, body_timeout_s: float) -> None:
        self.servicer = servicer
        self.plane = servicer.plane
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s

    async def live(self, request: Request) -> Response:
        return Response(status_code=200)

    async def ready(self, request: Request) -> Response:
        got = await self.servicer.ServerReady(pb.ServerReadyRequest(), _Context(None))
        if not got.ready:
            raise HttpError(503, "the server is not ready (Redis unreachable, or shutting down)")
        return Response(status_code=200)

    async def server_metadata(self, request: Request) -> Response:
        return JSONResponse(
            {"name": "inferpool", "version": inferpool.__version__, "extensions": [CLASSIFICATION]}
        )

    def _cfg(self, request: Request) -> Any:
        params = request.path_params
        return self.plane.resolve(params["model"], parse_version(params.get("version", "")))

    async def model_metadata(self, request: Request) -> Response:
        meta = model_metadata(self.plane, self._cfg(request))
        tensors = lambda ts: [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in ts]  # noqa: E731
        return JSONResponse(
            {
                "name": meta.name,
                "versions": list(meta.versions),
                "platform": meta.platform,
                "inputs": tensors(meta.inputs),
                "outputs": tensors(meta.outputs),
            }
        )

    async def model_ready(self, request: Request) -> Response:
        params = request.path_params
        got = await self.servicer.ModelReady(
            pb.ModelReadyRequest(name=params["model"][:64], version=params.get("version", "")),
            _Context(None),
        )
        if not got.ready:
            # As Triton: an unknown model is simply not ready.
            raise HttpError(400, f"model {params['model'][:64]!r} is not ready")
        return Response(status_code=200)

    async def model_config(self, request: Request) -> Response:
        config = model_config(self.plane, self._cfg(request))
        return JSONResponse(_int64_numbers(MessageToDict(config, preserving_proto_field_name=True)))

    async def statistics(self, request: Request) -> Response:
        params = request.path_params
        got = await self.servicer.ModelStatistics(
            pb.ModelStatisticsRequest(name=params.get("model", ""), version=params.get("version", "")),
            _Context(None),
        )
        return JSONResponse(MessageToDict(got, preserving_proto_field_name=True))

    async def infer(self, request: Request) -> Response:
        deadline = deadline_of(request)
        context = _Context(deadline)
        # At the door, as gRPC's SheddingInterceptor: before the body is read or parsed.
        reason = self.plane.dispatcher.admission.shed(context.time_remaining())
        if reason is not None:
            raise Overloaded(reason)
        ctype = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
        head_length: int | None = None
        raw_length = request.headers.get(HEADER_LENGTH)
        if raw_length is not None:
            if not raw_length.isdigit() or len(raw_length) > 18:
                raise InvalidInput("Inference-Header-Content-Length must be a non-negative integer")
            head_length = int(raw_length)
        elif ctype not in ("application/json", ""):
            raise HttpError(
                415,
                f"content type {ctype[:64]!r}: send application/json, or binary tensor data with "
                "an Inference-Header-Content-Length header",
            )
        body = await read_body(request, self.max_body_bytes, self.body_timeout_s)
        params = request.path_params
        message, binary, default_binary = parse_infer(
            body, head_length, params["model"][:64], params.get("version", "")
        )
        request.scope[REQUEST_ID] = message.id  # for the access line
        response = await self.servicer.ModelInfer(message, context)
        return encode_infer(response, binary, default_binary)
