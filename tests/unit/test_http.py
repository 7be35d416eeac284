"""Pure units of the HTTP front: the REST infer body <-> KServe messages, .npy heads,
and the one status mapping both fronts share."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest

from inferpool import errors
from inferpool.api.http.jobs_rest import _npy_header
from inferpool.api.http.kserve_rest import encode_infer, parse_infer
from inferpool.api.status import http_status_for
from inferpool.repository import Repository
from inferpool.triton import grpc_service_pb2 as pb


def binary_request(x: np.ndarray, **extra: object) -> tuple[bytes, int]:
    head = json.dumps(
        {
            "id": "r1",
            "parameters": {"timeout": 1000, "binary_data_output": True},
            "inputs": [
                {
                    "name": "image",
                    "datatype": "FP32",
                    "shape": list(x.shape),
                    "parameters": {"binary_data_size": x.nbytes},
                }
            ],
            "outputs": [{"name": "probabilities", "parameters": {"classification": 2, "binary_data": False}}],
            **extra,
        }
    ).encode()
    return head + x.tobytes(), len(head)


def test_binary_body_becomes_the_grpc_message() -> None:
    x = np.arange(784 * 2, dtype="<f4").reshape(2, 1, 28, 28)
    body, head = binary_request(x)
    message, binary, default = parse_infer(body, head, "digits", "1")
    assert message.model_name == "digits" and message.model_version == "1" and message.id == "r1"
    assert list(message.inputs[0].shape) == [2, 1, 28, 28]
    assert message.raw_input_contents[0] == x.tobytes()
    assert message.parameters["timeout"].int64_param == 1000
    assert message.outputs[0].parameters["classification"].int64_param == 2
    assert binary == {"probabilities": False} and default is True


def test_json_data_becomes_typed_contents() -> None:
    body = json.dumps(
        {"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 2], "data": [[0.5, 1.5]]}]}
    ).encode()
    message, binary, default = parse_infer(body, None, "m", "")
    assert list(message.inputs[0].contents.fp32_contents) == [0.5, 1.5]
    assert not message.raw_input_contents and binary == {} and default is False


@pytest.mark.parametrize(
    ("body", "head", "message"),
    [
        (b"{", None, "not valid JSON"),
        (b"[]", None, "must be a JSON object"),
        (b'{"inputs": []}', None, "inputs must be a non-empty list"),
        (
            b'{"inputs": [{"name": "image", "datatype": "FP32", "shape": [1], "data": ["a"]}]}',
            None,
            "numbers",
        ),
        (
            b'{"inputs": [{"name": "image", "datatype": "FP32", "shape": [true], "data": [1]}]}',
            None,
            "integer",
        ),
        (b"{}", 10, "Inference-Header-Content-Length is 10 but the body has 2 bytes"),
    ],
)
def test_bad_bodies_are_invalid_input(body: bytes, head: int | None, message: str) -> None:
    with pytest.raises(errors.InvalidInput, match=message):
        parse_infer(body, head, "digits", "")


def test_response_binary_or_json() -> None:
    probs = np.array([[0.25, 0.75]], dtype="<f4")
    response = pb.ModelInferResponse(model_name="digits", model_version="1", id="r1")
    response.parameters["inferpool_cache_hits"].int64_param = 1
    response.outputs.add(name="probabilities", datatype="FP32", shape=[1, 2])
    response.raw_output_contents.append(probs.tobytes())
    as_json = json.loads(encode_infer(response, {}, False).body)
    assert as_json["outputs"][0]["data"] == [0.25, 0.75]
    assert as_json["parameters"] == {"inferpool_cache_hits": 1}
    raw = encode_infer(response, {"probabilities": True}, False)
    length = int(raw.headers["inference-header-content-length"])
    head = json.loads(raw.body[:length])
    assert head["outputs"][0]["parameters"] == {"binary_data_size": 8}
    assert raw.body[length:] == probs.tobytes()


def test_npy_header_parsed_from_a_prefix() -> None:
    cfg = Repository.load(Path(__file__).resolve().parents[2] / "models").resolve("digits", 0)
    out = io.BytesIO()
    np.save(out, np.zeros((5, 1, 28, 28), np.float32))
    data = out.getvalue()
    assert _npy_header(data[:20], cfg, False) is None  # more needed
    skip, rows, dtype = _npy_header(data[:200], cfg, False) or (0, 0, None)
    assert (rows, str(dtype)) == (5, "float32") and len(data) - skip == 5 * 784 * 4
    with pytest.raises(errors.InvalidInput, match=r"not a \.npy file"):
        _npy_header(b"PK\x03\x04" + b"\0" * 20, cfg, False)


def test_http_statuses_follow_the_grpc_mapping() -> None:
    assert http_status_for(errors.InvalidInput("x")) == 400
    assert http_status_for(errors.ModelNotFound("x")) == 404
    assert http_status_for(errors.Overloaded("x")) == 503
    assert http_status_for(errors.DeadlineExceeded("x")) == 504
    assert http_status_for(errors.BackendUnavailable("x")) == 503
    assert http_status_for(RuntimeError("bug")) == 500
