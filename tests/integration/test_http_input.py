"""Bad HTTP input against the real stack's HTTP port: each gets a 4xx with a message
that says what is wrong, never a 500, and nothing stalls the gRPC port meanwhile."""

from __future__ import annotations

import http.client
import json
import socket
import time
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.stack import free_port
from inferpool.api import metrics
from tests.servers import ApiThread, MemcachedServer, RedisServer, Worker, stack_settings, wait_until

pytestmark = pytest.mark.timeout(180)

INFER = "/v2/models/digits/infer"
LIMIT = 1 << 20


@pytest.fixture(scope="module")
def bad_api(
    redis_server: RedisServer, memcached_server: MemcachedServer, worker: Worker
) -> Iterator[ApiThread]:
    settings = stack_settings(
        redis_server,
        memcached_server,
        http_port=free_port(),
        max_message_bytes=LIMIT,
        http_body_timeout_s=0.5,
        http_header_timeout_s=1.0,
        http_max_connections=4096,
    )
    api = ApiThread(settings)
    yield api
    api.stop()


def post(
    api: ApiThread, path: str, body: bytes, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str]]:
    conn = http.client.HTTPConnection("127.0.0.1", api.server.http_port, timeout=30)
    try:
        conn.request("POST", path, body=body, headers=headers or {})
        response = conn.getresponse()
        data = response.read()
        return response.status, json.loads(data) if data else {}
    finally:
        conn.close()


def raw(api: ApiThread, data: bytes, read_timeout_s: float = 30) -> bytes:
    """Sends `data` as is and reads until the server closes or answers."""
    with socket.create_connection(("127.0.0.1", api.server.http_port), timeout=read_timeout_s) as sock:
        sock.sendall(data)
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
            if b"\r\n\r\n" in b"".join(chunks) and b'"}' in chunk:
                break
        return b"".join(chunks)


def image_json(shape: list[int]) -> bytes:
    return json.dumps(
        {
            "inputs": [
                {"name": "image", "datatype": "FP32", "shape": shape, "data": [0.0] * int(np.prod(shape))}
            ]
        }
    ).encode()


def server_errors() -> float:
    return sum(
        s.value
        for m in metrics.HTTP_REQUESTS.collect()
        for s in m.samples
        if s.name.endswith("_total") and s.labels["code"].startswith("5")
    )


def test_malformed_json_is_400_naming_it(bad_api: ApiThread) -> None:
    status, body = post(bad_api, INFER, b'{"inputs": [', {"Content-Type": "application/json"})
    assert status == 400 and "not valid JSON" in body["error"]
    status, body = post(bad_api, INFER, b"[1, 2]", {"Content-Type": "application/json"})
    assert status == 400 and "must be a JSON object" in body["error"]
    status, body = post(bad_api, INFER, json.dumps({"inputs": [{"name": "image"}]}).encode())
    assert status == 400 and "inputs[0] needs a name and a datatype" in body["error"]
    status, body = post(bad_api, INFER, image_json([1, 1, 28, 28]).replace(b"0.0", b'"x"', 1))
    assert status == 400 and "list of numbers" in body["error"]


def test_wrong_content_type_is_415(bad_api: ApiThread) -> None:
    status, body = post(bad_api, INFER, image_json([1, 1, 28, 28]), {"Content-Type": "text/plain"})
    assert status == 415 and "'text/plain'" in body["error"]
    status, body = post(bad_api, "/v1/jobs?model=digits", b"x", {"Content-Type": "image/gif"})
    assert status == 415 and "application/x-npy" in body["error"]


def test_body_over_the_limit_is_413(bad_api: ApiThread) -> None:
    # Declared too large: refused from the head, before any of the body is read.
    answer = raw(
        bad_api,
        f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {LIMIT + 1}\r\n\r\n".encode(),
    )
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"at most 1048576" in answer
    # Not declared (chunked): refused once the bytes received pass the limit.
    chunk = b"x" * 65536
    body = (
        b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(LIMIT // len(chunk) + 1)) + b"0\r\n\r\n"
    )
    answer = raw(
        bad_api,
        f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        "Transfer-Encoding: chunked\r\n\r\n".encode()
        + body,
    )
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]


def test_truncated_binary_data_is_400(bad_api: ApiThread) -> None:
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "image",
                    "datatype": "FP32",
                    "shape": [1, 1, 28, 28],
                    "parameters": {"binary_data_size": 3136},
                }
            ]
        }
    ).encode()
    data = np.zeros(784, "<f4").tobytes()
    headers = {"Inference-Header-Content-Length": str(len(head)), "Content-Type": "application/octet-stream"}
    status, body = post(bad_api, INFER, head + data[:-100], headers)
    assert status == 400 and "claims 3136 bytes of binary data; 3036 follow" in body["error"]
    # The header length itself past the body.
    status, body = post(
        bad_api, INFER, head, {**headers, "Inference-Header-Content-Length": str(len(head) + 50)}
    )
    assert status == 400 and "Inference-Header-Content-Length is" in body["error"]
    status, body = post(bad_api, INFER, head + data + b"extra", headers)
    assert status == 400 and "5 bytes after the header belong to no input" in body["error"]
    # And the whole thing, well formed, answers.
    status, _ = post(bad_api, INFER, head + data, headers)
    assert status == 200


def test_lying_content_length_is_answered_not_stalled(bad_api: ApiThread) -> None:
    body = image_json([1, 1, 28, 28])
    # Longer than sent: the body stalls, and is refused after the body timeout (408).
    t0 = time.monotonic()
    answer = raw(
        bad_api,
        f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body) + 100}\r\n\r\n".encode()
        + body,
    )
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"sent nothing for 0.5 s" in answer
    assert time.monotonic() - t0 < 20
    # Shorter than sent: the bytes past the length are a malformed next request, which
    # the HTTP parser refuses (400, connection closed), before or after the cut body's
    # own answer (invalid JSON, 400).
    answer = raw(
        bad_api,
        f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body) - 10}\r\n\r\n".encode()
        + body,
    )
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
    assert b"not valid JSON" in answer or b"Invalid HTTP request" in answer
    assert b"HTTP/1.1 5" not in answer
    # A non-number length.
    answer = raw(bad_api, f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n".encode())
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]


def test_many_slow_clients_neither_stall_grpc_nor_linger(bad_api: ApiThread) -> None:
    n = 3000  # each holds a descriptor on both ends, in this one process
    before = server_errors()
    slow = []
    try:
        for _ in range(n):
            sock = socket.create_connection(("127.0.0.1", bad_api.server.http_port), timeout=10)
            sock.sendall(b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\n")  # and never the rest
            slow.append(sock)
        # Meanwhile the gRPC port answers, and so does a well-behaved HTTP client.
        with grpc.insecure_channel(bad_api.target) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        conn = http.client.HTTPConnection("127.0.0.1", bad_api.server.http_port, timeout=10)
        conn.request("GET", "/v2/health/live")
        assert conn.getresponse().status == 200
        conn.close()
        # Each slow one is closed by the server once the head timeout passes.
        for sock in slow:
            sock.settimeout(30)
            assert sock.recv(1) == b""
    finally:
        for sock in slow:
            sock.close()
    wait_until(
        lambda: bad_api.call(lambda: len(bad_api.server.http.server.server_state.connections)) == 0,
        10,
        "closed",
    )
    assert server_errors() == before
