"""Bulk jobs against the session stack: results, paging, cache, bad items, idempotency,
cancel, expiry, and the TTL."""

from __future__ import annotations

import dataclasses
import re
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from bench.stack import free_port
from inferpool import jobs, tensor
from inferpool.client import Client, submit_requests
from inferpool.jobs import state_name
from inferpool.names import bulk_queue_name, bulk_task_name, job_key, job_results_key
from inferpool.v1 import envelope_pb2, jobs_pb2, tensor_pb2
from tests.servers import ApiThread, RedisServer, Worker, stack_settings, wait_until

pytestmark = pytest.mark.timeout(120)


def unique_digits(heldout: tuple[np.ndarray, np.ndarray], n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n held-out digits (cycled), each made unique by noise far below what changes a
    prediction, so that every item is a cache miss the model must compute."""
    x, y = heldout
    idx = np.arange(n) % len(x)
    noise = np.random.default_rng(seed).uniform(-1e-3, 1e-3, size=(n, *x.shape[1:])).astype(np.float32)
    return (x[idx] + noise).astype(np.float32), y[idx]


def test_5000_item_job_accuracy_and_paging(
    client: Client, worker: Worker, heldout: tuple[np.ndarray, np.ndarray]
) -> None:
    x, y = unique_digits(heldout, 5000, seed=1)
    before = worker.stats()["items_computed"]
    job = client.submit(x, "digits", top_k=2)
    assert re.fullmatch(r"[0-9a-f]{32}", job.id)  # 128 random bits
    final = job.wait(timeout_s=90)
    assert state_name(final.state) == "SUCCEEDED"
    assert (final.counts.total, final.counts.done, final.counts.failed) == (5000, 5000, 0)
    assert final.created.ToMilliseconds() <= final.started.ToMilliseconds() <= final.finished.ToMilliseconds()

    results = list(job.results(page_size=700))
    assert [r.index for r in results] == list(range(5000))  # every item once, in index order
    assert all(r.ok and len(r.classes) == 2 for r in results)
    predicted = np.array([r.classes[0].index for r in results])
    accuracy = float((predicted == y).mean())
    assert accuracy >= 0.95, accuracy
    # Every item was computed by the worker (noise made each unique), none twice.
    assert worker.stats()["items_computed"] - before == 5000

    # The same inputs again: all answered from the cache at submit time, nothing computed.
    before = worker.stats()["items_computed"]
    again = client.submit(x[:500], "digits")
    final = again.wait(timeout_s=30)
    assert state_name(final.state) == "SUCCEEDED"
    assert final.counts.cached == 500
    assert worker.stats()["items_computed"] == before
    cached = list(again.results())
    assert all(r.cached for r in cached)
    assert [r.classes[0].index for r in cached] == predicted[:500].tolist()


def test_bad_item_fails_alone_with_its_reason(client: Client, heldout: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = unique_digits(heldout, 6, seed=2)
    good = [
        tensor_pb2.Tensor(dtype=tensor_pb2.DATA_TYPE_FLOAT32, shape=[1, 1, 28, 28], data=a.tobytes())
        for a in x
    ]
    bad = tensor_pb2.Tensor(
        dtype=tensor_pb2.DATA_TYPE_FLOAT32, shape=[1, 1, 14, 14], data=x[0, :, :14, :14].tobytes()
    )
    request = jobs_pb2.SubmitJobRequest(model="digits", inputs=[*good[:3], bad, *good[3:]])
    response = client.jobs.SubmitJob(request, timeout=10)
    final = client.job(response.job_id).wait(timeout_s=30)
    assert state_name(final.state) == "SUCCEEDED"
    assert (final.counts.total, final.counts.done, final.counts.failed) == (7, 6, 1)
    results = list(client.job(response.job_id).results(include_scores=True))
    assert [r.ok for r in results] == [True, True, True, False, True, True, True]
    assert "shape" in results[3].error
    assert [r.classes[0].index for r in results if r.ok] == y.tolist()
    assert all(len(r.scores) == 10 and abs(sum(r.scores) - 1) < 1e-4 for r in results if r.ok)


def test_a_multi_row_input_is_an_item_per_row(
    client: Client, redis_client: redis.Redis, heldout: tuple[np.ndarray, np.ndarray]
) -> None:
    x, y = unique_digits(heldout, 5, seed=22)
    x[2, 0, 7, 7] = np.inf
    wrong = np.zeros((1, 1, 28, 27), np.float32)  # one row that does not fit: one failed item
    inputs = [tensor.to_proto(x[:1]), tensor.to_proto(x[1:4]), tensor.to_proto(wrong), tensor.to_proto(x[4:])]
    response = client.jobs.SubmitJob(jobs_pb2.SubmitJobRequest(model="digits", inputs=inputs), timeout=10)
    final = client.job(response.job_id).wait(timeout_s=30)
    assert (final.counts.total, final.counts.done, final.counts.failed) == (6, 4, 2)
    results = list(client.job(response.job_id).results())
    assert [r.ok for r in results] == [True, True, False, True, False, True]
    assert "NaN or infinite" in results[2].error
    assert "shape" in results[4].error
    assert [r.classes[0].index for r in results if r.ok] == [y[0], y[1], y[3], y[4]]

    # Rows an input claims but does not hold, whole (its row shape) or in bytes: the
    # request is refused as one error, before any job exists.
    jobs_before = sum(1 for _ in redis_client.scan_iter(job_key("*"), count=1000))
    short = tensor.to_proto(x[:3])
    short.data = short.data[:-4]
    for bad, says in (
        (tensor.to_proto(np.zeros((2, 1, 28, 27), np.float32)), "batches shaped [n, 1, 28, 28]"),
        (short, "needs 9408 bytes of float32, got 9404"),
        (tensor.to_proto(np.zeros((3, 1, 28, 28), np.float64)), "takes float32, got float64"),
    ):
        request = jobs_pb2.SubmitJobRequest(model="digits", inputs=[tensor.to_proto(x[:1]), bad])
        with pytest.raises(grpc.RpcError) as info:
            client.jobs.SubmitJob(request, timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert says in info.value.details()
    assert sum(1 for _ in redis_client.scan_iter(job_key("*"), count=1000)) == jobs_before


def test_unknown_job_and_bad_requests(client: Client) -> None:
    for call in (
        lambda: client.job("0" * 32).status(),
        lambda: client.job("0" * 32).cancel(),
        lambda: list(client.jobs.WatchJob(jobs_pb2.WatchJobRequest(job_id="0" * 32), timeout=5)),
    ):
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
    x = np.zeros((1, 1, 28, 28), dtype=np.float32)
    with pytest.raises(grpc.RpcError) as info:
        client.submit(x, "no-such-model")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as info:
        client.jobs.GetJob(jobs_pb2.GetJobRequest(job_id="x", limit=5000), timeout=5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_idempotency_key_returns_the_first_job(
    client: Client, heldout: tuple[np.ndarray, np.ndarray]
) -> None:
    x, _ = unique_digits(heldout, 20, seed=3)
    key = f"retry-{time.time_ns()}"
    first = client.submit(x, "digits", idempotency_key=key)
    second = client.submit(x, "digits", idempotency_key=key)
    assert first.id == second.id
    third = client.submit(x, "digits", idempotency_key=key + "-other")
    assert third.id != first.id
    assert first.wait(timeout_s=30).counts.total == 20


def test_watch_streams_progress_until_the_end(client: Client, heldout: tuple[np.ndarray, np.ndarray]) -> None:
    x, _ = unique_digits(heldout, 3000, seed=4)
    job = client.submit(x, "digits")
    updates: list[jobs_pb2.Job] = []
    final = job.wait(timeout_s=60, on_update=updates.append)
    assert state_name(final.state) == "SUCCEEDED"
    assert (final.counts.total, final.counts.done) == (3000, 3000)
    # How many updates a watch sees depends on the machine's pace; what they say does not:
    # each is a change, progress never goes back, only the last one is terminal, and
    # it is the job's final status.
    keys = [(u.state, u.counts.done, u.counts.failed, u.counts.total) for u in updates]
    assert len(set(keys)) == len(keys)
    progress = [u.counts.done for u in updates]
    assert progress == sorted(progress)
    assert all(state_name(u.state) in jobs.LIVE for u in updates[:-1])
    assert all(u.counts.total in (0, 3000) for u in updates)


def test_cancel_mid_job_stops_computing(
    api: ApiThread, worker: Worker, redis_client: redis.Redis, heldout: tuple[np.ndarray, np.ndarray]
) -> None:
    # Small chunks make the job long enough (many broker round trips) to cancel mid-way.
    settings = dataclasses.replace(api.server.settings, bulk_chunk_items=8)
    small_chunks = ApiThread(settings)
    try:
        with Client(small_chunks.target) as client:
            x, _ = unique_digits(heldout, 6000, seed=5)
            job = client.submit(x, "digits")
            wait_until(lambda: job.status().counts.done > 0, 30, "the job to start")
            cancelled = job.cancel()
            computed_at_cancel = worker.stats()["items_computed"]
            assert state_name(cancelled.state) == "CANCELLED"
            assert cancelled.counts.done < 6000
            # The worker drains (acknowledges without computing) every remaining chunk.
            wait_until(
                lambda: redis_client.llen(bulk_queue_name("digits")) == 0, 60, "the bulk queue to drain"
            )
            wait_until(lambda: worker.stats()["items_cancelled"] > 0, 10, "cancelled items to be counted")
            after = job.status()
            # At most the batches already running when the cancel landed finish.
            settled = worker.stats()["items_computed"] - computed_at_cancel
            assert settled <= 2 * 64, settled
            assert state_name(after.state) == "CANCELLED"
            assert after.counts.done + after.counts.failed < 6000
            # What was done stays readable.
            assert len(list(job.results())) == after.counts.done + after.counts.failed
    finally:
        small_chunks.stop()


def test_items_keep_their_index_when_chunks_cut_across_messages(
    api: ApiThread, worker: Worker, heldout: tuple[np.ndarray, np.ndarray]
) -> None:
    """Cached, invalid and fresh rows mixed inside multi-row inputs, in messages of 7
    rows and chunks of 8: each item's result sits at its own index."""
    small_chunks = ApiThread(dataclasses.replace(api.server.settings, bulk_chunk_items=8))
    try:
        with Client(small_chunks.target) as client:
            x, y = unique_digits(heldout, 40, seed=23)
            warm = client.submit(x[5:15], "digits").wait(timeout_s=30)  # rows 5-14 are cached now
            assert warm.counts.done == 10
            warm_classes = [r.classes[0].index for r in client.job(warm.job_id).results()]
            x[20, 0, 3, 3] = np.nan
            computed, chunks = worker.stats()["items_computed"], small_chunks.server.jobs.chunks_published
            requests = submit_requests(x, "digits", message_bytes=7 * x[:1].nbytes)
            response = client.jobs.SubmitJobStream(requests, timeout=30)
            final = client.job(response.job_id).wait(timeout_s=30)
            counts = final.counts
            assert (counts.total, counts.done, counts.failed, counts.cached) == (40, 39, 1, 10)
            # 29 to compute: chunks of 8, 8, 8 and 5, each item computed once.
            assert small_chunks.server.jobs.chunks_published - chunks == 4
            assert worker.stats()["items_computed"] - computed == 29
            results = list(client.job(response.job_id).results())
            assert [r.index for r in results] == list(range(40))
            assert [r.ok for r in results] == [i != 20 for i in range(40)]
            assert "NaN or infinite" in results[20].error
            assert [r.cached for r in results] == [5 <= i < 15 for i in range(40)]
            assert [r.classes[0].index for r in results[5:15]] == warm_classes
            # A row answered for another index would miss its label about 9 times in 10.
            right = sum(r.classes[0].index == y[r.index] for r in results if r.ok)
            assert right >= 37, right
    finally:
        small_chunks.stop()


def test_job_timeout_ends_expired_and_ttl_removes_the_job(
    api: ApiThread, worker: Worker, redis_client: redis.Redis, heldout: tuple[np.ndarray, np.ndarray]
) -> None:
    short_ttl = ApiThread(dataclasses.replace(api.server.settings, job_ttl_s=2))
    try:
        with Client(short_ttl.target) as client:
            x, _ = unique_digits(heldout, 50, seed=6)
            job = client.submit(x, "digits", job_timeout_s=0.001)
            final = job.wait(timeout_s=30)
            assert state_name(final.state) == "EXPIRED"
            assert final.counts.done < 50
            # Expired already (-2), or due within the 2 s TTL: never kept without one (-1).
            pttl = redis_client.pttl(job_key(job.id))
            assert pttl == -2 or 0 < pttl <= 2000, pttl
            wait_until(lambda: not redis_client.exists(job_key(job.id)), 10, "the job record to expire")
            assert not redis_client.exists(job_results_key(job.id))
            with pytest.raises(grpc.RpcError) as info:
                job.status()
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        short_ttl.stop()


def test_poison_bulk_chunk_is_dead_lettered_and_jobs_go_on(
    client: Client, worker: Worker, redis_client: redis.Redis, heldout: tuple[np.ndarray, np.ndarray]
) -> None:
    queue = bulk_queue_name("digits")
    before = worker.stats()["messages_poison"]
    redis_client.lpush(queue, b"\x00not an envelope")
    wait_until(lambda: redis_client.llen(f"{queue}.dead") >= 1, 10, "the chunk to be dead-lettered")
    assert worker.stats()["messages_poison"] == before + 1
    x, _ = unique_digits(heldout, 100, seed=7)
    assert state_name(client.submit(x, "digits").wait(timeout_s=30).state) == "SUCCEEDED"


def test_a_chunk_fails_only_its_bad_rows_and_chunks_written_as_items_still_run(
    worker: Worker, redis_client: redis.Redis, heldout: tuple[np.ndarray, np.ndarray]
) -> None:
    """Written straight onto the bulk queue, as the API writes them: a chunk with a row
    the API would have refused, a chunk in the item-per-input form of earlier APIs, and
    a chunk whose indexes do not match its rows (dead-lettered)."""
    job_id = jobs.new_job_id()
    now_ms = int(time.time() * 1000)
    redis_client.hset(job_key(job_id), mapping=jobs.new_record("digits", 1, 1, now_ms, 0, ""))
    redis_client.pexpire(job_key(job_id), 60_000)
    x, y = unique_digits(heldout, 6, seed=21)
    x[1, 0, 3, 3] = np.nan

    def envelope(**fields: object) -> bytes:
        return envelope_pb2.Envelope(
            envelope_version=1, model="digits", model_version=1, job_id=job_id, **fields
        ).SerializeToString()

    chunk = envelope_pb2.BulkChunk(inputs=tensor.to_proto(x[:3]), job_indexes=[0, 1, 2])
    items = [envelope_pb2.EnvelopeItem(input=tensor.to_proto(x[i : i + 1]), job_index=i) for i in (3, 4, 5)]
    mismatched = envelope_pb2.BulkChunk(inputs=tensor.to_proto(x[:2]), job_indexes=[9])
    queue = bulk_queue_name("digits")
    dead = redis_client.llen(f"{queue}.dead")
    redis_client.lpush(queue, envelope(chunk=chunk), envelope(items=items), envelope(chunk=mismatched))
    redis_client.eval(jobs.SEAL, 1, job_key(job_id), now_ms, 6)

    def state() -> str:
        raw = redis_client.hget(job_key(job_id), "state")
        return raw.decode() if raw else ""

    wait_until(lambda: state() not in jobs.LIVE, 30, "the job to end")
    assert state() == "SUCCEEDED"
    results = {
        int(k): envelope_pb2.Reply.FromString(v)
        for k, v in redis_client.hgetall(job_results_key(job_id)).items()
    }
    assert sorted(results) == list(range(6))
    assert results[1].status == envelope_pb2.Reply.STATUS_INVALID_INPUT and "NaN" in results[1].error
    for i in (0, 2, 3, 4, 5):
        assert results[i].status == envelope_pb2.Reply.STATUS_OK
        assert int(np.argmax(results[i].scores.values)) == y[i]
    wait_until(
        lambda: redis_client.llen(f"{queue}.dead") == dead + 1, 10, "the mismatched chunk to be dead-lettered"
    )


def test_a_cancelled_jobs_chunks_are_counted_once_as_revoked_and_cancelled(
    fresh_redis: RedisServer, logdir: Path, heldout: tuple[np.ndarray, np.ndarray]
) -> None:
    """A job cancelled before any worker ran: the worker acknowledges its queued chunks
    without computing them. Flower sees each chunk REVOKED; Prometheus and
    `inspect inferpool_stats` must say the same of the same events."""
    x, _ = unique_digits(heldout, 40, seed=41)
    settings = stack_settings(fresh_redis, None, bulk_chunk_items=8)
    server = ApiThread(settings)
    r = redis.Redis.from_url(fresh_redis.url)
    worker: Worker | None = None
    try:
        with Client(server.target) as client:
            job = client.submit(x, "digits")
            assert state_name(job.cancel().state) == "CANCELLED"
            assert r.llen(bulk_queue_name("digits")) == 5
            port = free_port()
            worker = Worker(dataclasses.replace(settings, metrics_port=port), logdir)
            wait_until(lambda: r.llen(bulk_queue_name("digits")) == 0, 60, "the worker to take the chunks")
            wait_until(
                lambda: worker is not None and worker.stats()["items_cancelled"] == 40, 30, "40 dropped"
            )
            stats = worker.stats()
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
                exported = {
                    (s.name, tuple(sorted(s.labels.items()))): s.value
                    for family in text_string_to_metric_families(answer.read().decode())
                    for s in family.samples
                }
            dropped = (("model", "digits"), ("reason", "cancelled"))
            revoked = (("state", "revoked"), ("task", bulk_task_name("digits")))
            assert exported.get(("inferpool_dropped_requests_total", dropped)) == 40
            assert exported.get(("inferpool_tasks_total", revoked)) == 5
            assert (stats["items_cancelled"], stats["messages_revoked"], stats["items_computed"]) == (
                40,
                5,
                0,
            )
    finally:
        if worker is not None:
            worker.stop()
        r.close()
        server.stop()
