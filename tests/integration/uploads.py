"""Building job upload streams and reading what they left in Redis, for the upload tests."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import numpy as np
import redis

from inferpool import tensor
from inferpool.client import Client
from inferpool.jobs import LIVE
from inferpool.names import PREFIX, job_idempotency_key, job_key
from inferpool.v1 import jobs_pb2
from tests.servers import wait_until


def message(
    rows: np.ndarray | None = None, first: bool = False, **fields: object
) -> jobs_pb2.SubmitJobRequest:
    request = jobs_pb2.SubmitJobRequest(**fields)  # type: ignore[arg-type]
    if first:
        request.model = "digits"
    if rows is not None:
        request.inputs.append(tensor.to_proto(rows))
    return request


class Held:
    """A request stream that sends `head`, then holds the call open until released
    (bounded), then sends `tail`."""

    def __init__(self, head: list[jobs_pb2.SubmitJobRequest], tail: list[jobs_pb2.SubmitJobRequest]) -> None:
        self.head, self.tail = head, tail
        self.release = threading.Event()

    def __iter__(self) -> Iterator[jobs_pb2.SubmitJobRequest]:
        yield from self.head
        self.release.wait(60)
        yield from self.tail


def job_of(redis_client: redis.Redis, key: str) -> str:
    """The job an open upload created, found by its idempotency key (the client has no
    id before the upload answers)."""
    idem = job_idempotency_key("", key)
    wait_until(lambda: redis_client.get(idem) is not None, 30, "the upload's job to be recorded")
    raw = redis_client.get(idem)
    assert raw is not None
    return raw.decode()


def job_field(redis_client: redis.Redis, job_id: str, field: str) -> str:
    raw = redis_client.hget(job_key(job_id), field)
    return raw.decode() if raw is not None else ""


def assert_broken(redis_client: redis.Redis, client: Client, job_id: str, key: str, reason: str) -> None:
    """The job failed with `reason`, its key is free, and a retry is a fresh job."""
    wait_until(lambda: job_field(redis_client, job_id, "state") not in LIVE, 30, "the job to end")
    assert job_field(redis_client, job_id, "state") == "FAILED"
    assert reason in job_field(redis_client, job_id, "error")
    assert job_field(redis_client, job_id, "sealed") == "0"
    assert redis_client.get(job_idempotency_key("", key)) is None
    retry = client.jobs.SubmitJob(
        message(np.zeros((1, 1, 28, 28), np.float32), first=True, idempotency_key=key), timeout=10
    )
    assert retry.created and retry.job_id != job_id
    assert retry.job.counts.total == 1


def job_of_failed(redis_client: redis.Redis) -> str:
    """The most recently created FAILED job (the client of a refused upload has no id)."""
    best: tuple[int, str] = (0, "")
    for raw in redis_client.scan_iter(f"{PREFIX}:job:*", count=1000):
        name = raw.decode()
        job_id = name.rsplit(":", 1)[-1]
        if name.endswith(":results") or len(job_id) != 32:
            continue
        fields = redis_client.hmget(name, "state", "created_ms")
        if fields[0] == b"FAILED" and int(fields[1] or 0) > best[0]:
            best = (int(fields[1] or 0), job_id)
    assert best[1], "no failed job found"
    return best[1]


def job_keys(redis_client: redis.Redis) -> set[bytes]:
    """The job records there are. Results hashes are left out: a worker may still be
    writing those of an earlier test's job."""
    return {k for k in redis_client.scan_iter(f"{PREFIX}:job:*", count=1000) if not k.endswith(b":results")}
