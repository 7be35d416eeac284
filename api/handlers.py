"""Rewrapping a registered gRPC method handler, whatever its kind.

grpc gives each kind of method (unary or streaming on either side) its own handler
factory and behaviour attribute; a server interceptor that runs its own code around a
method's behaviour (api/status.py, api/auth.py) needs the same four-way choice, so it
lives here once. The tolerant deserializer hands on `Undecodable` instead of raising,
so a caller's bad bytes become a domain error the interceptor maps, not grpc's
UNKNOWN with a traceback per call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc


class Undecodable:
    """What the tolerant deserializer hands on instead of a message it could not parse."""

    __slots__ = ("size",)

    def __init__(self, size: int) -> None:
        self.size = size


# (request_streaming, response_streaming) -> handler factory and the handler's attribute
_KINDS: dict[tuple[bool, bool], tuple[Callable[..., grpc.RpcMethodHandler], str]] = {
    (False, False): (grpc.unary_unary_rpc_method_handler, "unary_unary"),
    (False, True): (grpc.unary_stream_rpc_method_handler, "unary_stream"),
    (True, False): (grpc.stream_unary_rpc_method_handler, "stream_unary"),
    (True, True): (grpc.stream_stream_rpc_method_handler, "stream_stream"),
}


def behaviour_of(handler: grpc.RpcMethodHandler) -> Callable[..., Any]:
    """The function a handler runs, whatever its kind."""
    return getattr(handler, _KINDS[handler.request_streaming, handler.response_streaming][1])


def with_behaviour(
    handler: grpc.RpcMethodHandler,
    behaviour: Callable[..., Any],
    request_deserializer: Callable[[bytes], Any] | None = None,
) -> grpc.RpcMethodHandler:
    """A handler of the same kind and serializers as `handler` that runs `behaviour`."""
    factory = _KINDS[handler.request_streaming, handler.response_streaming][0]
    return factory(
        behaviour,
        request_deserializer=request_deserializer or handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def tolerant(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserialize is None:
        return None

    def load(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception:
            return Undecodable(len(data))

    return load
