"""Cross-replica single-flight locks, with their Redis round trips shared.

Each miss takes a short lock on its cache key (SET NX PX) and frees it when its
answer is in (DEL). One command each would cost two Redis round trips per miss on
the event loop, as much as the rest of the API's work for it; instead the locks
asked for in one loop iteration go out as one pipeline, and releases as one DEL.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

log = logging.getLogger(__name__)


class FlightLocks:
    def __init__(self, client: aioredis.Redis, owner: str) -> None:
        self.client = client
        self.owner = owner  # the lock's value: which replica computes (for operators)
        self._acquiring: list[tuple[str, int, asyncio.Future[bool]]] = []
        self._releasing: list[str] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def acquire(self, key: str, ttl_ms: int) -> bool:
        """True if this replica now holds `key` for `ttl_ms` (OSError/RedisError when
        Redis cannot say)."""
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        if not self._acquiring:
            self._spawn(self._flush_acquire())
        self._acquiring.append((key, max(1, ttl_ms), done))
        return await done

    def release(self, key: str) -> None:
        """Frees `key` soon, without waiting: a lock left behind expires by itself."""
        if not self._releasing:
            self._spawn(self._flush_release())
        self._releasing.append(key)

    async def held(self, key: str) -> bool:
        return bool(await self.client.exists(key))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        # The loop keeps only weak references to tasks.
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _flush_acquire(self) -> None:
        # Runs once the current loop iteration is over: every acquire() it made joins.
        await asyncio.sleep(0)
        batch, self._acquiring = self._acquiring, []
        try:
            pipe = self.client.pipeline(transaction=False)
            for key, ttl_ms, _ in batch:
                pipe.set(key, self.owner, nx=True, px=ttl_ms)
            results = await pipe.execute()
        except (OSError, RedisError) as exc:
            for _, _, done in batch:
                if not done.done():
                    done.set_exception(exc)
            return
        for (key, _, done), won in zip(batch, results, strict=True):
            if not done.done():
                done.set_result(bool(won))
            elif won:
                self.release(key)  # its caller left meanwhile: free it for the others

    async def _flush_release(self) -> None:
        await asyncio.sleep(0)
        keys, self._releasing = self._releasing, []
        try:
            await self.client.delete(*keys)
        except (OSError, RedisError) as exc:
            log.debug("could not free %d flight locks (they expire by themselves): %r", len(keys), exc)
