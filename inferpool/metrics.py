"""What the API's and the workers' Prometheus metrics share: a registry per process
with the default process collectors, histogram buckets, and the /metrics server."""

from __future__ import annotations

import logging
import threading
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    start_http_server,
)

log = logging.getLogger(__name__)

# From a cache-speed answer to a deadline-bound wait of seconds.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Batch and envelope sizes: powers of two up to well past any max_batch_size in use.
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


def new_registry() -> CollectorRegistry:
    """A registry of its own (not prometheus_client's global one), with the process,
    platform and GC collectors."""
    registry = CollectorRegistry(auto_describe=True)
    for default in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
        registry.register(default)
    return registry


def serve(registry: CollectorRegistry, port: int, host: str) -> tuple[WSGIServer, threading.Thread]:
    """Serves GET /metrics for `registry` on a daemon thread (port 0 picks a free one:
    `server.server_port`)."""
    server, thread = start_http_server(port, addr=host, registry=registry)
    log.info("metrics on http://%s:%d/metrics", host, server.server_port)
    return server, thread
