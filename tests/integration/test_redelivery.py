"""At-least-once execution, exactly-once results: a worker SIGKILLed mid-job loses nothing,
nor does a Redis that crashes mid-job and comes back with its data; two workers share
a job without computing any item twice."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import redis

from bench.stack import free_port, wait_port
from inferpool.client import Client, Job
from inferpool.jobs import TERMINAL, state_name
from inferpool.names import bulk_queue_name, job_key
from inferpool.v1 import jobs_pb2
from tests.servers import (
    ApiThread,
    MemcachedServer,
    Proc,
    RedisServer,
    Worker,
    _binary,
    stack_settings,
    wait_until,
)

pytestmark = pytest.mark.timeout(240)


def test_sigkill_mid_job_then_new_worker_completes_it_exactly_once(
    fresh_redis: RedisServer, fresh_memcached: MemcachedServer, logdir: Path
) -> None:
    # Small chunks: the job spans many messages. The default lease brings the chunks the
    # killed worker held back within seconds.
    settings = stack_settings(fresh_redis, fresh_memcached, bulk_chunk_items=8, bulk_prefetch_chunks=4)
    r = redis.Redis.from_url(fresh_redis.url)
    first = Worker(settings, logdir)
    api = ApiThread(settings)
    second: Worker | None = None
    try:
        # The kill comes once 1,000 items are done, and must land before all are: 5,000
        # items of margin (a worker does ~30k/s, and a loaded machine may be slow to poll).
        items = 6000
        x = np.random.default_rng(11).random((items, 1, 28, 28), dtype=np.float32)
        with Client(api.target) as client:
            job = client.submit(x, "digits")

            def underway() -> bool:
                return int(r.hget(job_key(job.id), "done") or 0) >= 1000

            wait_until(underway, 60, "a thousand items to be done", poll_s=0.001)
            first.kill()
            done_at_kill = int(r.hget(job_key(job.id), "done") or 0)
            assert done_at_kill < items, "the job finished before the kill: nothing was tested"
            assert _held(r) > 0, "the killed worker held no unacknowledged chunk"

            second = Worker(settings, logdir)
            try:
                final = job.wait(timeout_s=60)
            except TimeoutError as exc:
                raise AssertionError(
                    f"job did not complete; broker state: {_broker_state(r, job.id)}"
                ) from exc
            assert state_name(final.state) == "SUCCEEDED", final
            counts = (final.counts.total, final.counts.done, final.counts.failed)
            failed = [r for r in job.results() if not r.ok][:3]
            assert counts == (items, items, 0), (final, failed)
            results = list(job.results())
            assert [res.index for res in results] == list(range(items))  # none missing, none twice
            # The new worker computed at least what was left (more when it redid chunks the
            # first one had computed but not acknowledged).
            assert second.stats()["items_computed"] >= items - done_at_kill
            # Chunks are acknowledged after their results are written, so shortly after.
            wait_until(lambda: _held(r) == 0, 10, "every chunk to be acknowledged")
    finally:
        api.stop()
        if second is not None:
            second.stop()
        first.stop()
        r.close()


def _held(r: redis.Redis) -> int:
    """Chunks in any consumer's processing list: taken, not yet acknowledged."""
    return sum(int(r.llen(key)) for key in r.scan_iter("inferpool:bulk:processing:*"))


def _broker_state(r: redis.Redis, job_id: str) -> dict[str, object]:
    return {
        "job": r.hgetall(job_key(job_id)),
        "bulk_queue": r.llen("inferpool.digits.bulk"),
        "held": _held(r),
        "consumers": r.hgetall("inferpool:bulk:consumers"),
        "leases": sorted(k.decode() for k in r.scan_iter("inferpool:bulk:lease:*")),
        "now": time.time(),
    }


class DurableRedisServer(RedisServer):
    """redis-server writing every command to its append-only file before answering it,
    so that one SIGKILLed and started again on the same port and directory comes back
    with everything it acknowledged (a crash, not a flush)."""

    def __init__(self, logdir: Path, directory: Path, port: int) -> None:
        self.port = port
        directory.mkdir(parents=True, exist_ok=True)
        args = [_binary("redis-server"), "--bind", "127.0.0.1", "--port", str(port), "--save", ""]
        args += ["--appendonly", "yes", "--appendfsync", "always", "--dir", str(directory)]
        Proc.__init__(self, args, logdir / f"redis-durable-{port}.log")
        self.ready(lambda: wait_port(self.port, 10, self.popen))


def _loaded(r: redis.Redis) -> bool:
    try:
        return bool(r.ping())
    except redis.RedisError:  # BusyLoadingError while it replays its append-only file
        return False


def _follow(job: Job, timeout_s: float) -> jobs_pb2.Job:
    """The job's final status, asked again while the API cannot reach Redis (bounded)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            status = job.status(timeout_s=5)
            if state_name(status.state) in TERMINAL:
                return status
        except grpc.RpcError as exc:
            if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job.id} did not end within {timeout_s}s")
        time.sleep(0.1)  # polling rate, not an ordering


def test_redis_crash_mid_job_then_job_completes_exactly_once(tmp_path: Path, logdir: Path) -> None:
    port = free_port()
    durable = DurableRedisServer(logdir, tmp_path / "redis", port)
    restarted: DurableRedisServer | None = None
    settings = stack_settings(durable, None, bulk_chunk_items=32, bulk_prefetch_chunks=4)
    r = redis.Redis.from_url(durable.url)
    worker = Worker(settings, logdir)
    api = ApiThread(settings)
    try:
        items = 6000
        x = np.random.default_rng(13).random((items, 1, 28, 28), dtype=np.float32)
        with Client(api.target) as client:
            job = client.submit(x, "digits")

            def underway() -> bool:
                return int(r.hget(job_key(job.id), "done") or 0) >= 500

            wait_until(underway, 60, "500 items to be done", poll_s=0.001)
            durable.kill()
            r.close()
            restarted = DurableRedisServer(logdir, tmp_path / "redis", port)
            r = redis.Redis.from_url(restarted.url)
            wait_until(lambda: _loaded(r), 30, "the restarted Redis to load its data")
            # A crash, not a flush: the job came back with what was done before it.
            done_after = int(r.hget(job_key(job.id), "done") or 0)
            assert 500 <= done_after < items, done_after

            final = _follow(job, 120)
            assert state_name(final.state) == "SUCCEEDED", final
            assert (final.counts.total, final.counts.done, final.counts.failed) == (items, items, 0)
            results = list(job.results())
            assert [res.index for res in results] == list(range(items))  # none missing, none twice
            assert all(res.ok and res.classes for res in results)
            # Nothing left behind: every chunk acknowledged, nothing queued.
            wait_until(lambda: _held(r) == 0, 10, "every chunk to be acknowledged")
            assert r.llen(bulk_queue_name("digits")) == 0
    finally:
        api.stop()
        worker.stop()
        r.close()
        if restarted is not None:
            restarted.stop()
        durable.stop()


def test_two_live_workers_share_a_job_exactly_once(fresh_redis: RedisServer, logdir: Path) -> None:
    # No Memcached: every item is computed by one of the two workers.
    settings = stack_settings(fresh_redis, None, bulk_chunk_items=32, bulk_prefetch_chunks=2)
    first = Worker(settings, logdir)
    second = Worker(settings, logdir)
    api = ApiThread(settings)
    r = redis.Redis.from_url(fresh_redis.url)
    try:
        items, chunk = 8000, 32
        x = np.random.default_rng(14).random((items, 1, 28, 28), dtype=np.float32)
        with Client(api.target) as client:
            job = client.submit(x, "digits")
            final = job.wait(timeout_s=120)
            assert state_name(final.state) == "SUCCEEDED", final
            assert (final.counts.total, final.counts.done, final.counts.failed) == (items, items, 0)
            results = list(job.results())
            assert [res.index for res in results] == list(range(items))
            wait_until(lambda: _held(r) == 0, 10, "every chunk to be acknowledged")
        stats = [first.stats(), second.stats()]
        # Each chunk taken and acknowledged once, each item computed once, between them.
        assert sum(s["chunks_done"] for s in stats) == items // chunk, stats
        assert sum(s["items_computed"] for s in stats) == items, stats
        assert all(s["chunks_done"] > 0 for s in stats), stats  # shared, not one doing it all
    finally:
        api.stop()
        first.stop()
        second.stop()
        r.close()
