"""The access log against a real API (and worker), gRPC and HTTP: one structured line
per call with its method, code, duration, peer, request id and trace id, never a
token; failed calls rate-limited; and the worker's start-up lines in its log."""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import logging
import secrets
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest

from inferpool import logs
from inferpool.api import status
from inferpool.client import classify_request
from inferpool.v1 import inference_pb2, inference_pb2_grpc
from tests.servers import ApiThread, MemcachedServer, RedisServer, Worker, free_port, stack_settings

pytestmark = pytest.mark.timeout(120)

TOKEN = "s3cret-" + secrets.token_hex(16)
CLASSIFY = "/inferpool.v1.InferenceService/Classify"


@pytest.fixture(scope="module")
def api(redis_server: RedisServer, memcached_server: MemcachedServer, worker: Worker) -> Iterator[ApiThread]:
    # A rate-limit window longer than the module: "one line per window" then does not
    # depend on how fast the machine sends the calls.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(status, "LOG_INTERVAL_S", 3600.0)
        server = ApiThread(
            stack_settings(
                redis_server,
                memcached_server,
                auth_tokens=f"alice:{TOKEN}",
                http_port=free_port(),
                access_log=True,
            )
        )
    yield server
    server.stop()


@contextlib.contextmanager
def _captured(log_format: str) -> Iterator[io.StringIO]:
    """The access lines written meanwhile, as the API writes them in `log_format`."""
    out = io.StringIO()
    handler = logs.handler(log_format, out)
    logger = logging.getLogger("inferpool.access")
    logger.addHandler(handler)
    old = logger.level
    logger.setLevel(logging.INFO)
    try:
        yield out
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)


@pytest.fixture
def access() -> Iterator[io.StringIO]:
    """The access lines, as the API writes them with INFERPOOL_LOG_FORMAT=json."""
    with _captured(logs.JSON) as out:
        yield out


def _lines(out: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def _metadata(*extra: tuple[str, str]) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {TOKEN}"), *extra)


def test_one_line_per_call_with_its_fields_and_never_the_token(api: ApiThread, access: io.StringIO) -> None:
    trace_id = secrets.token_hex(16)
    traceparent = f"00-{trace_id}-{secrets.token_hex(8)}-01"
    x = np.random.default_rng(41).random((1, 1, 28, 28), dtype=np.float32)
    with grpc.insecure_channel(api.target) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        for i in range(3):
            stub.Classify(
                classify_request(x, "digits", request_id=f"body-{i}"),
                timeout=30,
                metadata=_metadata(("x-request-id", f"req-{i}"), ("traceparent", traceparent)),
            )
        # Without x-request-id: the message's own id.
        stub.Classify(classify_request(x, "digits", request_id="from-body"), timeout=30, metadata=_metadata())
    lines = _lines(access)
    assert len(lines) == 4
    for i, line in enumerate(lines[:3]):
        assert line["logger"] == "inferpool.access"
        assert (line["method"], line["code"], line["request_id"]) == (CLASSIFY, "OK", f"req-{i}")
        assert line["duration_ms"] > 0
        assert line["peer"].startswith(("ipv4:127.0.0.1:", "ipv6:"))
        # Tracing is off here: the trace id is the caller's, from its traceparent.
        assert line["trace_id"] == trace_id
    assert lines[3]["request_id"] == "from-body" and "trace_id" not in lines[3]
    assert TOKEN not in access.getvalue() and "Bearer" not in access.getvalue()


def test_a_flood_of_bad_calls_logs_one_line_and_good_calls_still_each(
    api: ApiThread, access: io.StringIO
) -> None:
    with grpc.insecure_channel(api.target) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        for _ in range(60):
            with pytest.raises(grpc.RpcError) as info:
                stub.Classify(inference_pb2.ClassifyRequest(model=""), timeout=10, metadata=_metadata())
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        x = np.random.default_rng(42).random((1, 1, 28, 28), dtype=np.float32)
        for _ in range(2):
            stub.Classify(classify_request(x, "digits"), timeout=30, metadata=_metadata())
    lines = _lines(access)
    bad = [line for line in lines if line["code"] == "INVALID_ARGUMENT"]
    assert len(bad) <= 1  # one per window, which the module's API keeps for an hour
    assert [line["code"] for line in lines if line["code"] != "INVALID_ARGUMENT"] == ["OK", "OK"]


def test_client_text_cannot_forge_or_bloat_a_line(api: ApiThread) -> None:
    with _captured(logs.TEXT) as out:
        x = np.random.default_rng(43).random((1, 1, 28, 28), dtype=np.float32)
        forged = "a\n2026-01-01 INFO inferpool.access: forged" + "x" * 5000
        with grpc.insecure_channel(api.target) as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            stub.Classify(classify_request(x, "digits", request_id=forged), timeout=30, metadata=_metadata())
    text = out.getvalue()
    # One line, the client's newline escaped in it, its text cut.
    assert text.count("\n") == 1 and len(text) < 500
    assert "request_id=a\\n2026-01-01" in text


def _http(
    api: ApiThread, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", api.server.http_port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def _infer_body(x: np.ndarray, request_id: str = "") -> bytes:
    doc: dict[str, Any] = {
        "inputs": [{"name": "image", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}]
    }
    if request_id:
        doc["id"] = request_id
    return json.dumps(doc).encode()


INFER = "POST /v2/models/{model}/infer"


def test_http_calls_write_the_same_line_as_grpc_and_never_the_token(
    api: ApiThread, access: io.StringIO
) -> None:
    trace_id = secrets.token_hex(16)
    traceparent = f"00-{trace_id}-{secrets.token_hex(8)}-01"
    x = np.random.default_rng(45).random((1, 1, 28, 28), dtype=np.float32)
    auth = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    with_ids = {**auth, "x-request-id": "req-http", "traceparent": traceparent}
    assert _http(api, "POST", "/v2/models/digits/infer", _infer_body(x, "body-id"), with_ids) == 200
    # Without x-request-id: the body's own id; without a traceparent: no trace id.
    assert _http(api, "POST", "/v2/models/digits/infer", _infer_body(x, "from-body"), auth) == 200
    assert _http(api, "GET", "/v2/models/digits", headers=auth) == 200
    # Probes are not logged, as gRPC health is not.
    assert _http(api, "GET", "/v2/health/ready") == 200
    lines = _lines(access)
    assert [line["method"] for line in lines] == [INFER, INFER, "GET /v2/models/{model}"]
    first, second, third = lines
    assert first["logger"] == "inferpool.access"
    assert (first["code"], first["path"]) == ("200", "/v2/models/digits/infer")
    assert first["request_id"] == "req-http"
    assert first["caller"] == "alice" and first["duration_ms"] > 0
    assert first["peer"].startswith("ipv4:127.0.0.1:")
    # Tracing is off here: the trace id is the caller's, from its traceparent header.
    assert first["trace_id"] == trace_id
    assert second["request_id"] == "from-body" and "trace_id" not in second
    assert third["request_id"] == "" and third["code"] == "200"
    text = access.getvalue()
    assert TOKEN not in text and "Bearer" not in text and "0.0" * 3 not in text  # no payload


def test_a_flood_of_bad_http_calls_logs_one_line_per_status_and_good_calls_still_each(
    api: ApiThread, access: io.StringIO
) -> None:
    bad_token = {"Authorization": "Bearer not-the-token-0000000000"}
    auth = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    for _ in range(40):
        assert _http(api, "GET", "/v2/models/digits", headers=bad_token) == 401
        assert _http(api, "POST", "/v2/models/digits/infer", b"{not json", auth) == 400
    x = np.random.default_rng(46).random((1, 1, 28, 28), dtype=np.float32)
    for _ in range(2):
        assert _http(api, "POST", "/v2/models/digits/infer", _infer_body(x), auth) == 200
    lines = _lines(access)
    assert len([line for line in lines if line["code"] == "401"]) <= 1
    assert len([line for line in lines if line["code"] == "400"]) <= 1
    assert [line["code"] for line in lines if line["code"] not in ("400", "401")] == ["200", "200"]
    assert "not-the-token" not in access.getvalue()


def test_an_http_path_cannot_forge_or_bloat_a_line(api: ApiThread) -> None:
    with _captured(logs.TEXT) as out:
        forged = "/v2/models/a%0A2026-01-01%20INFO%20inferpool.access:%20forged" + "x" * 3000
        status = _http(api, "GET", forged, headers={"Authorization": f"Bearer {TOKEN}"})
    text = out.getvalue()
    assert status in (400, 404)  # the name is refused as too long
    assert text.count("\n") == 1 and len(text) < 500
    assert "/v2/models/a\\n2026-01-01" in text


def test_worker_start_up_lines_are_in_its_log(worker: Worker) -> None:
    text = worker.log.read_text(errors="replace")
    assert "intra-op threads" in text
    assert "loaded digits v1 on cpu (warm-up" in text


def test_latency_buckets_carry_the_trace_id_as_an_exemplar_on_both_fronts(api: ApiThread) -> None:
    from prometheus_client.openmetrics.exposition import generate_latest

    from inferpool.api import metrics

    trace_id = secrets.token_hex(16)
    x = np.random.default_rng(44).random((1, 1, 28, 28), dtype=np.float32)
    with grpc.insecure_channel(api.target) as channel:
        inference_pb2_grpc.InferenceServiceStub(channel).Classify(
            classify_request(x, "digits"),
            timeout=30,
            metadata=_metadata(("traceparent", f"00-{trace_id}-{secrets.token_hex(8)}-01")),
        )
    # And over HTTP: its own histogram, the caller's trace id from its header.
    http_trace = secrets.token_hex(16)
    headers = {
        "Authorization": f"Bearer {TOKEN}",
        "Content-Type": "application/json",
        "traceparent": f"00-{http_trace}-{secrets.token_hex(8)}-01",
    }
    assert _http(api, "POST", "/v2/models/digits/infer", _infer_body(x), headers) == 200
    exposition = generate_latest(metrics.REGISTRY).decode()
    lines = [line for line in exposition.splitlines() if f'trace_id="{trace_id}"' in line]
    assert any(line.startswith("inferpool_request_duration_seconds_bucket{") for line in lines), lines
    lines = [line for line in exposition.splitlines() if f'trace_id="{http_trace}"' in line]
    assert any(line.startswith("inferpool_http_request_duration_seconds_bucket{") for line in lines), lines
