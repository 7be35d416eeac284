"""Limits on open uploads: stalled, open too long, too many at once, and a watch of a job
that does not change."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
import redis

from inferpool.client import Client, Job, JobTimeout
from inferpool.jobs import LIVE, state_name
from inferpool.v1 import jobs_pb2
from tests.integration.test_jobs import unique_digits
from tests.integration.uploads import Held, assert_broken, job_field, job_of, job_of_failed, message
from tests.servers import ApiThread, wait_until

pytestmark = pytest.mark.timeout(120)


def test_a_stalled_upload_is_broken_off(
    api: ApiThread, redis_client: redis.Redis, heldout: tuple[np.ndarray, np.ndarray]
) -> None:
    x, _ = unique_digits(heldout, 10, seed=36)
    server = ApiThread(dataclasses.replace(api.server.settings, upload_idle_timeout_s=0.5))
    try:
        with Client(server.target) as client:
            key = f"stalled-{time.time_ns()}"
            stream = Held([message(x, first=True, idempotency_key=key)], [])
            try:
                call = client.jobs.SubmitJobStream.future(iter(stream), timeout=60)
                error = call.exception(timeout=30)
            finally:
                stream.release.set()
            assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert "sent nothing for 0.5 s" in error.details()
            job_id = job_of_failed(redis_client)
            assert_broken(redis_client, client, job_id, key, "sent nothing for 0.5 s")
    finally:
        server.stop()


def test_an_upload_open_too_long_is_broken_off(
    api: ApiThread, redis_client: redis.Redis, heldout: tuple[np.ndarray, np.ndarray]
) -> None:
    x, _ = unique_digits(heldout, 1, seed=37)
    server = ApiThread(dataclasses.replace(api.server.settings, upload_max_duration_s=1.0))
    stop = threading.Event()

    def trickle() -> Iterator[jobs_pb2.SubmitJobRequest]:
        yield message(x, first=True)
        for _ in range(600):  # one row every 0.1 s: never idle, never done
            if stop.wait(0.1):
                return
            yield message(x)

    try:
        with Client(server.target) as client:
            with pytest.raises(grpc.RpcError) as info:
                client.jobs.SubmitJobStream(trickle(), timeout=60)
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert "still open after 1 s" in info.value.details()
            job_id = job_of_failed(redis_client)
            assert "still open after 1 s" in job_field(redis_client, job_id, "error")
    finally:
        stop.set()
        server.stop()


@pytest.mark.parametrize(("per_caller", "per_server", "which"), [(1, 64, "per caller"), (8, 1, "per server")])
def test_open_uploads_are_capped(
    api: ApiThread, heldout: tuple[np.ndarray, np.ndarray], per_caller: int, per_server: int, which: str
) -> None:
    x, _ = unique_digits(heldout, 2, seed=38)
    settings = dataclasses.replace(
        api.server.settings, max_uploads_per_caller=per_caller, max_uploads=per_server
    )
    server = ApiThread(settings)
    try:
        with Client(server.target) as client:
            stream = Held([message(x[:1], first=True)], [message(x[1:], last=True, total_items=2)])
            try:
                held = client.jobs.SubmitJobStream.future(iter(stream), timeout=60)
                wait_until(
                    lambda: server.call(lambda: server.server.jobs.uploads_open) == 1, 30, "an open upload"
                )
                with pytest.raises(grpc.RpcError) as info:
                    client.submit(x, "digits", timeout_s=30)
                assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert which in info.value.details()
            finally:
                stream.release.set()
            assert held.result(timeout=30).job.counts.total == 2
            # The slot is free again once the held upload ends.
            wait_until(
                lambda: server.call(lambda: server.server.jobs.uploads_open) == 0, 10, "the slot to free"
            )
            assert client.submit(x, "digits", timeout_s=30).wait(timeout_s=30).counts.total == 2
    finally:
        server.stop()


def test_a_watch_of_a_job_that_does_not_change_is_bounded(
    api: ApiThread, redis_client: redis.Redis, heldout: tuple[np.ndarray, np.ndarray]
) -> None:
    x, _ = unique_digits(heldout, 1, seed=39)
    server = ApiThread(dataclasses.replace(api.server.settings, watch_max_duration_s=0.5))
    try:
        with Client(server.target) as client:
            key = f"watched-{time.time_ns()}"
            stream = Held([message(x, first=True, idempotency_key=key)], [message(last=True, total_items=1)])
            call = client.jobs.SubmitJobStream.future(iter(stream), timeout=60)
            try:
                job = Job(client, job_of(redis_client, key))
                # The server ends the stream itself (OK), the job still live.
                updates = list(client.jobs.WatchJob(jobs_pb2.WatchJobRequest(job_id=job.id), timeout=30))
                assert updates and state_name(updates[-1].state) in LIVE
                # The client's wait goes on across such ends until its own bound.
                with pytest.raises(JobTimeout):
                    job.wait(timeout_s=1.5)
            finally:
                stream.release.set()
            assert call.result(timeout=30).job_id == job.id
            assert state_name(job.wait(timeout_s=30).state) == "SUCCEEDED"
    finally:
        server.stop()
