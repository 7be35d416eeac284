"""HTTP answers for errors: the status for a domain error comes from api/status.py (one
mapping for both fronts); the body is Triton's error JSON, `{"error": "..."}`."""

from __future__ import annotations

import logging

from starlette.responses import JSONResponse

from inferpool.api.status import details, http_status_for
from inferpool.errors import InferpoolError

log = logging.getLogger("inferpool.http")


class HttpError(Exception):
    """A refusal the transport decides (413, 408, 415, 401), not a domain error."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers or {}


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": details(message)}, status_code=status, headers=headers)


def response_for(exc: BaseException, route: str) -> JSONResponse:
    if isinstance(exc, HttpError):
        return error_response(exc.status, str(exc), exc.headers)
    if isinstance(exc, InferpoolError | NotImplementedError):
        return error_response(http_status_for(exc), str(exc) or type(exc).__name__)
    # Anything else is our bug: log it whole, tell the caller nothing internal.
    log.error("unhandled error in %s", route, exc_info=exc)
    return error_response(500, "internal error")
