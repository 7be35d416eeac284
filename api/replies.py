"""Receives worker replies for this API process and wakes the waiting requests.

Each API process has one reply list in Redis. A single task pops replies from it
in bulk (BLMPOP) and resolves the future registered under the request id, so
waiting costs a dict entry, not a thread or a connection per request.
"""

from __future__ import annotations

import asyncio
import logging

import redis.asyncio as aioredis
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

from inferpool.broker import Reconnect
from inferpool.errors import BackendUnavailable
from inferpool.v1 import envelope_pb2

log = logging.getLogger(__name__)

POP_COUNT = 256
BLOCK_S = 1.0


def _listening_client(client: aioredis.Redis) -> aioredis.Redis:
    """A client of the listener's own, connected as `client` is (address, credentials,
    TLS), without redis-py's retries: they wait up to a second between attempts, and a
    reply list nobody reads for that second after Redis is back holds every answer."""
    shared = client.connection_pool
    kwargs = {**shared.connection_kwargs, "retry": Retry(NoBackoff(), 0)}
    pool = type(shared)(connection_class=shared.connection_class, max_connections=2, **kwargs)
    return aioredis.Redis(connection_pool=pool)


class ReplyListener:
    def __init__(self, client: aioredis.Redis, key: str, reconnect_max_s: float = 0.25) -> None:
        self.client = _listening_client(client)
        self.key = key
        self.reconnect_max_s = reconnect_max_s
        self._waiting: dict[str, asyncio.Future[envelope_pb2.Reply]] = {}
        self.unmatched = 0

    def expect(self, request_id: str) -> asyncio.Future[envelope_pb2.Reply]:
        """Register before publishing, so a fast reply can never arrive unmatched."""
        fut: asyncio.Future[envelope_pb2.Reply] = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = fut
        return fut

    def forget(self, request_id: str) -> None:
        self._waiting.pop(request_id, None)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def _dispatch(self, raw: bytes) -> None:
        reply = envelope_pb2.Reply()
        reply.ParseFromString(raw)
        fut = self._waiting.pop(reply.request_id, None)
        if fut is None or fut.done():
            # The caller gave up (deadline) before the reply came.
            self.unmatched += 1
            return
        fut.set_result(reply)

    async def run(self) -> None:
        reconnect = Reconnect("reply listener", self.reconnect_max_s, log)
        try:
            while True:
                try:
                    popped = await self.client.blmpop(BLOCK_S, 1, self.key, direction="LEFT", count=POP_COUNT)
                    reconnect.reset()
                except (RedisError, OSError) as exc:
                    self._fail_all(BackendUnavailable("lost the connection to the reply store"))
                    await asyncio.sleep(reconnect.lost(exc))
                    continue
                if popped:
                    values: list[bytes] = popped[1]  # type: ignore[assignment]  # [key, [value, ...]]
                    for raw in values:
                        try:
                            self._dispatch(raw)
                        except Exception:
                            log.exception("undecodable reply on %s", self.key)
        finally:
            await self.client.aclose(close_connection_pool=True)

    def _fail_all(self, exc: Exception) -> None:
        waiting, self._waiting = self._waiting, {}
        for fut in waiting.values():
            if not fut.done():
                fut.set_exception(exc)
