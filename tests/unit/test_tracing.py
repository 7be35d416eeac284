"""Tracing and log formatting without servers: trace-context parsing, the off path
(nothing of OpenTelemetry imported, no-op spans, the caller's context handed on),
and the text and JSON log lines."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys

import pytest

from inferpool import logs, tracing
from inferpool.settings import Settings, SettingsError

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE}-{SPAN}-01"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (TRACEPARENT, (TRACE, SPAN, 1)),
        (TRACEPARENT.upper(), (TRACE, SPAN, 1)),
        (f"01-{TRACE}-{SPAN}-00-future", (TRACE, SPAN, 0)),  # a later version may add fields
        (f"00-{TRACE}-{SPAN}-01-extra", None),
        (f"ff-{TRACE}-{SPAN}-01", None),
        (f"00-{'0' * 32}-{SPAN}-01", None),
        (f"00-{TRACE}-{'0' * 16}-01", None),
        (f"00-{TRACE[:-1]}-{SPAN}-01", None),
        ("", None),
        ("00-" + "a" * 600, None),
    ],
)
def test_traceparent_parsing(value: str, expected: tuple[str, str, int] | None) -> None:
    assert tracing.parse_traceparent(value) == expected


def test_off_no_tracing_sdk_is_imported_and_spans_are_no_ops() -> None:
    code = f"""
import sys
import inferpool.api.server, inferpool.api.core, inferpool.api.status
import inferpool.workers.batcher, inferpool.workers.results, inferpool.workers.bulk
from inferpool import tracing
assert not tracing.setup(tracing.API_SERVICE, {{}})
with tracing.span("x", {{"a": 1}}) as s:
    s.set_attribute("k", 1)
    assert s is tracing.NO_SPAN and tracing.traceparent() == ""
assert tracing.server_span("/a.B/C", ()) is tracing.NO_SPAN
assert tracing.batch_scope([], dict, 0) is tracing.NO_SPAN
assert tracing.batch_child("m") is tracing.NO_SPAN
tracing.dropped("{TRACEPARENT}", 0, "deadline expired", 1)
tracing.record_spans("c", iter(["{TRACEPARENT}"]), 0)
with tracing.server_span("/a.B/C", (("traceparent", "{TRACEPARENT}"),)):
    assert tracing.traceparent() == "{TRACEPARENT}"
    assert tracing.current_trace_id() == "{TRACE}"
assert tracing.current_trace_id() == "" and tracing.traceparent() == ""
assert tracing.http_server_span("GET", "/v2", [(b"accept", b"*/*")]) is tracing.NO_SPAN
with tracing.http_server_span("GET", "/v2", [(b"traceparent", b"{TRACEPARENT}")]) as s:
    tracing.set_http_status(s, "GET", "/v2", 500)
    assert tracing.traceparent() == "{TRACEPARENT}" and tracing.current_trace_id() == "{TRACE}"
assert tracing.current_trace_id() == ""

class Item:  # what batch_scope reads of the batcher's items
    class item:
        traceparent = "{TRACEPARENT}"
    class ticket:
        enqueued_unix_ns = 0

with tracing.batch_scope([Item()], dict, 0):
    assert tracing.current_trace_id() == "{TRACE}"  # the worker's log lines name it
assert tracing.current_trace_id() == ""
# (redis-py imports OpenTelemetry's metrics API when it is installed; the tracing SDK,
# the exporter and the propagator are ours to import, and only when on.)
ours = ("opentelemetry.sdk.trace", "opentelemetry.exporter", "opentelemetry.trace.propagation.tracecontext")
loaded = sorted(m for m in sys.modules if m.startswith(ours))
assert not loaded, loaded
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]


def test_a_malformed_caller_traceparent_is_ignored() -> None:
    with tracing.server_span("/a.B/C", (("traceparent", "00-nothex-01"),)) as span:
        assert span is tracing.NO_SPAN
        assert tracing.traceparent() == "" and tracing.current_trace_id() == ""


def _record(message: str, **extra: object) -> logging.LogRecord:
    record = logging.makeLogRecord({"name": "inferpool.api", "levelname": "INFO", "msg": message, **extra})
    logs.TraceIdFilter().filter(record)
    return record


def test_json_lines_carry_the_fields_and_the_trace_id() -> None:
    token = tracing.bind_trace_id(TRACE)
    try:
        record = _record("served %s", method="/a.B/C", duration_ms=1.5, args=("x",))
    finally:
        tracing.unbind_trace_id(token)
    line = json.loads(logs.JsonFormatter().format(record))
    assert line["message"] == "served x" and line["level"] == "INFO" and line["logger"] == "inferpool.api"
    assert (line["trace_id"], line["method"], line["duration_ms"]) == (TRACE, "/a.B/C", 1.5)
    assert line["time"].endswith("Z")
    # Outside a request: no trace id field at all.
    assert "trace_id" not in json.loads(logs.JsonFormatter().format(_record("idle")))


def test_text_lines_end_with_the_trace_id_when_there_is_one() -> None:
    token = tracing.bind_trace_id(TRACE)
    try:
        text = logs.TextFormatter().format(_record("served"))
    finally:
        tracing.unbind_trace_id(token)
    assert text.endswith(f"inferpool.api: served trace_id={TRACE}")
    assert logs.TextFormatter().format(_record("idle")).endswith("inferpool.api: idle")


def test_configure_replaces_the_root_handlers() -> None:
    root = logging.getLogger()
    saved, level = list(root.handlers), root.level
    try:
        logs.configure(logs.JSON, "WARNING")
        assert len(root.handlers) == 1 and isinstance(root.handlers[0].formatter, logs.JsonFormatter)
        assert root.level == logging.WARNING
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
        for h in saved:
            root.addHandler(h)
        root.setLevel(level)


def test_log_format_is_validated() -> None:
    assert Settings.from_env({"INFERPOOL_LOG_FORMAT": "json"}).log_format == "json"
    with pytest.raises(SettingsError, match="INFERPOOL_LOG_FORMAT='xml': expected text or json"):
        Settings.from_env({"INFERPOOL_LOG_FORMAT": "xml"})
    assert Settings.from_env({}).access_log is False  # off by default (docs/decisions.md)
    assert Settings.from_env({"INFERPOOL_ACCESS_LOG": "true"}).access_log is True


def test_json_handler_writes_one_line_per_record() -> None:
    out = io.StringIO()
    handler = logs.handler(logs.JSON, out)
    handler.handle(_record("two\nlines"))
    assert out.getvalue().count("\n") == 1
    assert json.loads(out.getvalue())["message"] == "two\nlines"
