"""At-least-once execution, exactly-once results: a worker SIGKILLed mid-job loses nothing."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import redis

from inferpool.client import Client
from inferpool.jobs import state_name
from inferpool.names import job_key
from tests.servers import ApiThread, MemcachedServer, RedisServer, Worker, stack_settings, wait_until

pytestmark = pytest.mark.timeout(240)


def test_sigkill_mid_job_then_new_worker_completes_it_exactly_once(
    fresh_redis: RedisServer, fresh_memcached: MemcachedServer, logdir: Path
) -> None:
    # Small chunks and a short visibility timeout: the job spans many messages, and the
    # chunks the killed worker held come back within seconds instead of minutes.
    settings = stack_settings(
        fresh_redis, fresh_memcached, bulk_chunk_items=8, bulk_prefetch_chunks=4, bulk_lease_s=3.0
    )
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
