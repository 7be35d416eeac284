"""Watching a bulk job: its state now and on every change, looked at as often as its
pace calls for, until it ends or the watch's own bound passes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from inferpool import jobs
from inferpool.v1 import jobs_pb2

# The shortest pause between two looks at a job being watched (next_look_s).
WATCH_MIN_INTERVAL_S = 0.01
# A watched job that does not change is looked at less and less often, up to this.
WATCH_IDLE_MAX_INTERVAL_S = 1.0


async def watch_job(
    load: Callable[[], Awaitable[jobs_pb2.Job]], interval_s: float, max_duration_s: float
) -> AsyncIterator[jobs_pb2.Job]:
    """Yields the job now and on every change, until it ends or max_duration_s passes
    (the caller's deadline bounds the whole stream too). A job that does not change is
    looked at less and less often, up to WATCH_IDLE_MAX_INTERVAL_S apart."""
    ends = time.monotonic() + max_duration_s
    last: tuple[object, ...] | None = None
    previous: tuple[float, int] | None = None  # when, and how many items had finished
    idle_looks = 0
    while True:
        job = await load()
        key = (job.state, job.counts.done, job.counts.failed, job.counts.total)
        if key != last:
            last = key
            idle_looks = 0
            yield job
        else:
            idle_looks += 1
        if jobs.state_name(job.state) in jobs.TERMINAL:
            return
        now, finished = time.time(), job.counts.done + job.counts.failed
        if previous is None and job.HasField("started"):
            # The first look has no look before it: the pace since the job started.
            previous = (job.started.ToMilliseconds() / 1000, 0)
        pause = next_look_s(interval_s, job.counts.total, finished, now, previous)
        if idle_looks:
            pause = max(pause, min(WATCH_IDLE_MAX_INTERVAL_S, interval_s * 2 ** min(idle_looks, 8)))
        left = ends - time.monotonic()
        if left <= 0:
            return  # bounded: the client watches again if it still wants to
        await asyncio.sleep(min(pause, left))
        previous = (now, finished)


def next_look_s(
    interval_s: float, total: int, finished: int, now: float, previous: tuple[float, int] | None
) -> float:
    """When a watch looks at its job next: after interval_s, or sooner when the job's
    pace since the previous look (time, items finished) says it ends sooner. Its end is
    then seen within WATCH_MIN_INTERVAL_S rather than up to a whole interval later (half
    an interval on average: 10% of a 1 s job). A job that made no progress since the
    previous look, or whose total is not known yet (0 until the upload ends), is looked
    at after the full interval."""
    if previous is None or not total or finished <= previous[1] or now <= previous[0]:
        return interval_s
    rate = (finished - previous[1]) / (now - previous[0])
    return min(interval_s, max(WATCH_MIN_INTERVAL_S, (total - finished) / rate))
