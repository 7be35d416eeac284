"""Streamed job uploads that do not finish as they should: cancelled, past their
deadline, the client killed, stalled, too many at once, no end marker, a wrong item
count; requests whose claims outweigh their bytes; numeric fields and ids out of
range; reading and watching a job whose upload is still open."""

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

from inferpool import tensor
from inferpool.client import Client, Job, JobTimeout
from inferpool.jobs import LIVE, state_name
from inferpool.names import PREFIX, bulk_queue_name, job_idempotency_key, job_key, job_results_key
from inferpool.v1 import jobs_pb2, tensor_pb2
from tests.integration.test_jobs import unique_digits
from tests.servers import ROOT, ApiThread, RedisServer, Worker, stack_settings, wait_until

pytestmark = pytest.mark.timeout(120)


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


def job_keys(redis_client: redis.Redis) -> set[bytes]:
    """The job records there are. Results hashes are left out: a worker may still be
    writing those of an earlier test's job."""
    return {k for k in redis_client.scan_iter(f"{PREFIX}:job:*", count=1000) if not k.endswith(b":results")}


def test_a_shape_its_bytes_do_not_fill_is_one_error_and_stalls_nothing(
    client: Client, redis_client: redis.Redis
) -> None:
    """20 bytes claiming a million rows: refused as one error at once, nothing written,
    and the API's other calls are not held up meanwhile."""
    hostile = jobs_pb2.SubmitJobRequest(
        model="digits",
        inputs=[
            tensor_pb2.Tensor(dtype=tensor_pb2.DATA_TYPE_FLOAT32, shape=[1_000_000, 1, 28, 28], data=b"")
        ],
    )
    keys, memory = job_keys(redis_client), redis_client.info("memory")["used_memory"]
    calls = [client.jobs.SubmitJob.future(hostile, timeout=30) for _ in range(8)]
    latencies: list[float] = []
    while not all(c.done() for c in calls) or not latencies:
        t0 = time.perf_counter()
        assert client.health(timeout_s=10) == "SERVING"
        latencies.append(time.perf_counter() - t0)
    for c in calls:
        error = c.exception(timeout=30)
        assert error is not None and error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error.details().startswith("inputs: ") and "needs 3136000000 bytes" in error.details()
    # The old server wrote a failed result per claimed row (~138 MB) and held its loop 4 s.
    assert job_keys(redis_client) <= keys
    assert redis_client.info("memory")["used_memory"] - memory < 1 << 20
    assert max(latencies) < 0.25, latencies


def test_inputs_per_message_are_bounded_and_bad_ones_fail_one_item_each(
    client: Client, redis_client: redis.Redis
) -> None:
    """Inputs of ~10 bytes that each fail: at most 1024 per message, each one failed
    item (never one per claimed row); more is refused at once, leaving no job."""
    empty = tensor_pb2.Tensor(dtype=tensor_pb2.DATA_TYPE_FLOAT32, shape=[1, 1, 28, 28], data=b"")
    keys = job_keys(redis_client)
    flood = jobs_pb2.SubmitJobRequest(model="digits", inputs=[empty] * 60_000)
    call = client.jobs.SubmitJob.future(flood, timeout=60)
    latencies: list[float] = []
    while not call.done() or not latencies:
        t0 = time.perf_counter()
        assert client.health(timeout_s=10) == "SERVING"
        latencies.append(time.perf_counter() - t0)
    error = call.exception(timeout=60)
    assert error is not None and error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith("inputs: a message carries at most 1024 inputs, got 60000")
    assert job_keys(redis_client) <= keys
    # The old server took ~2 s for it, holding health checks up to ~1.7 s.
    assert max(latencies) < 0.25, latencies

    job = client.jobs.SubmitJob(
        jobs_pb2.SubmitJobRequest(model="digits", inputs=[empty] * 1024), timeout=30
    ).job
    assert state_name(job.state) == "FAILED"
    assert (job.counts.total, job.counts.failed) == (1024, 1024)
    results = list(client.job(job.job_id).results())
    assert [r.index for r in results] == list(range(1024))
    assert all(not r.ok and "data is 0 bytes" in r.error for r in results)


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"timeout_s": 1e10}, "timeout_s"),
        ({"timeout_s": 1e308}, "timeout_s"),
        ({"timeout_s": -1.0}, "timeout_s"),
        ({"timeout_s": float("nan")}, "timeout_s"),
        ({"version": -1}, "version"),
        ({"top_k": 1_000_000}, "top_k"),
        ({"total_items": -5, "last": True}, "total_items"),
    ],
)
def test_submit_fields_out_of_range_are_refused_and_leave_no_job(
    client: Client, redis_client: redis.Redis, fields: dict[str, object], field: str
) -> None:
    keys = job_keys(redis_client)
    request = message(np.zeros((2, 1, 28, 28), np.float32), first=True, **fields)
    for call in (
        lambda: client.jobs.SubmitJob(request, timeout=10),
        lambda: client.jobs.SubmitJobStream(iter([request]), timeout=10),
    ):
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details().startswith(field + " ")
    assert job_keys(redis_client) <= keys


def test_job_ids_and_paging_fields_are_checked_and_never_echoed_whole(client: Client) -> None:
    long_id = "a" * 100_000
    for job_id in (long_id, "nope", "0" * 31, "A" * 32, "0" * 32 + "\n"):
        for call in (
            lambda i=job_id: client.jobs.GetJob(jobs_pb2.GetJobRequest(job_id=i), timeout=10),
            lambda i=job_id: list(client.jobs.WatchJob(jobs_pb2.WatchJobRequest(job_id=i), timeout=10)),
            lambda i=job_id: client.jobs.CancelJob(jobs_pb2.CancelJobRequest(job_id=i), timeout=10),
        ):
            with pytest.raises(grpc.RpcError) as info:
                call()
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()[:200]
            assert info.value.details().startswith("job_id must be 32 lowercase hex digits")
            assert len(info.value.details()) < 120
    job = client.submit(np.zeros((1, 1, 28, 28), np.float32), "digits")
    for fields, field in (
        ({"offset": -1}, "offset"),
        ({"offset": 2**62}, "offset"),
        ({"limit": -1}, "limit"),
        ({"limit": 5000}, "limit"),
    ):
        with pytest.raises(grpc.RpcError) as info:
            client.jobs.GetJob(jobs_pb2.GetJobRequest(job_id=job.id, **fields), timeout=10)  # type: ignore[arg-type]
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details().startswith(field + " ")
    # In range, an unknown id is NOT_FOUND, and says which id.
    with pytest.raises(grpc.RpcError) as info:
        client.jobs.GetJob(jobs_pb2.GetJobRequest(job_id="0" * 32), timeout=10)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND and "0" * 32 in info.value.details()
