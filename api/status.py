"""The one place where domain errors become gRPC status codes, for every RPC kind.

`StatusInterceptor` wraps each registered method's handler once: its behaviour runs
inside a wrapper that maps a raised domain error (inferpool/errors.py) to its code,
counts and times the call by its final code (api/metrics.py), and its request
deserializer is a tolerant one, so undecodable bytes become INVALID_ARGUMENT instead
of grpc's UNKNOWN/INTERNAL with a traceback per call. Servicers stay thin: they raise
domain errors and never touch a status code.

Whatever a client can trigger at will (undecodable bytes, a method this server
does not implement) is logged as one short line, at most once per LOG_INTERVAL_S
per method and kind, with the count of the lines suppressed since.

Each counted call also runs inside its server span (inferpool/tracing.py: the
caller's trace context from its metadata is honoured) and ends in one access-log
line on `inferpool.access`: method, code, duration, peer, request id and trace id,
never metadata values or payloads. Successful calls are logged each; failed ones at
most once per LOG_INTERVAL_S per method and code, the next line saying how many
were left out, so a flood of bad calls cannot flood the log.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any, NoReturn

import grpc

from inferpool import errors, tracing
from inferpool.api import handlers, metrics

log = logging.getLogger(__name__)
access_log = logging.getLogger("inferpool.access")

_CODES: dict[type[BaseException], grpc.StatusCode] = {
    errors.InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    errors.ModelNotFound: grpc.StatusCode.NOT_FOUND,
    errors.JobNotFound: grpc.StatusCode.NOT_FOUND,
    errors.Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.BackendUnavailable: grpc.StatusCode.UNAVAILABLE,
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.ModelFailed: grpc.StatusCode.INTERNAL,
    NotImplementedError: grpc.StatusCode.UNIMPLEMENTED,
}

# The HTTP front's status for each gRPC code (api/http/), so both fronts answer a domain
# error alike: Triton's HTTP codes (400 bad input, 404 unknown, 503 unavailable or
# overloaded, 500 the model failed), and 504 for a spent deadline (Triton's 503 would
# not tell a client whether to retry with a longer one).
HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 503,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAUTHENTICATED: 401,
}


def http_status_for(exc: BaseException) -> int:
    return HTTP_STATUS.get(code_for(exc), 500)


# Status details travel in a trailer, and grpc refuses metadata over 8 KiB by default
# (the whole call then fails RESOURCE_EXHAUSTED): a message that quotes client text is
# cut well below that, whatever the raise site did.
MAX_DETAILS_CHARS = 256
# How often one method may log the same kind of client mistake.
LOG_INTERVAL_S = 10.0
# Client-chosen text in an access line (request id, peer) is cut to this.
ACCESS_FIELD_CHARS = 64


def code_for(exc: BaseException) -> grpc.StatusCode:
    for cls in type(exc).__mro__:
        code = _CODES.get(cls)
        if code is not None:
            return code
    return grpc.StatusCode.INTERNAL


def details(message: str, limit: int = MAX_DETAILS_CHARS) -> str:
    """`message` cut to `limit` characters, saying so when it was cut."""
    if len(message) <= limit:
        return message
    suffix = f"... ({len(message)} chars)"
    return message[: max(0, limit - len(suffix))] + suffix


async def abort(context: grpc.aio.ServicerContext, exc: BaseException, rpc: str) -> NoReturn:
    code = code_for(exc)
    if isinstance(exc, errors.InferpoolError):
        await context.abort(code, details(str(exc)))
    # Anything else is our bug: log it whole, tell the caller nothing internal.
    log.exception("unhandled error in %s", rpc, exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, "internal error")
    raise AssertionError("context.abort returned")  # it raises; this tells the type checker


class RateLimiter:
    """At most one event per key per `interval_s`; the ones in between are counted."""

    def __init__(self, interval_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval_s = interval_s
        self.clock = clock
        self._last: dict[tuple[str, str], float] = {}
        self._suppressed: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()

    def allow(self, key: tuple[str, str]) -> int | None:
        """None to stay quiet, else how many were suppressed since the last allowed one."""
        now = self.clock()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self.interval_s:
                self._suppressed[key] = self._suppressed.get(key, 0) + 1
                return None
            self._last[key] = now
            return self._suppressed.pop(key, 0)


class _Method:
    """One registered method: its labels, and the wrapped behaviour's bookkeeping."""

    def __init__(self, interceptor: StatusInterceptor, method: str, counted: bool) -> None:
        self.interceptor = interceptor
        self.method = method
        self.rpc = method.rsplit("/", 1)[-1]
        self.counted = counted
        # The labelled children by code, looked up once: labels() costs as much as the rest.
        self._children: dict[str, tuple[Any, Any]] = {}

    def record(
        self, code: str, t0: float, context: grpc.aio.ServicerContext, request: Any, span: Any
    ) -> None:
        if not self.counted:
            return
        tracing.set_rpc_code(span, code)
        if self.interceptor.access_log:
            self.interceptor.access(self.method, code, t0, context, request)
        pair = self._children.get(code)
        if pair is None:
            pair = self._children[code] = (
                metrics.REQUESTS.labels(self.rpc, code),
                metrics.REQUEST_DURATION.labels(self.rpc, code),
            )
        pair[0].inc()
        pair[1].observe(time.perf_counter() - t0, tracing.exemplar())

    def undecodable(self, context: grpc.aio.ServicerContext, size: int) -> errors.Undecodable:
        self.interceptor.note(self.method, "undecodable", f"{size}-byte message", context)
        return errors.Undecodable(f"the request message could not be decoded ({size} bytes)")

    async def fail(self, context: grpc.aio.ServicerContext, exc: Exception) -> NoReturn:
        if isinstance(exc, NotImplementedError):
            self.interceptor.note(self.method, "unimplemented", "", context)
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{self.rpc} is not implemented here")
        await abort(context, exc, self.rpc)

    def requests(self, context: grpc.aio.ServicerContext, source: AsyncIterator[Any]) -> AsyncIterator[Any]:
        async def checked() -> AsyncIterator[Any]:
            async for message in source:
                if isinstance(message, handlers.Undecodable):
                    raise self.undecodable(context, message.size)
                yield message

        return checked()

    def span(self, context: grpc.aio.ServicerContext) -> Any:
        """The call's server span (a no-op for uncounted methods, and with tracing off
        unless the caller sent a trace context)."""
        if not self.counted:
            return tracing.NO_SPAN
        return tracing.server_span(self.method, context.invocation_metadata())

    def status(self, context: grpc.aio.ServicerContext) -> str:
        code = context.code()
        return code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"

    def wrap(self, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        inner = handlers.behaviour_of(handler)
        # grpc.aio calls a plain function on its own loop; the generated servicer base
        # class's stubs for methods a servicer leaves out are such functions.
        is_async = inspect.iscoroutinefunction(inner) or inspect.isasyncgenfunction(inner)
        streaming_in = handler.request_streaming

        def arguments(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if streaming_in:
                return self.requests(context, request)
            if isinstance(request, handlers.Undecodable):
                raise self.undecodable(context, request.size)
            return request

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            t0 = time.perf_counter()
            code = "OK"
            with self.span(context) as span:
                try:
                    try:
                        if is_async:
                            return await inner(arguments(request, context), context)
                        return inner(arguments(request, context), context)
                    except grpc.aio.AbortError:
                        raise  # the behaviour aborted the call itself
                    except Exception as exc:
                        await self.fail(context, exc)
                except asyncio.CancelledError:
                    code = "CANCELLED"
                    raise
                except BaseException:
                    code = self.status(context)
                    raise
                finally:
                    self.record(code, t0, context, request, span)

        async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            t0 = time.perf_counter()
            code = "OK"
            with self.span(context) as span:
                try:
                    try:
                        responses = inner(arguments(request, context), context)
                        if is_async:
                            async for response in responses:
                                yield response
                        else:
                            for response in responses:
                                yield response
                    except grpc.aio.AbortError:
                        raise
                    except Exception as exc:
                        await self.fail(context, exc)
                except (asyncio.CancelledError, GeneratorExit):
                    code = "CANCELLED"
                    raise
                except BaseException:
                    code = self.status(context)
                    raise
                finally:
                    self.record(code, t0, context, request, span)

        # A response stream is an (async) generator, or a coroutine that writes its
        # responses with context.write (as grpc's health Watch does) and returns None.
        streams = handler.response_streaming and not inspect.iscoroutinefunction(inner)
        return handlers.with_behaviour(
            handler, stream if streams else unary, handlers.tolerant(handler.request_deserializer)
        )


def access_field(text: str) -> str:
    """Client text for a log line: printable ASCII only (no forged lines), bounded."""
    text = text[:ACCESS_FIELD_CHARS] + ("..." if len(text) > ACCESS_FIELD_CHARS else "")
    return text if text.isascii() and text.isprintable() else ascii(text)[1:-1]


def write_access_line(fmt: str, args: tuple[Any, ...], fields: dict[str, Any]) -> None:
    """One access line on `inferpool.access`, for either front. The record is built here
    rather than by access_log.info(), which would walk the stack for the caller's file
    and line: a third of the line's cost, for a location that is always this one."""
    access_log.handle(
        access_log.makeRecord(access_log.name, logging.INFO, __file__, 0, fmt, args, None, extra=fields)
    )


def _request_id(context: grpc.aio.ServicerContext, request: Any) -> str:
    """The caller's id for the call: its x-request-id metadata, else the request
    message's own id field (Classify's request_id, KServe's id), else ""."""
    for key, value in context.invocation_metadata() or ():
        if key == "x-request-id":
            return value if isinstance(value, str) else ""
    for name in ("request_id", "id"):
        value = getattr(request, name, None)
        if isinstance(value, str):
            return value
    return ""


class StatusInterceptor(grpc.aio.ServerInterceptor):
    """Maps domain errors to status codes and records per-RPC metrics for every method
    of `counted_services` (full names), whatever its kind; every other registered
    method (health, reflection) gets the tolerant deserializer and error mapping but no
    series of its own. Unknown methods are left to grpc, which answers UNIMPLEMENTED
    without a handler, and are never counted (their names are the client's choice)."""

    def __init__(
        self,
        counted_services: Iterable[str] = (),
        log_interval_s: float | None = None,
        access_log: bool = True,
    ) -> None:
        self.counted = tuple(f"/{service}/" for service in counted_services)
        self.limiter = RateLimiter(LOG_INTERVAL_S if log_interval_s is None else log_interval_s)
        self.access_log = access_log
        # method -> (the handler grpc resolved, its wrapped twin): handlers are
        # registered once, so each is wrapped once, not on every call.
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def note(self, method: str, kind: str, what: str, context: grpc.aio.ServicerContext) -> None:
        suppressed = self.limiter.allow((method, kind))
        if suppressed is None:
            return
        log.warning(
            "%s %s%s from %s%s",
            kind,
            method,
            f" ({what})" if what else "",
            details(context.peer() or "?", 64),
            f"; {suppressed} more since the last line" if suppressed else "",
        )

    def access(
        self, method: str, code: str, t0: float, context: grpc.aio.ServicerContext, request: Any
    ) -> None:
        """The call's access line; failed calls rate-limited per method and code."""
        if not access_log.isEnabledFor(logging.INFO):
            return
        suppressed = 0
        if code != "OK":
            allowed = self.limiter.allow((method, "access:" + code))
            if allowed is None:
                return
            suppressed = allowed
        duration_ms = (time.perf_counter() - t0) * 1000
        peer = access_field(context.peer() or "")
        request_id = access_field(_request_id(context, request))
        fields = {
            "method": method,
            "code": code,
            "duration_ms": round(duration_ms, 3),
            "peer": peer,
            "request_id": request_id,
            "suppressed": suppressed,
        }
        write_access_line(
            "%s %s %.1fms peer=%s request_id=%s%s",
            (
                method,
                code,
                duration_ms,
                peer,
                request_id,
                f" ({suppressed} failed calls like it not logged)" if suppressed else "",
            ),
            fields,
        )

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method: str = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = _Method(self, method, method.startswith(self.counted)).wrap(handler)
        self._wrapped[method] = (handler, wrapped)
        return wrapped
