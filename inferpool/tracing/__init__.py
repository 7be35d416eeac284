"""Distributed tracing with OpenTelemetry, off unless an OTLP endpoint is configured.

One concept per module, the names callers use re-exported here:

- `export`: whether this process traces and where spans go (`setup`, `shutdown`,
  `force_flush`); off, nothing of the SDK is imported and every helper returns the
  shared `NO_SPAN` at the cost of one attribute read.
- `context`: W3C trace context (`traceparent`, `tracestate`) from callers and in the
  envelope, and the trace id every log line about a request carries.
- `api_spans`: the API's spans, one server span per gRPC or HTTP call and its
  children, and the traceparent each envelope item takes to the worker.
- `worker_spans`: the worker's spans, joined to the caller's trace through the
  envelope: queue waits, one batch span linked to every request it served, bulk chunks.
"""

from inferpool.tracing.api_spans import (
    annotate,
    http_server_span,
    published,
    server_span,
    set_http_status,
    set_rpc_code,
    span,
    traceparent,
)
from inferpool.tracing.context import (
    TRACEPARENT,
    TRACESTATE,
    bind_trace_id,
    current_trace_id,
    exemplar,
    parse_traceparent,
    trace_id_of,
    unbind_trace_id,
)
from inferpool.tracing.export import (
    API_SERVICE,
    NO_SPAN,
    WORKER_SERVICE,
    enabled,
    endpoint,
    force_flush,
    resource_attributes,
    setup,
    shutdown,
)
from inferpool.tracing.worker_spans import (
    BatchTrace,
    batch_child,
    batch_scope,
    child_traceparent,
    dropped,
    end_chunk,
    record_spans,
    start_chunk,
)

__all__ = [
    "API_SERVICE",
    "NO_SPAN",
    "TRACEPARENT",
    "TRACESTATE",
    "WORKER_SERVICE",
    "BatchTrace",
    "annotate",
    "batch_child",
    "batch_scope",
    "bind_trace_id",
    "child_traceparent",
    "current_trace_id",
    "dropped",
    "enabled",
    "end_chunk",
    "endpoint",
    "exemplar",
    "force_flush",
    "http_server_span",
    "parse_traceparent",
    "published",
    "record_spans",
    "resource_attributes",
    "server_span",
    "set_http_status",
    "set_rpc_code",
    "setup",
    "shutdown",
    "span",
    "start_chunk",
    "trace_id_of",
    "traceparent",
    "unbind_trace_id",
]
