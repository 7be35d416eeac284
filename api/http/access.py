"""The HTTP front's access line: the same one line per call on `inferpool.access` as
gRPC's (api/status.py), with the same fields, so one query finds a slow or failed call
whichever front it came through.

Fields: `method` (the verb and route template, e.g. `POST /v2/models/{model}/infer`:
bounded, as gRPC's method name is), `path` (the path as sent, escaped and cut), `code`
(the HTTP status, as text like gRPC's code names), `duration_ms`, `peer`, `request_id`
(the `x-request-id` header, else an inference body's `id`), `caller` (the token's
name, never the token) and `trace_id` (by inferpool.logs). Never headers or bodies.
Successful calls are logged each; failed ones (4xx, 5xx) at most once per
LOG_INTERVAL_S per route and status, the next line saying how many were left out.
Health probes are not logged, as gRPC's health service is not.
"""

from __future__ import annotations

import logging
import time

from starlette.types import Scope

from inferpool.api import status

access_log = logging.getLogger("inferpool.access")

# Where an endpoint leaves the id it found in the request body (KServe's `id`).
REQUEST_ID = "inferpool.request_id"
UNLOGGED_PATHS = frozenset({"/v2/health/live", "/v2/health/ready"})


def _peer(scope: Scope) -> str:
    """The client's address, written as grpc writes its peers (ipv4:host:port)."""
    client = scope.get("client")
    if not client:
        return ""
    host, port = client[0], client[1]
    return f"ipv6:[{host}]:{port}" if ":" in host else f"ipv4:{host}:{port}"


def _request_id(scope: Scope) -> str:
    for key, value in scope["headers"]:
        if key == b"x-request-id":
            return value.decode("latin-1")
    found = scope.get(REQUEST_ID)
    return found if isinstance(found, str) else ""


class HttpAccessLog:
    """Writes the access lines of one HTTP front."""

    def __init__(self, log_interval_s: float | None = None) -> None:
        self.limiter = status.RateLimiter(status.LOG_INTERVAL_S if log_interval_s is None else log_interval_s)

    def write(self, scope: Scope, route: str, code: int, t0: float, caller: str) -> None:
        """The call's line (`t0`: its perf_counter start); failed calls rate-limited."""
        path: str = scope["path"]
        if path in UNLOGGED_PATHS or not access_log.isEnabledFor(logging.INFO):
            return
        method = f"{scope['method']} {route}"
        suppressed = 0
        if code >= 400:
            allowed = self.limiter.allow((method, f"access:{code}"))
            if allowed is None:
                return
            suppressed = allowed
        duration_ms = (time.perf_counter() - t0) * 1000
        fields = {
            "method": method,
            "path": status.access_field(path),
            "code": str(code),
            "duration_ms": round(duration_ms, 3),
            "peer": status.access_field(_peer(scope)),
            "request_id": status.access_field(_request_id(scope)),
            "caller": caller,
            "suppressed": suppressed,
        }
        status.write_access_line(
            "%s %s %s %.1fms peer=%s request_id=%s%s%s",
            (
                scope["method"],
                fields["path"],
                code,
                duration_ms,
                fields["peer"],
                fields["request_id"],
                f" caller={caller}" if caller else "",
                f" ({suppressed} failed calls like it not logged)" if suppressed else "",
            ),
            fields,
        )
