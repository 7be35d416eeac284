"""The one place where domain errors become gRPC status codes."""

from __future__ import annotations

import logging
from typing import NoReturn

import grpc

from inferpool import errors

log = logging.getLogger(__name__)

_CODES: dict[type[errors.InferpoolError], grpc.StatusCode] = {
    errors.InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    errors.ModelNotFound: grpc.StatusCode.NOT_FOUND,
    errors.JobNotFound: grpc.StatusCode.NOT_FOUND,
    errors.Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.BackendUnavailable: grpc.StatusCode.UNAVAILABLE,
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.ModelFailed: grpc.StatusCode.INTERNAL,
}


def code_for(exc: BaseException) -> grpc.StatusCode:
    for cls in type(exc).__mro__:
        code = _CODES.get(cls)
        if code is not None:
            return code
    return grpc.StatusCode.INTERNAL


async def abort(context: grpc.aio.ServicerContext, exc: Exception, rpc: str) -> NoReturn:
    code = code_for(exc)
    if isinstance(exc, errors.InferpoolError):
        await context.abort(code, str(exc))
    # Anything else is our bug: log it whole, tell the caller nothing internal.
    log.exception("unhandled error in %s", rpc, exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, "internal error")
    raise AssertionError("context.abort returned")  # it raises; this tells the type checker
