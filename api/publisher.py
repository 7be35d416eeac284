"""Publishes cache misses to the model queues, coalescing concurrent misses.

Misses for the same model version that arrive while a publish is in flight (or
within `coalesce_window_ms`) leave as one envelope, one broker message: group
commit. At low load a miss is published at once; under load the per-message
broker cost is shared by up to `max_batch_size` requests. kombu's publish is
blocking, so it runs on one dedicated thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime

from celery import Celery

from inferpool import codec
from inferpool.codec import ENVELOPE_VERSION, SERIALIZER
from inferpool.errors import BackendUnavailable
from inferpool.names import queue_name, task_name
from inferpool.repository import ModelConfig
from inferpool.v1 import envelope_pb2

log = logging.getLogger(__name__)


@dataclass
class _Group:
    cfg: ModelConfig
    pending: list[tuple[envelope_pb2.EnvelopeItem, asyncio.Future[None]]] = field(default_factory=list)
    flushing: bool = False


class Publisher:
    def __init__(self, celery: Celery, coalesce_window_ms: float = 0.0) -> None:
        self.celery = celery
        self.window_s = coalesce_window_ms / 1000
        self._groups: dict[tuple[str, int], _Group] = {}
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="publish")
        self._flushers: set[asyncio.Task[None]] = set()
        self.messages = 0
        self.items = 0

    async def publish(self, cfg: ModelConfig, item: envelope_pb2.EnvelopeItem) -> None:
        """Returns once the item is on the broker; raises BackendUnavailable if it cannot be."""
        loop = asyncio.get_running_loop()
        group = self._groups.get((cfg.name, cfg.version))
        if group is None:
            group = self._groups[cfg.name, cfg.version] = _Group(cfg)
        done: asyncio.Future[None] = loop.create_future()
        group.pending.append((item, done))
        if not group.flushing:
            group.flushing = True
            task = loop.create_task(self._flush(group))
            # The loop keeps only weak references to tasks.
            self._flushers.add(task)
            task.add_done_callback(self._flushers.discard)
        await done

    async def _flush(self, group: _Group) -> None:
        loop = asyncio.get_running_loop()
        try:
            # Let requests that arrived in the same loop iteration (or window) join.
            await asyncio.sleep(self.window_s)
            while group.pending:
                take = group.pending[: group.cfg.max_batch_size]
                del group.pending[: len(take)]
                envelope = envelope_pb2.Envelope(
                    envelope_version=ENVELOPE_VERSION,
                    model=group.cfg.name,
                    model_version=group.cfg.version,
                    items=[item for item, _ in take],
                    enqueued_unix_ns=time.time_ns(),
                )
                latest_ns = max(item.deadline_unix_ns for item, _ in take)
                try:
                    await loop.run_in_executor(
                        self._executor, self._send, group.cfg.name, codec.encode(envelope), latest_ns
                    )
                except Exception as exc:
                    log.warning("publish to %s failed: %r", queue_name(group.cfg.name), exc)
                    error = BackendUnavailable("the request queue is unavailable")
                    for _, done in take:
                        if not done.done():
                            done.set_exception(error)
                else:
                    self.messages += 1
                    self.items += len(take)
                    for _, done in take:
                        if not done.done():
                            done.set_result(None)
        finally:
            group.flushing = False

    def _send(self, model: str, body: bytes, latest_deadline_ns: int) -> None:
        self.celery.send_task(
            task_name(model),
            args=(body,),
            queue=queue_name(model),
            serializer=SERIALIZER,
            # Workers discard the message unseen once no caller in it is still waiting.
            expires=datetime.fromtimestamp(latest_deadline_ns / 1e9, tz=UTC),
            ignore_result=True,
            # Celery would otherwise repr() the tensor bytes into the message headers.
            argsrepr="",
            kwargsrepr="",
        )

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
