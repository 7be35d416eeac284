"""Log output of the API and the worker: plain text or one JSON object per line, every
line tagged with the trace id of the request it concerns (inferpool.tracing).

`configure(fmt)` installs one handler on the root logger. The worker calls it before
Celery starts, so its start-up lines (device, threads, each model's warm-up) are
written, and Celery is told to keep it (`keep_for_celery`) instead of replacing it.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from inferpool import tracing

TEXT = "text"
JSON = "json"
FORMATS = (TEXT, JSON)
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# LogRecord attributes every record has: whatever else a record carries came from
# `extra=` and goes into the JSON object as a field of its own.
_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "trace_id"}


class TraceIdFilter(logging.Filter):
    """Sets `record.trace_id` from the request this thread or task runs for."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "trace_id", ""):
            record.trace_id = tracing.current_trace_id()
        return True


class TextFormatter(logging.Formatter):
    """The usual line, with ` trace_id=...` appended when the line concerns a request."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        trace_id = getattr(record, "trace_id", "")
        return f"{line} trace_id={trace_id}" if trace_id else line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, trace_id when known, the
    record's `extra` fields, and the traceback when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        trace_id = getattr(record, "trace_id", "")
        if trace_id:
            out["trace_id"] = trace_id
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = (
                    value if isinstance(value, str | int | float | bool) or value is None else str(value)
                )
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def formatter(fmt: str) -> logging.Formatter:
    return JsonFormatter() if fmt == JSON else TextFormatter()


def handler(fmt: str, stream: Any = None) -> logging.Handler:
    h = logging.StreamHandler(sys.stderr if stream is None else stream)
    h.setFormatter(formatter(fmt))
    h.addFilter(TraceIdFilter())
    return h


def configure(fmt: str = TEXT, level: int | str = logging.INFO) -> None:
    """The process's log output: one handler on the root logger (replacing any)."""
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler(fmt))
    root.setLevel(level)
