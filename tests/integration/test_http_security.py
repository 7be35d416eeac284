"""The HTTP front's auth, TLS, CORS, metrics and access log, through the real stack."""

from __future__ import annotations

import http.client
import json
import logging
import ssl
from pathlib import Path

import pytest

from bench.stack import free_port
from inferpool.api import metrics
from tests.servers import ApiThread, MemcachedServer, RedisServer, TlsFiles, Worker, stack_settings

pytestmark = pytest.mark.timeout(120)

TOKEN = "http-security-token-0123456789"


def get(
    api: ApiThread, path: str, headers: dict[str, str] | None = None, context: ssl.SSLContext | None = None
) -> tuple[int, bytes, http.client.HTTPResponse]:
    port = api.server.http_port
    conn = (
        http.client.HTTPSConnection("127.0.0.1", port, timeout=30, context=context)
        if context
        else http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    )
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read(), response
    finally:
        conn.close()


def count(route: str, code: str) -> float:
    for m in metrics.HTTP_REQUESTS.collect():
        for s in m.samples:
            if s.name.endswith("_total") and s.labels == {"route": route, "code": code}:
                return s.value
    return 0.0


def test_tls_auth_cors_metrics_and_access_log(
    redis_server: RedisServer,
    memcached_server: MemcachedServer,
    worker: Worker,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    tls = TlsFiles(tmp_path / "tls")
    api = ApiThread(
        stack_settings(
            redis_server,
            memcached_server,
            http_port=free_port(),
            auth_tokens=f"alice:{TOKEN}",
            tls_cert_file=str(tls.cert),
            tls_key_file=str(tls.key),
            http_cors_origins="https://app.example",
            access_log=True,
        )
    )
    try:
        context = ssl.create_default_context(cafile=str(tls.ca))
        # Plain HTTP to the TLS port is not served.
        with pytest.raises((http.client.HTTPException, ConnectionError)):
            get(api, "/v2/health/live")
        # Health is open (probes send no token); the rest needs one.
        assert get(api, "/v2/health/ready", context=context)[0] == 200
        before = count("/v2/models/{model}", "401"), count("/v2/models/{model}", "200")
        status, body, response = get(api, "/v2/models/digits", context=context)
        assert status == 401 and response.getheader("www-authenticate") == "Bearer"
        assert "missing credentials" in json.loads(body)["error"]
        status, body, _ = get(
            api, "/v2/models/digits", {"Authorization": "Bearer wrong-token-000000"}, context
        )
        assert status == 401 and json.loads(body)["error"] == "invalid bearer token"
        with caplog.at_level(logging.INFO, logger="inferpool.access"):
            status, body, response = get(
                api,
                "/v2/models/digits",
                {"Authorization": f"Bearer {TOKEN}", "Origin": "https://app.example"},
                context,
            )
        assert status == 200 and json.loads(body)["name"] == "digits"
        # CORS for the configured origin only.
        assert response.getheader("access-control-allow-origin") == "https://app.example"
        _, _, other = get(
            api,
            "/v2/models/digits",
            {"Authorization": f"Bearer {TOKEN}", "Origin": "https://evil.example"},
            context,
        )
        assert other.getheader("access-control-allow-origin") is None
        # Counted by route template and status; one access-log line naming the caller.
        assert count("/v2/models/{model}", "401") - before[0] == 2
        assert count("/v2/models/{model}", "200") - before[1] == 2
        lines = [r.getMessage() for r in caplog.records if r.name == "inferpool.access"]
        assert any("GET /v2/models/digits 200" in line and "caller=alice" in line for line in lines), lines
        assert all(TOKEN not in line for line in lines)
    finally:
        api.stop()


def test_cors_is_off_unless_configured(redis_server: RedisServer, memcached_server: MemcachedServer) -> None:
    api = ApiThread(stack_settings(redis_server, memcached_server, http_port=free_port()))
    try:
        status, _, response = get(api, "/v2/models/digits", {"Origin": "https://app.example"})
        assert status == 200 and response.getheader("access-control-allow-origin") is None
        status, body, _ = get(api, "/nope")
        assert status == 404 and json.loads(body)["error"] == "no route for GET /nope"
        assert count("unmatched", "404") >= 1
    finally:
        api.stop()
