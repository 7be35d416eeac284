"""The HTTP front's app and server: Starlette routes on uvicorn, in the API's own event
loop, beside grpc.aio, over the same DataPlane and JobPlane objects.

Starlette on uvicorn (httptools, uvloop): well kept, small, ASGI (so no hand-written
HTTP parsing), and it runs as a task of an existing asyncio loop, which a threaded
server could not do without a second copy of the data plane.

One pure-ASGI middleware does, for every request, what gRPC's interceptors do: bearer
auth (the same tokens; health and the page's static files exempt, as gRPC health is),
the caller's name for tenancy and cache scope, metrics by route template and status,
domain errors to Triton's error JSON (api/http/errors.py), the request's server span
(the child of the caller's when it sent W3C `traceparent`/`tracestate` headers) and
the access line (api/http/access.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Generator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import uvicorn
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Match, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from inferpool import tracing
from inferpool.api import auth, metrics
from inferpool.api.http.access import HttpAccessLog
from inferpool.api.http.errors import error_response, response_for
from inferpool.api.http.jobs_rest import JobsRest
from inferpool.api.http.kserve_rest import KServeRest
from inferpool.api.kserve import KServeServicer

if TYPE_CHECKING:
    from inferpool.api.server import ApiServer

log = logging.getLogger("inferpool.http")

STATIC = Path(__file__).parent / "static"
# Paths served without a token: probes cannot send one, and the page must load before a
# person can type theirs.
OPEN_PATHS = frozenset({"/", "/v2/health/live", "/v2/health/ready", "/favicon.ico"})
OPEN_PREFIXES = ("/static/",)
# The route label of a path no route serves (paths are the client's: not a label).
UNMATCHED = "unmatched"

Endpoint = Callable[[Request], Awaitable[Response]]


def _guard(endpoint: Endpoint, route: str) -> Endpoint:
    async def guarded(request: Request) -> Response:
        try:
            return await endpoint(request)
        except Exception as exc:
            return response_for(exc, route)

    guarded.__name__ = getattr(endpoint, "__name__", route)
    return guarded


class Front:
    """Auth, caller, metrics, server span and access log around the app (pure ASGI, so
    the caller's and the trace's context variables are set in the task that runs the
    endpoint)."""

    def __init__(
        self, app: ASGIApp, bearer: auth.BearerAuth | None, routes: dict[Any, str], access_log: bool
    ):
        self.app = app
        self.bearer = bearer
        self.routes = routes
        self.access = HttpAccessLog() if access_log else None
        self._children: dict[tuple[str, int], tuple[Any, Any]] = {}

    def _endpoint(self, scope: Scope) -> Any:
        """The endpoint a request refused before routing (401) would have reached."""
        for route in getattr(self.app, "routes", ()):
            match, child = route.matches(scope)
            if match == Match.FULL:
                return child.get("endpoint")
        return None

    def _record(self, route: str, status: int, t0: float) -> None:
        pair = self._children.get((route, status))
        if pair is None:
            code = str(status)
            pair = self._children[route, status] = (
                metrics.HTTP_REQUESTS.labels(route, code),
                metrics.HTTP_REQUEST_DURATION.labels(route, code),
            )
        pair[0].inc()
        # The request's trace id as an exemplar: a slow bucket links to a trace.
        pair[1].observe(time.perf_counter() - t0, tracing.exemplar())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        scope["inferpool.arrived"] = time.monotonic()
        status = 0
        name = ""
        done = False

        def finish() -> None:
            nonlocal done
            if done:
                return
            done = True
            route = self.routes.get(scope.get("endpoint") or self._endpoint(scope), "")
            tracing.set_http_status(span, scope["method"], route, status or 500)
            route = route or UNMATCHED
            self._record(route, status or 500, t0)
            if self.access is not None:
                self.access.write(scope, route, status or 500, t0, name)

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                # Counted before the last byte leaves: whoever saw the answer sees it counted.
                finish()
            await send(message)

        path: str = scope["path"]
        with tracing.http_server_span(scope["method"], path, scope["headers"]) as span:
            try:
                if self.bearer is not None and path not in OPEN_PATHS and not path.startswith(OPEN_PREFIXES):
                    headers = [(k.decode("latin-1"), v) for k, v in scope["headers"]]
                    found = self.bearer.identify(headers)
                    if found is None:
                        has = any(k == "authorization" for k, _ in headers)
                        message = (
                            "invalid bearer token"
                            if has
                            else "missing credentials: send the header 'Authorization: Bearer <token>'"
                        )
                        await error_response(401, message, {"WWW-Authenticate": "Bearer"})(
                            scope, receive, sending
                        )
                        return
                    name = found
                with auth.as_caller(name):
                    await self.app(scope, receive, sending)
            finally:
                finish()  # an answer cut off (client gone, or a bug) is counted too


async def _page(request: Request) -> Response:
    return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})


def build_app(server: ApiServer, bearer: auth.BearerAuth | None) -> ASGIApp:
    settings = server.settings
    rest = KServeRest(
        KServeServicer(server.plane, server.health), settings.max_message_bytes, settings.http_body_timeout_s
    )
    jobs = JobsRest(server.jobs, settings.max_message_bytes, settings.http_body_timeout_s)
    table: list[tuple[str, Endpoint, list[str]]] = [
        ("/v2/health/live", rest.live, ["GET"]),
        ("/v2/health/ready", rest.ready, ["GET"]),
        ("/v2", rest.server_metadata, ["GET"]),
        ("/v2/models/stats", rest.statistics, ["GET"]),
        ("/v2/models/{model}", rest.model_metadata, ["GET"]),
        ("/v2/models/{model}/versions/{version}", rest.model_metadata, ["GET"]),
        ("/v2/models/{model}/ready", rest.model_ready, ["GET"]),
        ("/v2/models/{model}/versions/{version}/ready", rest.model_ready, ["GET"]),
        ("/v2/models/{model}/config", rest.model_config, ["GET"]),
        ("/v2/models/{model}/versions/{version}/config", rest.model_config, ["GET"]),
        ("/v2/models/{model}/stats", rest.statistics, ["GET"]),
        ("/v2/models/{model}/versions/{version}/stats", rest.statistics, ["GET"]),
        ("/v2/models/{model}/infer", rest.infer, ["POST"]),
        ("/v2/models/{model}/versions/{version}/infer", rest.infer, ["POST"]),
        *jobs.routes(),
    ]
    routes: list[Any] = [Route("/", _page, methods=["GET"])]
    names: dict[Any, str] = {_page: "/"}
    for path, endpoint, methods in table:
        # Versioned twins share their unversioned route's label: one series per operation.
        label = path.replace("/versions/{version}", "")
        guarded = _guard(endpoint, label)
        names[guarded] = label
        routes.append(Route(path, guarded, methods=methods))
    static = StaticFiles(directory=STATIC)
    routes.append(Mount("/static", app=static, name="static"))
    middleware = []
    origins = [o.strip() for o in settings.http_cors_origins.split(",") if o.strip()]
    if origins:
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=origins,
                allow_methods=["GET", "POST", "DELETE"],
                allow_headers=[
                    "Authorization",
                    "Content-Type",
                    "Inference-Header-Content-Length",
                    "Inferpool-Timeout-Ms",
                ],
                expose_headers=["Inference-Header-Content-Length"],
            )
        )
    app = Starlette(
        routes=routes, middleware=middleware, exception_handlers={404: _not_found, 405: _not_allowed}
    )
    return Front(app, bearer, names, settings.access_log)


async def _not_found(request: Request, exc: Exception) -> Response:
    return error_response(404, f"no route for {request.method} {request.url.path[:128]}")


async def _not_allowed(request: Request, exc: Exception) -> Response:
    return error_response(405, f"{request.method} is not allowed on {request.url.path[:128]}")


def _protocol(header_timeout_s: float) -> type[HttpToolsProtocol]:
    class Protocol(HttpToolsProtocol):
        """uvicorn's httptools protocol, with a bound on how long a request head may take:
        uvicorn has none, and a client trickling its headers would hold the connection
        (and its file descriptor) for ever."""

        _head_timer: asyncio.TimerHandle | None = None

        def _arm(self) -> None:
            self._disarm()
            self._head_timer = self.loop.call_later(header_timeout_s, self._head_late)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_late(self) -> None:
            self._head_timer = None
            if self.transport is not None and not self.transport.is_closing():
                self.transport.close()

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._arm()

        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return Protocol


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        # Signals are the API process's (api/server.py): it stops this server itself.
        yield


class HttpFront:
    """Owns the HTTP server: start() binds and serves as a task, stop() drains it."""

    def __init__(self, server: ApiServer, interceptors: list[Any]) -> None:
        settings = server.settings
        self.settings = settings
        bearer = next((i for i in interceptors if isinstance(i, auth.BearerAuth)), None)
        self.app = build_app(server, bearer)
        tls: dict[str, Any] = {}
        if settings.tls_cert_file:
            tls = {"ssl_certfile": settings.tls_cert_file, "ssl_keyfile": settings.tls_key_file}
            if settings.tls_client_ca_file:
                tls |= {"ssl_ca_certs": settings.tls_client_ca_file, "ssl_cert_reqs": ssl.CERT_REQUIRED}
        self.config = uvicorn.Config(
            self.app,
            http=_protocol(settings.http_header_timeout_s),
            loop="none",
            lifespan="off",
            log_config=None,
            access_log=False,
            server_header=False,
            limit_concurrency=settings.http_max_connections,
            timeout_keep_alive=int(max(1, settings.keepalive_time_s)),
            timeout_graceful_shutdown=5,
            **tls,
        )
        self.server = _Server(self.config)
        self.port = 0
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> int:
        family = socket.AF_INET6 if ":" in self.settings.http_host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.settings.http_host, self.settings.http_port))
        except OSError as exc:
            sock.close()
            raise OSError(
                f"could not bind HTTP {self.settings.http_host}:{self.settings.http_port}: {exc}"
            ) from None
        sock.listen(2048)
        sock.setblocking(False)
        self.port = sock.getsockname()[1]
        self._task = asyncio.create_task(self.server.serve(sockets=[sock]), name="http")
        # uvicorn says it has started only by a flag; its start-up is a few loop turns.
        async with asyncio.timeout(10):
            while not self.server.started:
                if self._task.done():
                    self._task.result()
                    raise OSError("the HTTP server stopped at start-up")
                await asyncio.sleep(0.01)
        log.info("serving HTTP on %s:%d", self.settings.http_host, self.port)
        return self.port

    async def stop(self) -> None:
        if self._task is None:
            return
        self.server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(self._task, 10)
