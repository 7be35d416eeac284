"""Driving a traced stack and reading its spans back, for the tracing tests."""

from __future__ import annotations

import http.client
import json
import secrets

import grpc
import numpy as np

from inferpool.client import Client, Job, classify_request, created_id, submit_requests
from inferpool.v1 import inference_pb2_grpc
from tests.otlp_receiver import Span
from tests.servers import ApiThread


def new_caller() -> tuple[str, str, str]:
    """A caller's own trace context: (trace id, span id, traceparent)."""
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return trace_id, span_id, f"00-{trace_id}-{span_id}-01"


def one_span(spans: list[Span], name: str, service: str = "") -> Span:
    found = [s for s in spans if s.name == name and (not service or s.service == service)]
    assert len(found) == 1, f"{len(found)} spans named {name}: {[(s.service, s.name) for s in spans]}"
    return found[0]


def classify_traced(
    api: ApiThread, arrays: list[np.ndarray], timeout_s: float = 30.0
) -> list[tuple[str, str]]:
    """Classifies each array concurrently, each call with its own caller trace context;
    returns the callers' (trace id, span id)."""
    callers = [new_caller() for _ in arrays]
    with grpc.insecure_channel(api.target) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        calls = [
            stub.Classify.future(
                classify_request(a, "digits"), timeout=timeout_s, metadata=(("traceparent", tp),)
            )
            for a, (_, _, tp) in zip(arrays, callers, strict=True)
        ]
        for call in calls:
            assert call.result().classes
    return [(t, s) for t, s, _ in callers]


def submit_traced(client: Client, x: np.ndarray, traceparent: str) -> Job:
    response = client.jobs.SubmitJobStream(
        submit_requests(x, "digits"), timeout=120, metadata=(("traceparent", traceparent),)
    )
    return Job(client, created_id(response, len(x)))


def random_inputs(seed: int, n: int) -> list[np.ndarray]:
    rng = np.random.default_rng((0x7EACE, seed))
    return [rng.random((1, 1, 28, 28), dtype=np.float32) for _ in range(n)]


def http_infer(api: ApiThread, x: np.ndarray, headers: dict[str, str]) -> int:
    tensor_json = {"name": "image", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}
    body = {"inputs": [tensor_json]}
    conn = http.client.HTTPConnection("127.0.0.1", api.server.http_port, timeout=30)
    try:
        conn.request(
            "POST",
            "/v2/models/digits/infer",
            body=json.dumps(body),
            headers={"Content-Type": "application/json", **headers},
        )
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()
