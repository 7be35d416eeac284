"""Streamed job uploads that do not finish as they should: cancelled, past their
deadline, the client killed, no end marker, a wrong item count; reading and watching a
job whose upload is still open. Limits on open uploads: test_upload_limits.py; what a
request claims against what it holds: test_job_inputs.py."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import redis

from inferpool.client import Client, Job
from inferpool.jobs import LIVE, state_name
from inferpool.names import bulk_queue_name, job_results_key
from inferpool.v1 import jobs_pb2
from tests.integration.test_jobs import unique_digits
from tests.integration.uploads import Held, assert_broken, job_field, job_keys, job_of, job_of_failed, message
from tests.servers import ROOT, ApiThread, RedisServer, Worker, stack_settings, wait_until

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def small_chunks(api: ApiThread) -> Iterator[ApiThread]:
    """Chunks of 8 items: rows of an open upload reach the worker before it ends."""
    server = ApiThread(dataclasses.replace(api.server.settings, bulk_chunk_items=8))
    yield server
    server.stop()


def test_a_cancelled_upload_fails_its_job_and_frees_its_key(
    client: Client, redis_client: redis.Redis, heldout: tuple[np.ndarray, np.ndarray]
) -> None:
    x, _ = unique_digits(heldout, 20, seed=31)
    key = f"cancel-{time.time_ns()}"
    stream = Held([message(x[:10], first=True, idempotency_key=key), message(x[10:])], [])
    call = client.jobs.SubmitJobStream.future(iter(stream), timeout=60)
    try:
        job_id = job_of(redis_client, key)
        call.cancel()
    finally:
        stream.release.set()
    assert call.cancelled()
    assert_broken(redis_client, client, job_id, key, "broke off")


def test_an_upload_past_its_deadline_fails_its_job(
    client: Client, redis_client: redis.Redis, heldout: tuple[np.ndarray, np.ndarray]
) -> None:
    x, _ = unique_digits(heldout, 20, seed=32)
    key = f"deadline-{time.time_ns()}"
    stream = Held([message(x[:10], first=True, idempotency_key=key), message(x[10:])], [])
    try:
        call = client.jobs.SubmitJobStream.future(iter(stream), timeout=5)
        job_id = job_of(redis_client, key)
        assert call.exception(timeout=30).code() == grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        stream.release.set()
    assert_broken(redis_client, client, job_id, key, "broke off")


KILLED_CLIENT = """
import sys, threading
import numpy as np
from inferpool import tensor
from inferpool.client import Client
from inferpool.v1 import jobs_pb2

def requests():
    for i in range(2):
        rows = np.full((10, 1, 28, 28), i, np.float32)
        yield jobs_pb2.SubmitJobRequest(
            model="digits" if i == 0 else "", idempotency_key=sys.argv[2] if i == 0 else "",
            inputs=[tensor.to_proto(rows)],
        )
    print("sent", flush=True)
    threading.Event().wait(120)

with Client(sys.argv[1]) as client:
    client.jobs.SubmitJobStream(requests(), timeout=120)
"""


def test_a_killed_client_fails_its_upload(api: ApiThread, client: Client, redis_client: redis.Redis) -> None:
    key = f"killed-{time.time_ns()}"
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_CLIENT, api.target, key],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])},
        cwd=ROOT,
    )
    try:
        job_id = job_of(redis_client, key)
        assert proc.stdout is not None
        with ThreadPoolExecutor(1) as pool:
            assert pool.submit(proc.stdout.readline).result(timeout=30) == b"sent\n"
        assert job_field(redis_client, job_id, "state") in LIVE  # the upload is open
        proc.kill()
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert_broken(redis_client, client, job_id, key, "broke off")


def test_the_queued_chunks_of_a_broken_upload_are_never_computed(
    fresh_redis: RedisServer, logdir: Path, heldout: tuple[np.ndarray, np.ndarray]
) -> None:
    """No worker runs while the upload is open and breaks, so every chunk it queued is
    still on the queue when the worker starts: it must drop them all."""
    x, _ = unique_digits(heldout, 80, seed=40)
    settings = stack_settings(fresh_redis, None, bulk_chunk_items=8)
    server = ApiThread(settings)
    r = redis.Redis.from_url(fresh_redis.url)
    worker: Worker | None = None
    try:
        with Client(server.target) as client:
            key = f"dropped-{time.time_ns()}"
            stream = Held([message(x[:40], first=True, idempotency_key=key), message(x[40:])], [])
            call = client.jobs.SubmitJobStream.future(iter(stream), timeout=60)
            try:
                job_id = job_of(r, key)
                wait_until(
                    lambda: server.call(lambda: server.server.jobs.chunks_published) == 10, 30, "10 chunks"
                )
                call.cancel()
            finally:
                stream.release.set()
            wait_until(lambda: job_field(r, job_id, "state") == "FAILED", 30, "the job to fail")
            assert r.llen(bulk_queue_name("digits")) == 10
            worker = Worker(settings, logdir)
            wait_until(lambda: r.llen(bulk_queue_name("digits")) == 0, 60, "the worker to take the chunks")
            wait_until(
                lambda: worker is not None and worker.stats()["items_cancelled"] == 80, 30, "80 dropped"
            )
            assert worker.stats()["items_computed"] == 0
            assert not r.exists(job_results_key(job_id))
            assert job_field(r, job_id, "state") == "FAILED"
    finally:
        if worker is not None:
            worker.stop()
        r.close()
        server.stop()


def test_a_stream_that_ends_without_its_last_message_is_not_a_job(
    client: Client, redis_client: redis.Redis, heldout: tuple[np.ndarray, np.ndarray]
) -> None:
    """What a client from before the marker sends, and what grpc shows the server when
    a call breaks: the request stream just ends. Only the marker seals."""
    x, _ = unique_digits(heldout, 20, seed=33)
    key = f"unmarked-{time.time_ns()}"
    requests = [message(x[:10], first=True, idempotency_key=key), message(x[10:])]
    with pytest.raises(grpc.RpcError) as info:
        client.jobs.SubmitJobStream(iter(requests), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "broke off before a message marked last" in info.value.details()
    job_id = job_of_failed(redis_client)
    assert_broken(redis_client, client, job_id, key, "too old to mark it")


def test_a_wrong_item_count_fails_the_job(
    client: Client, redis_client: redis.Redis, heldout: tuple[np.ndarray, np.ndarray]
) -> None:
    x, _ = unique_digits(heldout, 20, seed=34)
    key = f"miscount-{time.time_ns()}"
    requests = [message(x[:10], first=True, idempotency_key=key), message(x[10:], last=True, total_items=21)]
    with pytest.raises(grpc.RpcError) as info:
        client.jobs.SubmitJobStream(iter(requests), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "total_items is 21 but the server counted 20" in info.value.details()
    assert_broken(redis_client, client, job_of_failed(redis_client), key, "total_items is 21")
    # In a single message the count is checked before any job exists.
    keys = job_keys(redis_client)
    one = message(x[:2], first=True, last=True, total_items=3)
    for call in (
        lambda: client.jobs.SubmitJob(one, timeout=10),
        lambda: client.jobs.SubmitJobStream(iter([one]), timeout=10),
    ):
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details() == "total_items is 3 but the server counted 2 items"
    assert job_keys(redis_client) <= keys


def test_paging_and_watching_a_job_whose_upload_is_open(
    small_chunks: ApiThread, worker: Worker, redis_client: redis.Redis, heldout: tuple[np.ndarray, np.ndarray]
) -> None:
    """An open upload's job cannot end, so what GetJob and WatchJob show before its
    last message is fixed, whatever the machine's speed."""
    x, y = unique_digits(heldout, 80, seed=35)
    with Client(small_chunks.target) as client:
        key = f"open-{time.time_ns()}"
        stream = Held(
            [message(x[:40], first=True, top_k=2, idempotency_key=key), message(x[40:])],
            [message(last=True, total_items=80)],
        )
        call = client.jobs.SubmitJobStream.future(iter(stream), timeout=60)
        try:
            job = Job(client, job_of(redis_client, key))
            # Chunks of 8 leave as the rows arrive: all 80 are computed before the seal.
            wait_until(lambda: job.status().counts.done == 80, 60, "the open upload's rows to be computed")
            page = client.jobs.GetJob(jobs_pb2.GetJobRequest(job_id=job.id, offset=30, limit=20), timeout=10)
            assert state_name(page.state) == "RUNNING"
            assert (page.counts.total, page.counts.done, page.counts.failed) == (0, 80, 0)
            assert [r.index for r in page.results] == list(range(30, 50))
            assert page.next_offset == 50
            assert all(r.ok and len(r.classes) == 2 for r in page.results)
            assert sum(r.classes[0].index == y[r.index] for r in page.results) >= 18
            tail = client.jobs.GetJob(jobs_pb2.GetJobRequest(job_id=job.id, offset=70, limit=20), timeout=10)
            # The total is not known yet: the page ends where it was asked to.
            assert [r.index for r in tail.results] == list(range(70, 80)) and tail.next_offset == 90

            updates: list[jobs_pb2.Job] = []
            first_seen = threading.Event()

            def watch() -> None:
                for update in client.jobs.WatchJob(jobs_pb2.WatchJobRequest(job_id=job.id), timeout=60):
                    updates.append(update)
                    first_seen.set()

            with ThreadPoolExecutor(1) as pool:
                watching = pool.submit(watch)
                assert first_seen.wait(30)
                stream.release.set()  # the last message: the job is sealed and ends
                watching.result(timeout=60)
            assert call.result(timeout=30).job_id == job.id
        finally:
            stream.release.set()
        # Exactly two states were visible: open (total unknown) and ended.
        assert (state_name(updates[0].state), updates[0].counts.total) == ("RUNNING", 0)
        assert (state_name(updates[-1].state), updates[-1].counts.total, updates[-1].counts.done) == (
            "SUCCEEDED",
            80,
            80,
        )
        assert all(state_name(u.state) == "RUNNING" for u in updates[:-1])
        keys = [(u.state, u.counts.done, u.counts.total) for u in updates]
        assert len(set(keys)) == len(keys)  # each update is a change
        final = client.jobs.GetJob(jobs_pb2.GetJobRequest(job_id=job.id, offset=30, limit=20), timeout=10)
        assert final.results == page.results  # what was read early is what stays
        last_page = client.jobs.GetJob(jobs_pb2.GetJobRequest(job_id=job.id, offset=70, limit=20), timeout=10)
        assert last_page.next_offset == 80
