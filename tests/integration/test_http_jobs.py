"""Bulk jobs over HTTP through the real stack: JSON, .npy and raw bodies streamed into
the job store, sealed only when the body completed; state, pages, JSON Lines, SSE, cancel."""

from __future__ import annotations

import http.client
import io
import json
import socket
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from bench.stack import free_port
from tests.servers import ApiThread, MemcachedServer, RedisServer, Worker, stack_settings, wait_until

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def jobs_api(
    redis_server: RedisServer, memcached_server: MemcachedServer, worker: Worker
) -> Iterator[ApiThread]:
    api = ApiThread(
        stack_settings(redis_server, memcached_server, http_port=free_port(), upload_idle_timeout_s=1.0)
    )
    yield api
    api.stop()


def call(
    api: ApiThread, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, bytes, http.client.HTTPResponse]:
    conn = http.client.HTTPConnection("127.0.0.1", api.server.http_port, timeout=60)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read(), response
    finally:
        conn.close()


def jcall(
    api: ApiThread, method: str, path: str, body: bytes | None = None, **headers: str
) -> tuple[int, Any]:
    status, data, _ = call(api, method, path, body, {k.replace("_", "-"): v for k, v in headers.items()})
    return status, json.loads(data)


def npy(x: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, x)
    return out.getvalue()


def finished(api: ApiThread, job_id: str) -> dict[str, Any]:
    got: dict[str, Any] = {}

    def done() -> bool:
        nonlocal got
        _, got = jcall(api, "GET", f"/v1/jobs/{job_id}")
        return got["state"] in ("SUCCEEDED", "FAILED", "CANCELLED")

    wait_until(done, 60, f"job {job_id} to end")
    return got


def test_npy_job_succeeds_with_pages_and_jsonl(
    jobs_api: ApiThread, heldout: tuple[np.ndarray, np.ndarray]
) -> None:
    x, y = heldout
    status, got = jcall(
        jobs_api,
        "POST",
        "/v1/jobs?model=digits&top_k=2",
        npy(x),
        Content_Type="application/x-npy",
        Idempotency_Key="npy-heldout-1",
    )
    assert status == 201 and got["created"], got
    job_id = got["job_id"]
    assert got["job"]["counts"]["total"] == len(x)
    job = finished(jobs_api, job_id)
    assert job["state"] == "SUCCEEDED" and job["counts"]["done"] == len(x)
    # The same idempotency key names the same job.
    status, again = jcall(
        jobs_api,
        "POST",
        "/v1/jobs?model=digits",
        npy(x[:3]),
        Content_Type="application/x-npy",
        Idempotency_Key="npy-heldout-1",
    )
    assert status == 200 and again["job_id"] == job_id and not again["created"]
    status, page = jcall(jobs_api, "GET", f"/v1/jobs/{job_id}?offset=10&limit=5&include_scores=true")
    assert [r["index"] for r in page["results"]] == list(range(10, 15)) and page["next_offset"] == 15
    assert len(page["results"][0]["scores"]) == 10 and len(page["results"][0]["classes"]) == 2
    status, data, response = call(jobs_api, "GET", f"/v1/jobs/{job_id}/results")
    assert status == 200 and response.getheader("content-type").startswith("application/x-ndjson")
    lines = [json.loads(line) for line in data.decode().splitlines()]
    assert [r["index"] for r in lines] == list(range(len(x)))
    predicted = np.array([r["classes"][0]["index"] for r in lines])
    assert (predicted == y).mean() >= 0.95


def test_json_and_raw_bodies(jobs_api: ApiThread, heldout: tuple[np.ndarray, np.ndarray]) -> None:
    x = heldout[0]
    body = json.dumps({"model": "digits", "inputs": x[:5].tolist()}).encode()
    status, got = jcall(jobs_api, "POST", "/v1/jobs", body, Content_Type="application/json")
    assert status == 201 and got["job"]["counts"]["total"] == 5
    assert finished(jobs_api, got["job_id"])["counts"]["done"] == 5
    raw = x[:7].astype("<f4").tobytes()
    status, got = jcall(
        jobs_api, "POST", "/v1/jobs?model=digits", raw, Content_Type="application/octet-stream"
    )
    assert status == 201 and got["job"]["counts"]["total"] == 7
    # A body ending inside a row is refused, and its job failed, not sealed.
    status, got = jcall(
        jobs_api, "POST", "/v1/jobs?model=digits", raw[:-4], Content_Type="application/octet-stream"
    )
    assert status == 400 and "bytes into a row of 3136 bytes" in got["error"]
    status, got = jcall(
        jobs_api, "POST", "/v1/jobs?model=digits", npy(x[:3])[:-3136], Content_Type="application/x-npy"
    )
    assert status == 400 and "declares 3 rows but the body held 2" in got["error"]
    status, got = jcall(
        jobs_api, "POST", "/v1/jobs?model=digits", npy(x[:3, :, :14]), Content_Type="application/x-npy"
    )
    assert status == 400 and "shape [n, 1, 28, 28]" in got["error"]


def test_a_body_cut_short_fails_its_job(
    jobs_api: ApiThread, heldout: tuple[np.ndarray, np.ndarray], redis_client: Any
) -> None:
    data = npy(heldout[0][:100])
    before = set(redis_client.scan_iter("*job*"))
    with socket.create_connection(("127.0.0.1", jobs_api.server.http_port), timeout=30) as sock:
        sock.sendall(
            b"POST /v1/jobs?model=digits HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-npy\r\n"
            + f"Content-Length: {len(data)}\r\n\r\n".encode()
            + data[: len(data) // 2]
        )
        # And the client stops sending (it stalls): the upload is broken off after the idle bound.
        answer = b""
        while b'"}' not in answer:  # the head and the JSON body may come apart
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 504") or answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"sent nothing" in answer
    # Its job exists only as FAILED (never sealed, never SUCCEEDED).
    created = [k for k in set(redis_client.scan_iter("*job*")) - before if b"results" not in k]
    states = {redis_client.hget(k, "state") for k in created if redis_client.type(k) == b"hash"}
    assert states <= {b"FAILED"}, states


def test_watch_streams_server_sent_events_to_the_end_and_cancel(
    jobs_api: ApiThread, heldout: tuple[np.ndarray, np.ndarray]
) -> None:
    status, got = jcall(
        jobs_api, "POST", "/v1/jobs?model=digits", npy(heldout[0][:50]), Content_Type="application/x-npy"
    )
    job_id = got["job_id"]
    status, data, response = call(jobs_api, "GET", f"/v1/jobs/{job_id}/watch")
    assert status == 200 and response.getheader("content-type").startswith("text/event-stream")
    events = [
        json.loads(block.split("data: ", 1)[1]) for block in data.decode().split("\n\n") if block.strip()
    ]
    assert events[-1]["state"] == "SUCCEEDED" and events[-1]["counts"]["done"] == 50
    assert [e["counts"]["done"] for e in events] == sorted(e["counts"]["done"] for e in events)
    # Cancel: an ended job stays as it ended; unknown ids are 404, malformed ones 400.
    status, got = jcall(jobs_api, "POST", f"/v1/jobs/{job_id}/cancel")
    assert status == 200 and got["state"] == "SUCCEEDED"
    status, got = jcall(jobs_api, "GET", "/v1/jobs/" + "0" * 32)
    assert status == 404
    status, got = jcall(jobs_api, "DELETE", "/v1/jobs/nope!")
    assert status == 400
