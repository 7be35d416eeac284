"""The batcher in-process, on the real digits model, Redis and Memcached: bulk results
are written by its results thread, a cancelled job is learnt from the state its result
write returns, and stopping writes everything computed."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import redis

from inferpool import jobs, tensor
from inferpool.cache import Cache
from inferpool.jobs import JobStore
from inferpool.names import job_key, job_results_key
from inferpool.repository import Repository
from inferpool.v1 import envelope_pb2
from inferpool.workers import stats
from inferpool.workers.batcher import Batcher, BulkWork, Pending
from inferpool.workers.results import Ticket
from inferpool.workers.runtime import ModelRunner, pick_device
from inferpool.workers.sinks import ReplySink
from tests.servers import MemcachedServer, wait_until
from tests.unit.test_batcher import ROOT

pytestmark = pytest.mark.timeout(60)


def _batcher(client: redis.Redis, cache: Cache, wrap: Callable[[ModelRunner], Any] | None = None) -> Batcher:
    """A digits batcher (not started) writing to `client` and `cache`; `wrap` stands in
    for its model runner around the real one."""
    cfg = Repository.load(ROOT / "models").resolve("digits", 0)
    runner = ModelRunner(cfg, pick_device("cpu"))
    return Batcher(cfg, wrap(runner) if wrap else runner, ReplySink(client, 60), JobStore(client), cache)


@pytest.fixture
def parts(redis_client: redis.Redis, memcached_server: MemcachedServer) -> Iterator[tuple[Batcher, JobStore]]:
    cache = Cache(memcached_server.address, timeout_ms=500, ttl_s=60)
    batcher = _batcher(redis_client, cache)
    batcher.start()
    yield batcher, batcher.jobs
    batcher.stop()
    batcher.join(timeout=10)
    cache.close()


def _job(client: redis.Redis) -> str:
    job_id = jobs.new_job_id()
    client.hset(job_key(job_id), mapping=jobs.new_record("digits", 1, 1, 0, 0, "test"))
    client.expire(job_key(job_id), 60)
    return job_id


def _items(
    batcher: Batcher, job_id: str, n: int, seed: int
) -> tuple[Ticket, list[envelope_pb2.EnvelopeItem], BulkWork]:
    # Its own seed space: inputs other tests send must not be in the shared cache already.
    rng = np.random.default_rng((0xBA7C4E5, seed))
    ticket = Ticket(n, time.time_ns())
    items, arrays = [], []
    for i in range(n):
        t = tensor.to_proto(rng.random((1, 1, 28, 28), dtype=np.float32))
        items.append(
            envelope_pb2.EnvelopeItem(request_id=uuid.uuid4().hex, input=t, job_index=seed * 1000 + i)
        )
        arrays.append(batcher.cfg.validate(t))
    return ticket, items, BulkWork([item.job_index for item in items], np.concatenate(arrays), ticket, job_id)


def test_record_returns_the_job_state(redis_client: redis.Redis, parts: tuple[Batcher, JobStore]) -> None:
    _, sinks = parts
    job_id = _job(redis_client)
    assert sinks.record(job_id, [(0, jobs.OK, b"r")]) == (1, "RUNNING")
    # A redelivered chunk writing the same index counts nothing and overwrites nothing.
    assert sinks.record(job_id, [(0, jobs.OK, b"again")]) == (0, "RUNNING")
    assert redis_client.hget(job_results_key(job_id), "0") == b"r"
    sinks.expire(job_id)
    assert sinks.record(job_id, [(1, jobs.OK, b"r")]) == (1, "EXPIRED")
    assert sinks.record("0" * 32, [(0, jobs.OK, b"r")]) == (-1, "")
    assert sinks.record(job_id, []) == (0, None)


def test_seal_and_end_move_only_live_jobs(redis_client: redis.Redis) -> None:
    seal, end = redis_client.register_script(jobs.SEAL), redis_client.register_script(jobs.END)
    record = redis_client.register_script(jobs.RECORD)
    job_id = _job(redis_client)
    keys = [job_key(job_id), job_results_key(job_id)]
    assert record(keys=keys, args=jobs.record_args(1, [(0, jobs.OK, b"a"), (1, jobs.FAILED, b"b")])) == [
        2,
        b"RUNNING",
    ]
    # Every item has a result, but the upload has not ended: still running.
    assert redis_client.hget(job_key(job_id), "state") == b"RUNNING"
    assert seal(keys=keys[:1], args=[5, 2]) == b"SUCCEEDED"
    record_now = redis_client.hgetall(job_key(job_id))
    assert (record_now[b"state"], record_now[b"total"], record_now[b"finished_ms"]) == (
        b"SUCCEEDED",
        b"2",
        b"5",
    )
    # An ended job stays as it ended: a late cancel changes nothing.
    assert end(keys=keys[:1], args=[9, "CANCELLED", ""]) == b"SUCCEEDED"
    assert redis_client.hmget(job_key(job_id), "state", "finished_ms") == [b"SUCCEEDED", b"5"]
    live = _job(redis_client)
    assert end(keys=[job_key(live)], args=[9, "CANCELLED", ""]) == b"CANCELLED"
    assert redis_client.hmget(job_key(live), "state", "finished_ms") == [b"CANCELLED", b"9"]
    # Sealed with items still missing: not ended until they come.
    assert seal(keys=[job_key(_job(redis_client))], args=[5, 3]) == b"QUEUED"


class _Gated:
    """The digits model; its first batch waits for `release`, and every batch's inputs
    are kept, so a test knows what the model was asked to compute."""

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        self.entered = threading.Event()
        self.release = threading.Event()
        self.seen: list[np.ndarray] = []

    def run(self, x: np.ndarray) -> np.ndarray:
        self.seen.append(x.copy())
        if not self.entered.is_set():
            self.entered.set()
            assert self.release.wait(30)
        return self.runner.run(x)

    def __getattr__(self, name: str) -> object:
        return getattr(self.runner, name)


def test_items_that_expire_inside_the_worker_are_not_computed(
    redis_client: redis.Redis, memcached_server: MemcachedServer
) -> None:
    cache = Cache(memcached_server.address, timeout_ms=500, ttl_s=60)
    batcher = _batcher(redis_client, cache, _Gated)
    gate = batcher.runner
    assert isinstance(gate, _Gated)
    cfg = batcher.cfg
    reply_key = f"test.replies.{uuid.uuid4().hex}"
    rng = np.random.default_rng((0xDEAD11E, 1))

    def pending(ticket: Ticket, deadline_ns: int) -> Pending:
        t = tensor.to_proto(rng.random((1, 1, 28, 28), dtype=np.float32))
        item = envelope_pb2.EnvelopeItem(
            request_id=uuid.uuid4().hex, input=t, deadline_unix_ns=deadline_ns, reply_key=reply_key
        )
        return Pending(item, cfg.validate(t), ticket)

    expired_before = stats.snapshot()["items_expired"]
    batcher.start()
    try:
        far = time.time_ns() + 60 * 10**9
        slow = Ticket(1, time.time_ns())
        first = pending(slow, far)
        batcher.submit([first])
        assert gate.entered.wait(30)  # the model is busy with that batch
        # One message behind it: the envelope's latest deadline is far, two of its items'
        # are near, and pass while they wait for the slow batch.
        near = time.time_ns() + 50 * 10**6
        envelope = Ticket(3, time.time_ns())
        behind = [pending(envelope, near), pending(envelope, far), pending(envelope, near)]
        batcher.submit(behind)
        wait_until(lambda: time.time_ns() > near, 5, "the near deadline to pass")
        gate.release.set()
        assert slow.done.wait(30) and envelope.done.wait(30)
        assert (slow.computed, slow.expired) == (1, 0)
        assert (envelope.computed, envelope.expired) == (1, 2)
        # The model saw the slow batch, then only the live item.
        assert [len(x) for x in gate.seen] == [1, 1]
        np.testing.assert_array_equal(gate.seen[1], behind[1].array)
        # Only computed items are answered; the API answers the expired ones DEADLINE_EXCEEDED.
        replies = [envelope_pb2.Reply.FromString(r) for r in redis_client.lrange(reply_key, 0, -1)]
        assert sorted(r.request_id for r in replies) == sorted(
            [first.item.request_id, behind[1].item.request_id]
        )
        assert all(r.status == envelope_pb2.Reply.STATUS_OK for r in replies)
        assert stats.snapshot()["items_expired"] - expired_before == 2
    finally:
        gate.release.set()
        batcher.stop()
        batcher.join(timeout=30)
        cache.close()


def test_bulk_results_and_cache_are_written_before_the_ticket_settles(
    redis_client: redis.Redis, memcached_server: MemcachedServer, parts: tuple[Batcher, JobStore]
) -> None:
    batcher, _ = parts
    job_id = _job(redis_client)
    # Several batches: the model runs ahead of the results thread.
    ticket, items, work = _items(batcher, job_id, 300, seed=1)
    batcher.submit_bulk(work)
    assert ticket.done.wait(30)
    assert ticket.computed == 300 and ticket.unrecorded == 0
    results = redis_client.hgetall(job_results_key(job_id))
    assert len(results) == 300
    reply = envelope_pb2.Reply.FromString(results[str(items[0].job_index).encode()])
    assert reply.status == envelope_pb2.Reply.STATUS_OK and len(reply.scores.values) == 10
    expected = envelope_pb2.Reply.FromString(results[str(items[-1].job_index).encode()]).scores
    key = batcher.cache.keys.input_key(batcher.cfg, items[-1].input.data)
    cache = Cache(memcached_server.address, timeout_ms=500, ttl_s=60)
    try:
        # Bulk cache writes are not acknowledged (noreply): Memcached applies them a moment
        # after the results are in Redis, so the entry is waited for, bounded.
        wait_until(lambda: cache.get(key) is not None, 10, "the bulk result's cache entry")
        assert cache.get(key) == expected.SerializeToString()
    finally:
        cache.close()


def test_items_of_a_job_seen_cancelled_are_not_computed(
    redis_client: redis.Redis, parts: tuple[Batcher, JobStore]
) -> None:
    batcher, _ = parts
    job_id = _job(redis_client)
    first, _, work = _items(batcher, job_id, 1, seed=2)
    redis_client.hset(job_key(job_id), "state", "CANCELLED")
    batcher.submit_bulk(work)
    assert first.done.wait(30)
    # Computed (its chunk was taken before the cancel), and its write reported the state.
    assert first.computed == 1
    later, _, work = _items(batcher, job_id, 64, seed=3)
    batcher.submit_bulk(work)
    assert later.done.wait(30)
    assert later.cancelled == 64 and later.computed == 0
    assert redis_client.hlen(job_results_key(job_id)) == 1


class _NegativeFails:
    """The digits model, raising on any batch that holds a negative value: a batch with
    such rows is run again row by row, and only those rows fail."""

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner

    def run(self, x: np.ndarray) -> np.ndarray:
        if (x < 0).any():
            raise ValueError("negative input")
        return self.runner.run(x)

    def __getattr__(self, name: str) -> object:
        return getattr(self.runner, name)


def test_bulk_rows_the_model_failed_on_fail_alone(
    redis_client: redis.Redis, memcached_server: MemcachedServer
) -> None:
    cache = Cache(memcached_server.address, timeout_ms=500, ttl_s=60)
    batcher = _batcher(redis_client, cache, _NegativeFails)
    cfg, runner = batcher.cfg, batcher.runner
    batcher.start()
    try:
        job_id = _job(redis_client)
        ticket, items, work = _items(batcher, job_id, 100, seed=5)
        bad = [5, 70]
        for i in bad:
            work.rows[i] = -work.rows[i]
        batcher.submit_bulk(work)
        assert ticket.done.wait(30)
        assert (ticket.computed, ticket.failed, ticket.unrecorded) == (98, 2, 0)
        record = redis_client.hgetall(job_key(job_id))
        assert (record[b"done"], record[b"failed"]) == (b"98", b"2")
        results = redis_client.hgetall(job_results_key(job_id))
        for i, item in enumerate(items):
            reply = envelope_pb2.Reply.FromString(results[str(item.job_index).encode()])
            if i in bad:
                assert (
                    reply.status == envelope_pb2.Reply.STATUS_INTERNAL
                    and "failed on this input" in reply.error
                )
                continue
            assert reply.status == envelope_pb2.Reply.STATUS_OK
            # Each row's own answer: the same probabilities as the model gives it alone.
            alone = runner.run(work.rows[i : i + 1])[0]
            np.testing.assert_allclose(reply.scores.values, alone, rtol=1e-4, atol=1e-6)
        cached = cache.get_many([cache.keys.input_key(cfg, work.rows[i].data) for i in (4, 5, 6)])
        assert set(cached) == {cache.keys.input_key(cfg, work.rows[i].data) for i in (4, 6)}
    finally:
        batcher.stop()
        batcher.join(timeout=30)
        cache.close()


def test_stopping_writes_what_was_computed(
    redis_client: redis.Redis, memcached_server: MemcachedServer
) -> None:
    cache = Cache(memcached_server.address, timeout_ms=500, ttl_s=60)
    batcher = _batcher(redis_client, cache)
    batcher.start()
    try:
        job_id = _job(redis_client)
        ticket, _, work = _items(batcher, job_id, 256, seed=4)
        batcher.submit_bulk(work)
        batcher.stop()
        batcher.join(timeout=30)
        assert not batcher.is_alive()
        # Everything queued was computed, and written before the batcher ended.
        assert ticket.done.is_set() and ticket.computed == 256
        assert redis_client.hlen(job_results_key(job_id)) == 256
    finally:
        cache.close()


def test_the_runners_compiled_variants_agree_and_each_batch_size_gets_one() -> None:
    cfg = Repository.load(ROOT / "models").resolve("digits", 0)
    runner = ModelRunner(cfg, pick_device("cpu"))
    assert [v.name for v in runner.variants] == ["frozen", "optimized"]
    runner.warm_up(repeats=1)
    names = {v.name for v in runner.variants}
    assert all(runner.variant_for(n) in names for n in range(1, cfg.max_batch_size + 1))
    x = np.random.default_rng(9).random((cfg.max_batch_size, *cfg.input_shape), dtype=np.float32)
    outputs = [v.run(x) for v in runner.variants]
    for out in outputs:
        assert out.shape == (len(x), len(cfg.labels))
        np.testing.assert_allclose(out, outputs[0], atol=1e-5)
    np.testing.assert_allclose(runner.run(x[:3]), outputs[0][:3], atol=1e-5)
