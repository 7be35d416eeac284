"""Where a batch's answers go: reply lists for interactive requests, job hashes for bulk items."""

from __future__ import annotations

import time
from collections.abc import Iterable

import redis

from inferpool import jobs
from inferpool.names import job_key, job_results_key


class ReplySink:
    """Writes replies to their reply lists, one pipeline per batch."""

    def __init__(self, client: redis.Redis, reply_ttl_s: int) -> None:
        self.client = client
        self.reply_ttl_s = reply_ttl_s

    def push(self, replies: dict[str, list[bytes]]) -> None:
        pipe = self.client.pipeline(transaction=False)
        for key, values in replies.items():
            pipe.rpush(key, *values)
            # The list outlives its API process only by the TTL.
            pipe.expire(key, self.reply_ttl_s)
        pipe.execute()


class JobSink:
    """Writes bulk results into their job (idempotently per item index) and answers
    whether a job still wants its items computed."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self._record = client.register_script(jobs.RECORD)
        self._end = client.register_script(jobs.END)

    def record(self, job_id: str, entries: Iterable[tuple[int, str, bytes]]) -> tuple[int, str | None]:
        """How many results were new (-1: the job is gone), and the job's state after
        them ("" when gone, None when there was nothing to write)."""
        args = jobs.record_args(int(time.time() * 1000), entries)
        if len(args) == 1:
            return 0, None
        new, state = self._record(keys=[job_key(job_id), job_results_key(job_id)], args=args)
        return int(new), state.decode() if isinstance(state, bytes) else str(state or "")

    def live(self, job_ids: Iterable[str]) -> set[str]:
        """The jobs among these that are neither ended nor expired from Redis."""
        ids = list(job_ids)
        pipe = self.client.pipeline(transaction=False)
        for job_id in ids:
            pipe.hget(job_key(job_id), "state")
        states = pipe.execute()
        return {job_id for job_id, state in zip(ids, states, strict=True) if state in (b"QUEUED", b"RUNNING")}

    def expire(self, job_id: str) -> None:
        self._end(
            keys=[job_key(job_id)],
            args=[int(time.time() * 1000), "EXPIRED", "the job timeout passed before every item ran"],
        )
