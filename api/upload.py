"""One bulk-job upload in progress: item indexes, what is answered at once (invalid or
cached items), and the rest published chunk by chunk onto the model's bulk queue."""

from __future__ import annotations

import asyncio
from collections import deque
from typing import TYPE_CHECKING

import numpy as np

from inferpool import jobs
from inferpool.api.auth import caller
from inferpool.errors import InvalidInput
from inferpool.repository import ModelConfig
from inferpool.v1 import envelope_pb2, jobs_pb2

if TYPE_CHECKING:
    from inferpool.api.jobs import JobPlane

Reply = envelope_pb2.Reply


class Upload:
    """One submission in progress: assigns item indexes, answers what it can at once,
    and publishes the rest chunk by chunk. Items stay in blocks (an input's rows as one
    array) from validation to the queue: hashing, lookup and chunking cost no array or
    tuple per item."""

    def __init__(self, jobs_plane: JobPlane, job_id: str, cfg: ModelConfig, deadline_ns: int) -> None:
        self.p = jobs_plane
        self.job_id = job_id
        self.cfg = cfg
        self.deadline_ns = deadline_ns
        # Read in the call's own context: the hashing may run on an executor thread.
        self.cache_scope = jobs_plane.plane.cache.keys.scope(caller())
        self.count = 0
        self.chunks = 0
        # Items waiting for a chunk, in job order: blocks of job indexes and their inputs.
        self._indexes: deque[np.ndarray] = deque()
        self._rows: deque[np.ndarray] = deque()
        self._waiting = 0

    async def add(self, request: jobs_pb2.SubmitJobRequest) -> None:
        if not request.inputs:
            return
        self.p.check_inputs(request)
        # Validation, hashing and the cache lookup cost CPU in proportion to the message
        # (up to max_message_bytes): off the event loop, so that no upload delays the
        # other calls this process serves.
        loop = asyncio.get_running_loop()
        added, answered, blocks, keys = await loop.run_in_executor(None, self._prepare, request, self.count)
        # The front cache reads Memcached on the loop without blocking it.
        if keys and (hits := await self.p.plane.results.get_many(keys)):
            blocks = await loop.run_in_executor(None, _answer_cached, blocks, keys, hits, answered)
        self.count += added
        for indexes, rows in blocks:
            self._indexes.append(indexes)
            self._rows.append(rows)
            self._waiting += len(rows)
        if self._waiting >= self.p.chunk_items:
            await self._publish(whole_chunks_only=True)
        if answered:
            await self.p.record(self.job_id, answered)

    def _prepare(
        self, request: jobs_pb2.SubmitJobRequest, first_index: int
    ) -> tuple[int, list[tuple[int, str, bytes]], list[tuple[np.ndarray, np.ndarray]], list[str]]:
        """One message's inputs, from item first_index on (on a worker thread): how many
        items they hold, the results known at once (invalid items), the blocks of job
        indexes and valid rows, and those rows' cache keys."""
        cfg = self.cfg
        inputs = list(request.inputs)
        checked = cfg.validate_blocks(inputs)  # InvalidInput for a structurally bad input
        added = sum(len(rows) if rows is not None else 1 for rows, _ in checked)
        if first_index + added > self.p.max_job_items:
            raise InvalidInput(f"a job holds at most {self.p.max_job_items} items")
        answered: list[tuple[int, str, bytes]] = []
        failures: dict[str, bytes] = {}  # reason -> its serialized Reply, made once
        valid: list[tuple[np.ndarray, np.ndarray]] = []  # job indexes, their inputs
        at = first_index
        for rows, failed in checked:
            first, at = at, at + (len(rows) if rows is not None else 1)
            for row, problem in failed.items():
                reason = str(problem)
                payload = failures.get(reason)
                if payload is None:
                    payload = failures[reason] = Reply(
                        status=Reply.STATUS_INVALID_INPUT, error=reason
                    ).SerializeToString()
                answered.append((first + row, jobs.FAILED, payload))
            if rows is None:
                continue
            indexes = np.arange(first, first + len(rows))
            if failed:
                keep = np.ones(len(rows), dtype=bool)
                keep[list(failed)] = False
                indexes, rows = indexes[keep], rows[keep]
            valid.append((indexes, rows))
        assert at == first_index + added, (at, first_index, added)
        cache_keys = self.p.plane.cache.keys
        keys = [key for _, rows in valid for key in cache_keys.row_keys(cfg, rows, self.cache_scope)]
        return added, answered, valid, keys

    async def flush(self) -> None:
        await self._publish(whole_chunks_only=False)

    async def _publish(self, whole_chunks_only: bool) -> None:
        """Publishes the waiting items in chunks of chunk_items; with whole_chunks_only,
        a last partial chunk keeps waiting for the next message's items."""
        size = self.p.chunk_items
        while self._waiting >= size or (self._waiting and not whole_chunks_only):
            indexes, pieces = self._take(min(size, self._waiting))
            await self.p.publish(self.cfg, self.job_id, indexes, pieces, self.deadline_ns)
            self.chunks += 1

    def _take(self, n: int) -> tuple[list[int], list[np.ndarray]]:
        """The first n waiting items: their job indexes, and their rows as views of the
        blocks they came in."""
        self._waiting -= n
        indexes: list[int] = []
        pieces: list[np.ndarray] = []
        while n:
            block_indexes, rows = self._indexes[0], self._rows[0]
            if len(rows) <= n:
                self._indexes.popleft()
                self._rows.popleft()
            else:
                self._indexes[0], self._rows[0] = block_indexes[n:], rows[n:]
                block_indexes, rows = block_indexes[:n], rows[:n]
            indexes += block_indexes.tolist()
            pieces.append(rows)
            n -= len(rows)
        return indexes, pieces


def _answer_cached(
    valid: list[tuple[np.ndarray, np.ndarray]],
    keys: list[str],
    hits: dict[str, bytes],
    answered: list[tuple[int, str, bytes]],
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Appends the cached items' results to `answered` (on a worker thread); returns the
    blocks of job indexes and rows left to compute."""
    blocks: list[tuple[np.ndarray, np.ndarray]] = []
    at = 0
    for indexes, rows in valid:
        block_keys, at = keys[at : at + len(rows)], at + len(rows)
        values = [hits.get(key) for key in block_keys]
        missed = np.array([value is None for value in values], dtype=bool)
        for index, value in zip(indexes.tolist(), values, strict=True):
            if value is not None:
                reply = Reply(status=Reply.STATUS_OK, cached=True)
                reply.scores.ParseFromString(value)
                answered.append((index, jobs.CACHED, reply.SerializeToString()))
        indexes, rows = indexes[missed], rows[missed]
        if len(rows):
            blocks.append((indexes, rows))
    return blocks
