"""Traces end to end, through a real OTLP receiver (tests/otlp_receiver.py): the API (in
this process) and a worker (its own process) export to it as they would to Jaeger or
a collector, and the tests read back the spans they sent."""

from __future__ import annotations

import http.client
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis

from inferpool import tensor, tracing
from inferpool.cache import Cache
from inferpool.client import Client
from inferpool.names import job_key
from inferpool.v1 import envelope_pb2
from inferpool.workers.results import Ticket
from tests.integration.traced import (
    classify_traced,
    http_infer,
    new_caller,
    one_span,
    random_inputs,
    submit_traced,
)
from tests.otlp_receiver import Receiver, Span
from tests.servers import (
    ApiThread,
    MemcachedServer,
    RedisServer,
    Worker,
    free_port,
    stack_settings,
    wait_until,
)

pytestmark = pytest.mark.timeout(240)

SERVER = 2  # OTLP Span.SpanKind SPAN_KIND_SERVER
CLASSIFY = "inferpool.v1.InferenceService/Classify"


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.stop()


def _worker_env(receiver: Receiver) -> dict[str, str]:
    # Spans leave the worker within 50 ms instead of the SDK's 5 s.
    return {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "50"}


@pytest.fixture(scope="module")
def stack(receiver: Receiver, logdir: Path) -> Iterator[tuple[ApiThread, Worker, RedisServer]]:
    # A stack of its own: no other worker may take its messages.
    redis_server = RedisServer(logdir)
    memcached = MemcachedServer(logdir)
    # Misses arriving within the window leave in one envelope: one batch on the worker.
    settings = stack_settings(
        redis_server, memcached, coalesce_window_ms=1000.0, bulk_chunk_items=8, http_port=free_port()
    )
    worker = Worker(settings, logdir, extra_env=_worker_env(receiver))
    assert tracing.setup(tracing.API_SERVICE, {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint})
    api = ApiThread(settings)
    try:
        yield api, worker, redis_server
    finally:
        api.stop()
        tracing.shutdown()
        worker.stop()
        memcached.stop()
        redis_server.stop()


def test_a_miss_is_one_trace_from_the_caller_through_the_batch_and_back(
    stack: tuple[ApiThread, Worker, RedisServer], receiver: Receiver
) -> None:
    api, _, _ = stack
    callers = classify_traced(api, random_inputs(1, 4))
    tracing.force_flush()
    trace_ids = {t for t, _ in callers}

    def batch_spans(spans: list[Span]) -> list[Span]:
        batches = [s for s in spans if s.name == "worker.batch" and {t for t, _ in s.links} & trace_ids]
        linked = {t for b in batches for t, _ in b.links}
        return batches if trace_ids <= linked and all(receiver.trace(t) for t in trace_ids) else []

    batches = receiver.wait(batch_spans, 30, "the batch spans of four misses")
    # The misses arrive within the coalescing window, so they leave in one envelope and
    # one batch serves them all; a machine slowed down enough to split them must still
    # show batches that each account for exactly the requests they served.
    assert max(len(b.links) for b in batches) >= 2
    for batch in batches:
        assert batch.service == tracing.WORKER_SERVICE
        assert batch.attributes["inferpool.batch.size"] == len(batch.links)
        assert batch.attributes["inferpool.model"] == "digits"
        assert batch.attributes["inferpool.model.version"] == 1
        assert batch.attributes["inferpool.device"] == "cpu"
        assert batch.trace_id in trace_ids  # parented to one of the requests it served
        # Its children: the model call, the cache write, the replies, in its trace.
        spans = receiver.trace(batch.trace_id)
        for name in ("worker.model", "worker.cache_write", "worker.reply"):
            child = one_span(spans, name)
            assert child.parent_id == batch.span_id
            assert batch.start_ns <= child.start_ns <= child.end_ns <= batch.end_ns

    for trace_id, caller_span in callers:
        (batch,) = [b for b in batches if trace_id in {t for t, _ in b.links}]
        model = one_span(receiver.trace(batch.trace_id), "worker.model")
        receiver.wait(
            lambda spans, t=trace_id: [s for s in spans if s.trace_id == t and s.name == "worker.queue_wait"],
            30,
            "the queue wait",
        )
        spans = receiver.trace(trace_id)
        server = one_span(spans, CLASSIFY)
        # The caller's context was honoured: the API's span is its child.
        assert (server.kind, server.parent_id, server.service) == (SERVER, caller_span, tracing.API_SERVICE)
        assert server.attributes["rpc.grpc.status_code"] == "OK"
        lookup = one_span(spans, "inferpool.cache_lookup")
        assert lookup.parent_id == server.span_id and lookup.attributes["inferpool.cache.hit"] is False
        flight = one_span(spans, "inferpool.single_flight")
        assert flight.parent_id == server.span_id
        assert flight.attributes["inferpool.flight.role"] == "leader"
        publish = one_span(spans, "inferpool.publish")
        assert publish.parent_id == flight.span_id
        items = publish.attributes["inferpool.envelope.items"]
        assert 1 <= items <= batch.attributes["inferpool.batch.size"]
        assert publish.attributes["inferpool.envelope.bytes"] > items * 28 * 28 * 4
        wait = one_span(spans, "inferpool.reply_wait")
        assert wait.parent_id == flight.span_id
        queue_wait = one_span(spans, "worker.queue_wait", tracing.WORKER_SERVICE)
        assert queue_wait.parent_id == flight.span_id
        assert queue_wait.links == [(batch.trace_id, batch.span_id)]
        # The batch served this request.
        assert (trace_id, flight.span_id) in batch.links
        # Timings: one clock, and the parts fit in the whole.
        assert server.start_ns <= publish.start_ns <= queue_wait.start_ns
        assert queue_wait.end_ns <= batch.start_ns + 1
        assert queue_wait.duration_ns + model.duration_ns <= server.duration_ns
        # The reply is pushed before the batch span ends, so only the model call is
        # known to end before the API's span does.
        assert batch.start_ns <= model.start_ns <= model.end_ns <= server.end_ns


def test_an_http_request_is_the_child_of_its_callers_span_and_reaches_the_batch(
    stack: tuple[ApiThread, Worker, RedisServer], receiver: Receiver
) -> None:
    api, _, _ = stack
    trace_id, caller_span, traceparent = new_caller()
    (x,) = random_inputs(6, 1)
    status = http_infer(api, x, {"traceparent": traceparent, "tracestate": "vendor=opaque,other=1"})
    assert status == 200
    tracing.force_flush()
    receiver.wait(
        lambda spans: [s for s in spans if s.trace_id == trace_id and s.name == "worker.queue_wait"],
        30,
        "the HTTP request's queue wait",
    )
    spans = receiver.trace(trace_id)
    server = one_span(spans, "POST /v2/models/{model}/infer")
    assert (server.kind, server.parent_id, server.service) == (SERVER, caller_span, tracing.API_SERVICE)
    assert server.attributes["http.route"] == "/v2/models/{model}/infer"
    assert server.attributes["http.response.status_code"] == 200
    assert server.attributes["url.path"] == "/v2/models/digits/infer"
    # The caller's tracestate travels with its context, as W3C asks.
    assert server.trace_state == "vendor=opaque,other=1"
    lookup = one_span(spans, "inferpool.cache_lookup")
    assert lookup.parent_id == server.span_id and lookup.attributes["inferpool.cache.hit"] is False
    flight = one_span(spans, "inferpool.single_flight")
    assert one_span(spans, "worker.queue_wait", tracing.WORKER_SERVICE).parent_id == flight.span_id
    # Without trace headers an HTTP request starts a trace of its own.
    before = {s.span_id for s in receiver.spans}
    assert http_infer(api, x, {}) == 200  # a hit now
    tracing.force_flush()
    (fresh,) = receiver.wait(
        lambda spans: [
            s for s in spans if s.span_id not in before and s.name == "POST /v2/models/{model}/infer"
        ],
        30,
        "the second request's span",
    )
    assert fresh.parent_id == "" and fresh.trace_id != trace_id


def _get_not_found(api: ApiThread, receiver: Receiver, path: str) -> tuple[Span, str]:
    """GETs `path` (a 404) with a caller's trace context: the one span of that trace, and
    the caller's span id."""
    trace_id, caller_span, traceparent = new_caller()
    conn = http.client.HTTPConnection("127.0.0.1", api.server.http_port, timeout=30)
    try:
        conn.request("GET", path, headers={"traceparent": traceparent})
        assert conn.getresponse().status == 404
    finally:
        conn.close()
    tracing.force_flush()
    (span,) = receiver.wait(lambda spans: [s for s in spans if s.trace_id == trace_id], 30, "the span")
    return span, caller_span


def test_an_http_client_error_is_not_a_server_error_span(
    stack: tuple[ApiThread, Worker, RedisServer], receiver: Receiver
) -> None:
    api, _, _ = stack
    server, caller_span = _get_not_found(api, receiver, "/v2/models/no-such-model")
    assert (server.name, server.parent_id) == ("GET /v2/models/{model}", caller_span)
    assert server.attributes["http.response.status_code"] == 404
    assert server.status_code == 0  # unset: a client's mistake is not the server's error
    # A path no route serves keeps the method as its name: paths are the client's text.
    unrouted, _ = _get_not_found(api, receiver, "/no/such/path")
    assert unrouted.name == "GET" and "http.route" not in unrouted.attributes
    assert unrouted.attributes["url.path"] == "/no/such/path"


def test_a_hit_has_no_worker_span(stack: tuple[ApiThread, Worker, RedisServer], receiver: Receiver) -> None:
    api, _, _ = stack
    (hit_input,) = random_inputs(2, 1)
    classify_traced(api, [hit_input])  # a miss, cached by the worker
    ((hit_trace, _),) = classify_traced(api, [hit_input])
    # A later miss: once its worker spans are in, any the hit had caused would be too
    # (the worker exports in order).
    ((later, _),) = classify_traced(api, random_inputs(3, 1))
    tracing.force_flush()
    receiver.wait(
        lambda spans: any(s.trace_id == later and s.name == "worker.batch" for s in spans), 30, "a batch"
    )
    spans = receiver.trace(hit_trace)
    assert one_span(spans, "inferpool.cache_lookup").attributes["inferpool.cache.hit"] is True
    assert one_span(spans, CLASSIFY).attributes["rpc.grpc.status_code"] == "OK"
    assert not [s for s in spans if s.service == tracing.WORKER_SERVICE]
    assert not [s for s in spans if s.name in ("inferpool.publish", "inferpool.single_flight")]


def test_a_bulk_job_is_one_trace_with_a_span_per_chunk(
    stack: tuple[ApiThread, Worker, RedisServer], receiver: Receiver
) -> None:
    api, _, _ = stack
    caller_trace, caller_span, traceparent = new_caller()
    x = np.random.default_rng(5).random((40, 1, 28, 28), dtype=np.float32)
    with Client(api.target) as client:
        job = submit_traced(client, x, traceparent)
        job.wait(timeout_s=60)
    tracing.force_flush()

    def chunks(spans: list[Span]) -> list[Span]:
        found = [s for s in spans if s.trace_id == caller_trace and s.name == "worker.chunk"]
        return found if len(found) == 5 else []

    found = receiver.wait(chunks, 30, "five chunk spans")
    spans = receiver.trace(caller_trace)
    submit = one_span(spans, "inferpool.v1.JobService/SubmitJobStream")
    assert submit.parent_id == caller_span
    assert {s.attributes["inferpool.job_id"] for s in found} == {job.id}
    assert sorted(s.attributes["inferpool.chunk.items"] for s in found) == [8] * 5
    for chunk in found:
        assert chunk.parent_id == submit.span_id
        kids = {s.name: s for s in spans if s.parent_id == chunk.span_id}
        assert set(kids) == {"worker.queue_wait", "worker.compute", "worker.result_write"}
        assert chunk.start_ns <= kids["worker.queue_wait"].end_ns <= kids["worker.compute"].start_ns
        assert kids["worker.result_write"].end_ns <= chunk.end_ns
        assert not chunk.events  # delivered once


def test_a_chunk_redelivered_after_a_worker_is_killed_is_an_event_in_its_trace(
    receiver: Receiver, logdir: Path
) -> None:
    redis_server = RedisServer(logdir)
    memcached = MemcachedServer(logdir)
    settings = stack_settings(redis_server, memcached, bulk_chunk_items=8, bulk_prefetch_chunks=4)
    r = redis.Redis.from_url(redis_server.url)
    env = _worker_env(receiver)
    first = Worker(settings, logdir, extra_env=env)
    second: Worker | None = None
    api = ApiThread(settings)
    caller_trace, _, traceparent = new_caller()
    try:
        items = 6000
        x = np.random.default_rng(12).random((items, 1, 28, 28), dtype=np.float32)
        with Client(api.target) as client:
            job = submit_traced(client, x, traceparent)
            done = lambda: int(r.hget(job_key(job.id), "done") or 0)  # noqa: E731
            wait_until(lambda: done() >= 500, 60, "500 items done", poll_s=0.001)
            first.kill()
            assert int(r.hget(job_key(job.id), "done") or 0) < items, "the job ended before the kill"
            second = Worker(settings, logdir, extra_env=env)
            job.wait(timeout_s=120)

        def redelivered(spans: list[Span]) -> list[Span]:
            return [
                s
                for s in spans
                if s.trace_id == caller_trace
                and s.name == "worker.chunk"
                and any(name == "redelivered" for name, _ in s.events)
            ]

        found = receiver.wait(redelivered, 60, "a redelivered chunk's span")
        attributes = next(a for name, a in found[0].events if name == "redelivered")
        assert attributes["inferpool.chunk.delivery"] >= 2
        assert found[0].attributes["inferpool.chunk.delivery"] >= 2
    finally:
        api.stop()
        for w in (first, second):
            if w is not None:
                w.stop()
        memcached.stop()
        redis_server.stop()


def test_an_item_expired_in_the_worker_is_a_dropped_event_with_no_compute_span(
    receiver: Receiver, redis_client: redis.Redis, memcached_server: MemcachedServer
) -> None:
    from inferpool.workers.batcher import Pending
    from tests.integration.test_batcher import _batcher, _Gated

    # On already when this module's stack runs (its API's spans go to the same receiver).
    started_here = not tracing.enabled()
    if started_here:
        assert tracing.setup(tracing.WORKER_SERVICE, {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint})
    cache = Cache(memcached_server.address, timeout_ms=500, ttl_s=60)
    batcher = _batcher(redis_client, cache, _Gated)
    gate = batcher.runner
    assert isinstance(gate, _Gated)
    reply_key = f"test.replies.{secrets.token_hex(8)}"

    def pending(ticket: Ticket, deadline_ns: int, traceparent: str, seed: int) -> Pending:
        t = tensor.to_proto(random_inputs(100 + seed, 1)[0])
        item = envelope_pb2.EnvelopeItem(
            request_id=secrets.token_hex(8),
            input=t,
            deadline_unix_ns=deadline_ns,
            reply_key=reply_key,
            traceparent=traceparent,
        )
        return Pending(item, batcher.cfg.validate(t), ticket)

    slow_trace, _, slow_tp = new_caller()
    late_trace, late_span, late_tp = new_caller()
    batcher.start()
    try:
        far = time.time_ns() + 60 * 10**9
        slow = Ticket(1, time.time_ns())
        batcher.submit([pending(slow, far, slow_tp, 1)])
        assert gate.entered.wait(30)  # the model is busy with that batch
        near = time.time_ns() + 50 * 10**6
        late = Ticket(1, time.time_ns())
        batcher.submit([pending(late, near, late_tp, 2)])
        wait_until(lambda: time.time_ns() > near, 5, "the near deadline to pass")
        gate.release.set()
        assert slow.done.wait(30) and late.done.wait(30)
        assert (late.computed, late.expired) == (0, 1)
        tracing.force_flush()
        receiver.wait(lambda spans: [s for s in spans if s.trace_id == late_trace], 30, "the drop")
        spans = receiver.trace(late_trace)
        (wait,) = spans
        assert (wait.name, wait.parent_id) == ("worker.queue_wait", late_span)
        assert [name for name, _ in wait.events] == ["dropped"]
        assert wait.events[0][1]["reason"] == "deadline expired"
        # The slow item was computed: its trace has the batch, the other none.
        assert one_span(receiver.trace(slow_trace), "worker.batch").attributes["inferpool.batch.size"] == 1
    finally:
        gate.release.set()
        batcher.stop()
        batcher.join(timeout=30)
        cache.close()
        if started_here:
            tracing.shutdown()


def test_tracing_is_off_without_an_endpoint() -> None:
    assert tracing.endpoint({}) == ""
    assert tracing.endpoint({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://x:4317"}) == "http://x:4317"
    off = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4317", "OTEL_SDK_DISABLED": "true"}
    assert tracing.endpoint(off) == ""
    assert not tracing.setup(tracing.API_SERVICE, {})
