"""Request bodies read with bounds: on size (413 before or while reading) and on the
time between chunks (408), so a client lying about its length or stalling mid-body
holds nothing past the bound."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from starlette.requests import ClientDisconnect, Request

from inferpool.api.http.errors import HttpError


def declared_length(request: Request, limit: int) -> int | None:
    raw = request.headers.get("content-length")
    if raw is None:
        return None
    if not raw.isdigit() or len(raw) > 18:
        raise HttpError(400, "Content-Length must be a non-negative integer")
    length = int(raw)
    if length > limit:
        raise HttpError(413, f"the body is {length} bytes; this endpoint takes at most {limit}")
    return length


async def chunks(request: Request, idle_s: float) -> AsyncIterator[bytes]:
    """The body's chunks as they arrive; HttpError 408 when none comes for `idle_s`."""
    stream = request.stream()
    while True:
        try:
            chunk = await asyncio.wait_for(anext(stream, None), idle_s)
        except TimeoutError:
            raise HttpError(408, f"the body sent nothing for {idle_s:g} s") from None
        except ClientDisconnect:
            raise HttpError(400, "the client closed the connection before the body ended") from None
        if chunk is None:
            return
        if chunk:
            yield chunk


async def read_body(request: Request, limit: int, idle_s: float) -> bytes:
    declared_length(request, limit)
    parts: list[bytes] = []
    total = 0
    async for chunk in chunks(request, idle_s):
        total += len(chunk)
        if total > limit:
            raise HttpError(413, f"the body is over {limit} bytes, this endpoint's limit")
        parts.append(chunk)
    return b"".join(parts)
