"""Whether this process traces, and where its spans go.

`setup(service)` switches tracing on when `OTEL_EXPORTER_OTLP_ENDPOINT` or
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set and not blank (OpenTelemetry's own
convention), with the SDK's batch span processor and OTLP/gRPC exporter; sampling
(`OTEL_TRACES_SAMPLER`, `OTEL_TRACES_SAMPLER_ARG`), `OTEL_SERVICE_NAME` and
`OTEL_RESOURCE_ATTRIBUTES` are the SDK's, read by it. Off, nothing of the SDK is
imported or built, and `tracer` stays None: every span helper of this package reads
it first and hands out the shared NO_SPAN.

The provider is this module's own, not OpenTelemetry's global one, so a process (a
test session) may set tracing up and shut it down more than once.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Tracer

log = logging.getLogger("inferpool.tracing")

API_SERVICE = "inferpool-api"
WORKER_SERVICE = "inferpool-worker"

# Read by every span helper: None while tracing is off.
tracer: Tracer | None = None
provider: TracerProvider | None = None
_lock = threading.Lock()


class _NoSpan:
    """What every helper hands out with tracing off: accepts and forgets."""

    __slots__ = ()

    def __enter__(self) -> _NoSpan:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def set_attribute(self, key: str, value: Any) -> None:
        return None

    def add_event(self, name: str, attributes: Mapping[str, Any] | None = None) -> None:
        return None

    def is_recording(self) -> bool:
        return False


NO_SPAN = _NoSpan()


def enabled() -> bool:
    return tracer is not None


def endpoint(environ: Mapping[str, str] | None = None) -> str:
    """The OTLP endpoint traces go to, "" when tracing is off."""
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return ""
    return (
        env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
        or env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
    )


def setup(service: str, environ: Mapping[str, str] | None = None) -> bool:
    """Switches tracing on for this process when the environment names an OTLP
    endpoint; `service` is the default service.name. Returns whether it is on.
    `environ` (tests) names the endpoint; the SDK reads the rest from os.environ."""
    global tracer, provider
    if not endpoint(environ):
        return False
    env = os.environ if environ is None else environ
    try:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as exc:
        from inferpool.settings import SettingsError

        raise SettingsError(
            f"OTEL_EXPORTER_OTLP_*ENDPOINT is set but OpenTelemetry is not installed ({exc.name}): "
            "pip install 'inferpool[tracing]', or unset it"
        ) from exc

    protocol = (
        env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc"
    )
    if protocol != "grpc":
        log.warning("OTLP protocol %r is not supported here; exporting over grpc", protocol[:32])
    # The SDK reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES; ours is only the default.
    resource = Resource.create({})
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": service}))
    # The sampler comes from OTEL_TRACES_SAMPLER(_ARG); the SDK's default is parent-based
    # always-on, so a caller's "not sampled" is obeyed.
    new = TracerProvider(resource=resource, shutdown_on_exit=False)
    new.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint(environ))))
    with _lock:
        old = provider
        provider = new
        tracer = new.get_tracer("inferpool")
    if old is not None:
        old.shutdown()
    log.info("tracing on: %s to %s", resource.attributes.get("service.name"), endpoint(environ)[:200])
    return True


def resource_attributes() -> dict[str, Any]:
    """The attributes every span of this process carries (service.name, ...); {} when off."""
    current = provider
    return dict(current.resource.attributes) if current is not None else {}


def shutdown() -> None:
    """Exports what is buffered and switches tracing off (idempotent)."""
    global tracer, provider
    with _lock:
        current, provider, tracer = provider, None, None
    if current is not None:
        current.force_flush(5000)
        current.shutdown()


def force_flush(timeout_ms: int = 5000) -> None:
    current = provider
    if current is not None:
        current.force_flush(timeout_ms)
