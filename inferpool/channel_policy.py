"""How a client channel spreads, retries and keeps its calls alive.

The gRPC service config every `Client` and `AsyncClient` channel carries (round-robin
over the target's addresses, retries on UNAVAILABLE for the calls safe to repeat,
optional health checking), the keepalive the server accepts, and the client-side
attempts for submits, which the service config leaves alone because a submit creates a
job. The reasons for each choice are in docs/scaling.md.
"""

from __future__ import annotations

import json
import random
import time
import uuid
from typing import Any

import grpc

# Attempts per call, the first included (gRPC caps a retry policy at 5).
MAX_ATTEMPTS = 4
INITIAL_BACKOFF_S = 0.05
MAX_BACKOFF_S = 1.0
BACKOFF_MULTIPLIER = 2.0
# Keepalive matched to the server's defaults (inferpool/settings.py): the server drops a
# client that pings more often than min_client_ping_interval_s (10 s) while no call is
# open, so the client pings every 30 s, and only while calls are open.
KEEPALIVE_TIME_S = 30.0
KEEPALIVE_TIMEOUT_S = 10.0

# The calls a retry cannot harm: reading, classifying (the same input gives the same
# answer; a retry at worst computes it twice), cancelling (a cancelled job stays
# cancelled), health. A submit creates a job, so it is not here: the channel cannot tell
# whether a submit carries an idempotency key, and `submit()` retries on its own, with
# the key it always sends (see docs/scaling.md).
RETRYABLE_METHODS: tuple[tuple[str, str], ...] = (
    ("inferpool.v1.InferenceService", ""),
    ("inference.GRPCInferenceService", ""),
    ("inferpool.v1.JobService", "GetJob"),
    ("inferpool.v1.JobService", "WatchJob"),
    ("inferpool.v1.JobService", "CancelJob"),
    ("grpc.health.v1.Health", "Check"),
)
# Only UNAVAILABLE: the call did not run (no replica, a replica draining or gone, the
# connection cut before an answer). RESOURCE_EXHAUSTED means "overloaded": an immediate
# retry adds load where it hurts. DEADLINE_EXCEEDED has used the caller's time.
RETRYABLE_CODES = ("UNAVAILABLE",)


def health_checked(target: str) -> bool:
    """Whether a channel to `target` watches each address's health by default: yes for
    a target naming replicas through a resolver (`dns:`, `ipv4:`, `ipv6:`), no for a
    plain host:port, which is usually a proxy: its health answer would be the one of
    whichever replica the proxy picked, and the proxy checks its replicas itself."""
    return target.split(":", 1)[0] in ("dns", "ipv4", "ipv6")


def service_config(max_attempts: int = MAX_ATTEMPTS, *, health_check: bool = False) -> str:
    """The gRPC service config (JSON) every client channel carries: `round_robin` over
    every address the target resolves to (`dns:///api:50051`, `ipv4:10.0.0.1:50051,
    10.0.0.2:50051`), and a retry policy for UNAVAILABLE on the calls safe to repeat.
    gRPC jitters each backoff (uniform in [0, backoff]) and never retries past the
    call's deadline. `max_attempts` 1 turns retries off. With `health_check`, an
    address whose `grpc.health.v1` status is not SERVING (a replica draining, or
    without Redis) gets no calls; a server without the health service counts as up."""
    config: dict[str, Any] = {"loadBalancingConfig": [{"round_robin": {}}]}
    if health_check:
        config["healthCheckConfig"] = {"serviceName": ""}
    if max_attempts > 1:
        config["methodConfig"] = [
            {
                "name": [{"service": s, **({"method": m} if m else {})} for s, m in RETRYABLE_METHODS],
                "retryPolicy": {
                    "maxAttempts": min(max_attempts, 5),
                    "initialBackoff": f"{INITIAL_BACKOFF_S}s",
                    "maxBackoff": f"{MAX_BACKOFF_S}s",
                    "backoffMultiplier": BACKOFF_MULTIPLIER,
                    "retryableStatusCodes": list(RETRYABLE_CODES),
                },
            }
        ]
    return json.dumps(config)


def channel_options(max_attempts: int = MAX_ATTEMPTS, *, health_check: bool = False) -> list[tuple[str, Any]]:
    """The options of a client channel: the service config, and keepalive the server accepts."""
    return [
        ("grpc.service_config", service_config(max_attempts, health_check=health_check)),
        ("grpc.enable_retries", 1 if max_attempts > 1 else 0),
        ("grpc.keepalive_time_ms", int(KEEPALIVE_TIME_S * 1000)),
        ("grpc.keepalive_timeout_ms", int(KEEPALIVE_TIMEOUT_S * 1000)),
        ("grpc.keepalive_permit_without_calls", 0),
        # A long WatchJob may carry no data for minutes; keep pinging it.
        ("grpc.http2.max_pings_without_data", 0),
    ]


class Attempts:
    """Client-side retries for submits (which the service config leaves alone): bounded
    attempts, exponential backoff with full jitter, never past the caller's deadline."""

    def __init__(self, max_attempts: int, timeout_s: float | None) -> None:
        self.left = max(1, max_attempts)
        self.ends = None if timeout_s is None else time.monotonic() + timeout_s
        self.backoff_s = INITIAL_BACKOFF_S

    def timeout(self) -> float | None:
        """The next attempt's deadline: what is left of the caller's."""
        return None if self.ends is None else max(0.0, self.ends - time.monotonic())

    def pause(self, exc: grpc.RpcError) -> float | None:
        """How long to wait before the next attempt, or None: give up (raise `exc`)."""
        self.left -= 1
        if self.left <= 0 or exc.code() != grpc.StatusCode.UNAVAILABLE:
            return None
        pause = random.uniform(0, self.backoff_s)
        self.backoff_s = min(self.backoff_s * BACKOFF_MULTIPLIER, MAX_BACKOFF_S)
        if self.ends is not None and time.monotonic() + pause >= self.ends:
            return None
        return pause


def new_idempotency_key() -> str:
    return uuid.uuid4().hex


def options_for(target: str, max_attempts: int, health_check: bool | None) -> list[tuple[str, Any]]:
    """`channel_options` for a client of `target`: health checking by default only where
    `target` names replicas through a resolver (see `health_checked`)."""
    return channel_options(
        max_attempts, health_check=health_checked(target) if health_check is None else health_check
    )
