"""The worker's spans, started from the traceparents the envelope carries, in threads
with no current span of their own.

Interactive: each item's queue wait (from its publish to its batch), and one span per
batch, parented to the first item's request and linked to every item's, with the model
call, cache write and reply as its children; an item dropped unseen is a queue wait
ending in a `dropped` event. Bulk: one span per chunk in its job's trace, with its
queue wait, compute and result write, and a redelivery as an event.
"""

from __future__ import annotations

import contextvars
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from inferpool.tracing import context, export
from inferpool.tracing.context import LOG_TRACE
from inferpool.tracing.export import NO_SPAN

if TYPE_CHECKING:
    from opentelemetry.trace import Span, Tracer

log = logging.getLogger("inferpool.tracing")


class BatchTrace:
    """The spans of one worker batch: the batch span (parented to the first item's
    request, linked to every item's), its children, and each item's queue wait."""

    def __init__(
        self, tracer: Tracer, traceparents: Sequence[str], attributes: Mapping[str, Any], started_ns: int
    ) -> None:
        from opentelemetry.trace import Link

        self._tracer = tracer
        self.contexts = [context.span_context(tp) for tp in traceparents]
        links = [Link(c) for c in self.contexts if c is not None]
        parent = next((context.extract(tp) for tp in traceparents if tp), None)
        self.span: Span = tracer.start_span(
            "worker.batch", context=parent, attributes=dict(attributes), links=links, start_time=started_ns
        )
        first = self.contexts[0] if self.contexts else None
        self.token = LOG_TRACE.set(f"{first.trace_id:032x}" if first is not None else "")

    def queue_waits(self, traceparents: Sequence[str], enqueued_ns: Sequence[int], started_ns: int) -> None:
        """One queue-wait span per item, from its publish to this batch, linked to it."""
        from opentelemetry.trace import Link

        link = [Link(self.span.get_span_context())]
        for tp, t0 in zip(traceparents, enqueued_ns, strict=True):
            parent = context.extract(tp)
            if parent is None:
                continue
            s = self._tracer.start_span(
                "worker.queue_wait", context=parent, links=link, start_time=min(t0, started_ns)
            )
            s.end(end_time=started_ns)

    @contextmanager
    def child(self, name: str, attributes: Mapping[str, Any] | None = None) -> Iterator[Any]:
        from opentelemetry import trace

        ctx = trace.set_span_in_context(self.span)
        s = self._tracer.start_span(name, context=ctx, attributes=attributes)
        try:
            yield s
        finally:
            s.end()

    def end(self) -> None:
        LOG_TRACE.reset(self.token)
        self.span.end()


# The batch the batcher (or results) thread is working on, for batch_child().
_BATCH: contextvars.ContextVar[BatchTrace | None] = contextvars.ContextVar("inferpool_batch", default=None)


@contextmanager
def _batch_scope(
    tracer: Tracer,
    traceparents: Sequence[str],
    enqueued_ns: Sequence[int],
    attributes: Mapping[str, Any],
    started_ns: int,
) -> Iterator[None]:
    trace = BatchTrace(tracer, traceparents, attributes, started_ns)
    trace.queue_waits(traceparents, enqueued_ns, started_ns)
    token = _BATCH.set(trace)
    try:
        yield
    finally:
        _BATCH.reset(token)
        trace.end()


def batch_scope(live: Sequence[Any], attributes: Callable[[], Mapping[str, Any]], started_ns: int) -> Any:
    """The span of one interactive batch (`live`: the batcher's Pending items, each
    with `.item.traceparent` and `.ticket.enqueued_unix_ns`), current for
    batch_child() while it runs; the items' queue waits end at `started_ns`. A no-op
    when off or when no item carries a trace context."""
    tracer = export.tracer
    if tracer is None:
        # Off, log lines still name the first request's trace when its caller sent one.
        first = live[0].item.traceparent if live else ""
        return context.bound(context.trace_id_of(first)) if first else NO_SPAN
    traceparents = [p.item.traceparent for p in live]
    if not any(traceparents):
        return NO_SPAN
    enqueued = [p.ticket.enqueued_unix_ns for p in live]
    return _batch_scope(tracer, traceparents, enqueued, attributes(), started_ns)


def batch_child(name: str, attributes: Mapping[str, Any] | None = None) -> Any:
    """A child span of the current batch (the model call, the cache and reply writes)."""
    if export.tracer is None:
        return NO_SPAN
    trace = _BATCH.get()
    return NO_SPAN if trace is None else trace.child(name, attributes)


def dropped(traceparent: str, enqueued_ns: int, reason: str, now_ns: int) -> None:
    """An item the worker dropped unseen: its queue wait, ending in a `dropped` event."""
    tracer = export.tracer
    if tracer is None or not traceparent:
        return
    parent = context.extract(traceparent)
    if parent is None:
        return
    s = tracer.start_span("worker.queue_wait", context=parent, start_time=min(enqueued_ns, now_ns))
    s.add_event("dropped", {"reason": reason}, timestamp=now_ns)
    s.end(end_time=now_ns)


# -- bulk chunks: a span per chunk in its job's trace


def start_chunk(envelope: Any, chunk_id: str, items: int, deliveries: Callable[[str], int]) -> Any:
    """The span of one bulk chunk taken by this worker (ended by end_chunk), from its
    publish: its queue wait is a child span, and a redelivery (`deliveries(chunk_id)`
    counts the takes) an event. NO_SPAN when off or the chunk carries no trace context."""
    tracer = export.tracer
    traceparent = envelope.chunk.traceparent if envelope.HasField("chunk") else ""
    parent = context.extract(traceparent) if tracer is not None and traceparent else None
    if tracer is None or parent is None:
        return NO_SPAN
    now_ns = time.time_ns()
    enqueued_ns = min(envelope.enqueued_unix_ns or now_ns, now_ns)
    s = tracer.start_span(
        "worker.chunk",
        context=parent,
        attributes={
            "inferpool.job_id": envelope.job_id,
            "inferpool.chunk": chunk_id,
            "inferpool.chunk.items": items,
            "inferpool.model": envelope.model,
            "inferpool.model.version": envelope.model_version,
        },
        start_time=enqueued_ns,
    )
    from opentelemetry import trace

    in_chunk = trace.set_span_in_context(s)
    wait = tracer.start_span("worker.queue_wait", context=in_chunk, start_time=enqueued_ns)
    wait.end(end_time=now_ns)
    try:
        attempt = deliveries(chunk_id)
    except Exception as exc:  # tracing never fails a chunk
        log.debug("could not count the deliveries of chunk %s: %r", chunk_id, exc)
        attempt = 1
    s.set_attribute("inferpool.chunk.delivery", attempt)
    if attempt > 1:
        s.add_event("redelivered", {"inferpool.chunk.delivery": attempt}, timestamp=now_ns)
    return s


def child_traceparent(span: Any) -> str:
    """The traceparent of `span` ("" for NO_SPAN): what a chunk's items carry."""
    if span is NO_SPAN:
        return ""
    return context.format_context(span.get_span_context())


def end_chunk(span: Any, unrecorded: int) -> None:
    if span is NO_SPAN:
        return
    if unrecorded:
        span.add_event("requeued", {"inferpool.chunk.unrecorded": unrecorded})
    span.end()


def record_spans(
    name: str, traceparents: Iterator[str], start_ns: int, attributes: Mapping[str, Any] | None = None
) -> None:
    """A span `name` from start_ns to now under each distinct traceparent (a bulk batch's
    compute or result write, once per chunk it served). `traceparents` is only read
    when tracing is on."""
    tracer = export.tracer
    if tracer is None:
        return
    end_ns = time.time_ns()
    for tp in dict.fromkeys(traceparents):
        parent = context.extract(tp) if tp else None
        if parent is not None:
            start = min(start_ns, end_ns)
            s = tracer.start_span(name, context=parent, attributes=attributes, start_time=start)
            s.end(end_time=end_ns)
