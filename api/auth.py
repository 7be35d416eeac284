"""Optional bearer-token authentication for the gRPC server.

Tokens are named (`name:token`), from a file (one per line, `#` comments) and/or
the INFERPOOL_AUTH_TOKENS variable (comma-separated). The name is the caller's
identity: bulk jobs are scoped to it (see `caller`), so rotating a token under the
same name keeps its jobs visible, and two names never see each other's jobs.

The interceptor rejects a call with UNAUTHENTICATED before any handler runs, so an
unauthenticated call never validates, reads the cache or queues anything. Only
`grpc.health.v1.Health` is exempt: load balancers and Kubernetes probes cannot send
a token, and health says nothing about the data. Reflection is *not* exempt: it is
only a convenience for tools such as grpcurl, which can send the header
(`grpcurl -H 'authorization: Bearer ...'`), and an unauthenticated peer has no
use for the API's schema.

Tokens are never logged and never appear in error messages; configuration errors
name the source and line instead.
"""

from __future__ import annotations

import contextlib
import contextvars
import hmac
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import grpc

from inferpool.api.handlers import behaviour_of, with_behaviour
from inferpool.settings import Settings, SettingsError

log = logging.getLogger(__name__)

HEALTH_PREFIX = "/grpc.health.v1.Health/"
MIN_TOKEN_CHARS = 16  # a short shared secret is guessable; generate with `openssl rand -hex 32`

# The authenticated name of the call being handled. Set by the interceptor's wrapper
# around the handler itself (not in intercept_service), so it is in the handler's
# own context whatever task grpc runs it in.
_CALLER: contextvars.ContextVar[str] = contextvars.ContextVar("inferpool_caller", default="")


def caller(context: grpc.aio.ServicerContext | None = None) -> str:
    """The name of the token the current call authenticated with; "" when auth is off.

    `context` is accepted so call sites read naturally (and a future transport could
    use it); the value comes from the interceptor's per-call context variable."""
    return _CALLER.get()


@contextlib.contextmanager
def as_caller(name: str) -> Iterator[None]:
    """Runs the block as `name`'s call, for fronts other than gRPC's interceptor (api/http/)."""
    reset = _CALLER.set(name)
    try:
        yield
    finally:
        _CALLER.reset(reset)


def parse_tokens(text: str, source: str, separator: str = "\n") -> dict[bytes, str]:
    """`name:token` entries -> {token: name}. Raises SettingsError naming the entry
    (by position, never by value) when one is malformed or duplicated."""
    tokens: dict[bytes, str] = {}
    names: set[str] = set()
    for number, raw in enumerate(text.split(separator), start=1):
        entry = raw.split("#", 1)[0].strip() if separator == "\n" else raw.strip()
        if not entry:
            continue
        name, sep, token = (part.strip() for part in entry.partition(":"))
        where = f"{source} entry {number}"
        if not sep or not name or not token:
            raise SettingsError(f"{where}: expected name:token")
        if len(token) < MIN_TOKEN_CHARS or any(c.isspace() for c in token):
            raise SettingsError(f"{where} ({name}): token must be >= {MIN_TOKEN_CHARS} non-space characters")
        if name in names:
            raise SettingsError(f"{where}: name {name!r} is used twice")
        if token.encode() in tokens:
            raise SettingsError(f"{where} ({name}): same token as {tokens[token.encode()]!r}")
        names.add(name)
        tokens[token.encode()] = name
    return tokens


def load_tokens(settings: Settings) -> dict[bytes, str]:
    """Every configured token, {token: name}; empty means auth is off."""
    tokens: dict[bytes, str] = {}
    if settings.auth_tokens_file:
        path = Path(settings.auth_tokens_file)
        try:
            text = path.read_text()
        except OSError as exc:
            raise SettingsError(f"INFERPOOL_AUTH_TOKENS_FILE: cannot read {path}: {exc.strerror}") from None
        tokens.update(parse_tokens(text, str(path)))
    if settings.auth_tokens:
        for token, name in parse_tokens(settings.auth_tokens, "INFERPOOL_AUTH_TOKENS", ",").items():
            if name in tokens.values() or token in tokens:
                raise SettingsError(f"INFERPOOL_AUTH_TOKENS ({name}): name or token also in the tokens file")
            tokens[token] = name
    return tokens


def _deny(handler: grpc.RpcMethodHandler | None, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as the real one that fails the call at once (a
    streaming upload is refused without reading its messages)."""

    async def abort(context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> None:
        await abort(context)

    async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        await abort(context)
        yield  # pragma: no cover (abort raises); makes this an async generator

    if handler is None:  # unknown method: still say nothing to an unauthenticated peer
        return grpc.unary_unary_rpc_method_handler(unary)
    return with_behaviour(handler, stream if handler.response_streaming else unary)


def _as(handler: grpc.RpcMethodHandler, name: str) -> grpc.RpcMethodHandler:
    """The same handler with its behaviour run under the caller's name."""
    inner = behaviour_of(handler)

    if inspect.isasyncgenfunction(inner):

        async def behaviour_gen(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            reset = _CALLER.set(name)
            try:
                async for item in inner(request, context):
                    yield item
            finally:
                _CALLER.reset(reset)

        behaviour: Callable[..., Any] = behaviour_gen
    elif inspect.iscoroutinefunction(inner):

        async def behaviour_async(request: Any, context: grpc.aio.ServicerContext) -> Any:
            reset = _CALLER.set(name)
            try:
                return await inner(request, context)
            finally:
                _CALLER.reset(reset)

        behaviour = behaviour_async
    else:  # a plain function (run in grpc's executor): set it in that thread's call

        def behaviour_sync(request: Any, context: grpc.aio.ServicerContext) -> Any:
            reset = _CALLER.set(name)
            try:
                return inner(request, context)
            finally:
                _CALLER.reset(reset)

        behaviour = behaviour_sync
    return with_behaviour(handler, behaviour)


class BearerAuth(grpc.aio.ServerInterceptor):
    """Checks `authorization: Bearer <token>` on every call except health checks."""

    def __init__(self, tokens: dict[bytes, str]) -> None:
        if not tokens:
            raise ValueError("BearerAuth needs at least one token")
        # A list, so the comparison loop visits every token in the same order each time.
        self._tokens = list(tokens.items())
        self.rejected = 0
        log.info("bearer-token auth on: %d token(s) (%s)", len(tokens), ", ".join(sorted(tokens.values())))

    def identify(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
        """The token's name, or None. Compares against every token, without stopping at
        a match, so the time taken says nothing about which token (or prefix) matched."""
        header = None
        for key, value in metadata or ():
            if key == "authorization":
                header = value.encode() if isinstance(value, str) else value
                break
        if header is None:
            return None
        scheme, _, presented = header.partition(b" ")
        if scheme.lower() != b"bearer":
            return None
        presented = presented.strip()
        found: str | None = None
        for token, name in self._tokens:
            if hmac.compare_digest(presented, token) and found is None:
                found = name
        return found

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method: str = handler_call_details.method
        handler = await continuation(handler_call_details)
        if method.startswith(HEALTH_PREFIX):
            return handler
        metadata = handler_call_details.invocation_metadata
        name = self.identify(metadata)
        if name is None:
            self.rejected += 1
            has_header = any(key == "authorization" for key, _ in metadata or ())
            message = (
                "invalid bearer token"
                if has_header
                else "missing credentials: send metadata 'authorization: Bearer <token>'"
            )
            log.debug("rejected %s: %s", method, message)  # never the presented value
            return _deny(handler, message)
        if handler is None:
            return handler
        return _as(handler, name)


def interceptors(settings: Settings) -> list[grpc.aio.ServerInterceptor]:
    """The server interceptors the settings ask for: [BearerAuth] when tokens are
    configured, else none. Raises SettingsError for a bad tokens file or variable."""
    tokens = load_tokens(settings)
    return [BearerAuth(tokens)] if tokens else []


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS credentials for the gRPC port when a certificate and key are configured
    (mutual TLS when a client CA is too); None means plain text."""
    if not (settings.tls_cert_file or settings.tls_key_file):
        if settings.tls_client_ca_file:
            raise SettingsError("INFERPOOL_TLS_CLIENT_CA_FILE needs INFERPOOL_TLS_CERT_FILE and _KEY_FILE")
        return None
    if not (settings.tls_cert_file and settings.tls_key_file):
        raise SettingsError("INFERPOOL_TLS_CERT_FILE and INFERPOOL_TLS_KEY_FILE must be set together")

    def read(var: str, path: str) -> bytes:
        try:
            return Path(path).read_bytes()
        except OSError as exc:
            raise SettingsError(f"{var}: cannot read {path}: {exc.strerror}") from None

    cert = read("INFERPOOL_TLS_CERT_FILE", settings.tls_cert_file)
    key = read("INFERPOOL_TLS_KEY_FILE", settings.tls_key_file)
    client_ca = (
        read("INFERPOOL_TLS_CLIENT_CA_FILE", settings.tls_client_ca_file)
        if settings.tls_client_ca_file
        else None
    )
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )
