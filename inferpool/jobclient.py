"""Bulk job handles for the inferpool.v1 clients: `Job` (blocking) and `AsyncJob` (asyncio).

`Client.submit(...)` returns a `Job`: `job.wait()` follows its progress (a server
stream, no polling), `job.results()` pages through the results in index order,
`job.cancel()` stops it. `AsyncJob` has the same calls as coroutines.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Iterator
from types import TracebackType
from typing import TYPE_CHECKING

import grpc

# Only what the wire contract says (state names); the rest of inferpool.jobs is the server's
# Redis layout. The client must not import anything that needs the server's dependencies
# (tests/test_install.py checks it in a fresh venv).
from inferpool.jobs import TERMINAL, state_name
from inferpool.v1 import jobs_pb2

if TYPE_CHECKING:
    from inferpool.client import AsyncClient, Client


def created_id(response: jobs_pb2.SubmitJobResponse, n: int) -> str:
    """The new job's id, once the server's count of its items is known to be right."""
    if response.created and response.job.counts.total != n:
        # A server from before multi-row inputs failed each message's input as one item.
        raise RuntimeError(
            f"job {response.job_id}: the server counted {response.job.counts.total} items for "
            f"{n} inputs; it predates multi-row job inputs and needs an upgrade"
        )
    return response.job_id


class JobTimeout(TimeoutError):
    def __init__(self, job: jobs_pb2.Job | None, timeout_s: float | None) -> None:
        within = "" if timeout_s is None else f" within {timeout_s:g} s"
        if job is None:
            super().__init__(f"no status of the job came{within}")
        else:
            super().__init__(f"job still {state_name(job.state)}: it did not end{within}")
        self.job = job


def _changed(a: jobs_pb2.Job, b: jobs_pb2.Job) -> bool:
    return (a.state, a.counts.done, a.counts.failed, a.counts.total) != (
        b.state,
        b.counts.done,
        b.counts.failed,
        b.counts.total,
    )


class _Watch:
    """What `Job.wait` and `AsyncJob.wait` share: the deadline across the watch streams
    (the server ends each after its own bound), the last status, and when to stop.
    `with watch:` around one stream turns its running out of the caller's time into
    JobTimeout; other errors are the caller's."""

    def __init__(
        self, job_id: str, timeout_s: float | None, on_update: Callable[[jobs_pb2.Job], None] | None
    ) -> None:
        self.request = jobs_pb2.WatchJobRequest(job_id=job_id)
        self.timeout_s = timeout_s
        self.on_update = on_update
        self.ends = None if timeout_s is None else time.monotonic() + timeout_s
        self.last: jobs_pb2.Job | None = None
        self.streams = 0

    def left(self) -> float | None:
        """The next stream's deadline in seconds (None: unbounded); JobTimeout when spent."""
        if self.ends is None:
            return None
        left = self.ends - time.monotonic()
        if left <= 0:
            raise JobTimeout(self.last, self.timeout_s)
        return left

    def see(self, job: jobs_pb2.Job) -> None:
        if self.on_update is not None and (self.last is None or _changed(self.last, job)):
            self.on_update(job)
        self.last = job

    def again(self) -> bool:
        """Whether to open a(nother) stream: not once the job has ended."""
        self.streams += 1
        if self.streams == 1:
            return True
        if self.last is None:  # the stream ended before the job's first status
            raise JobTimeout(None, self.timeout_s)
        return state_name(self.last.state) not in TERMINAL

    def final(self) -> jobs_pb2.Job:
        assert self.last is not None  # again() stops only on a terminal status
        return self.last

    def __enter__(self) -> _Watch:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if isinstance(exc, grpc.RpcError) and exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            raise JobTimeout(self.last, self.timeout_s) from None


class _Pages:
    """The GetJob requests that page through a job's results, in index order."""

    def __init__(self, job_id: str, page_size: int, include_scores: bool) -> None:
        self.request = jobs_pb2.GetJobRequest(job_id=job_id, limit=page_size, include_scores=include_scores)
        self.offset: int | None = 0

    def next(self) -> jobs_pb2.GetJobRequest | None:
        """The next page's request; None after the last page."""
        if self.offset is None:
            return None
        self.request.offset = self.offset
        return self.request

    def read(self, page: jobs_pb2.Job) -> jobs_pb2.Job:
        """Notes where the page after `page` starts."""
        done = page.next_offset >= page.counts.total or page.next_offset == self.offset
        self.offset = None if done else page.next_offset
        return page


class Job:
    """A handle on a bulk job; cheap to create from an id (`Client.job(id)`)."""

    def __init__(self, client: Client, job_id: str) -> None:
        self.client = client
        self.id = job_id

    def status(self, timeout_s: float = 10.0) -> jobs_pb2.Job:
        job: jobs_pb2.Job = self.client.jobs.GetJob(jobs_pb2.GetJobRequest(job_id=self.id), timeout=timeout_s)
        return job

    def wait(
        self, timeout_s: float | None = None, on_update: Callable[[jobs_pb2.Job], None] | None = None
    ) -> jobs_pb2.Job:
        """Follows the job until it ends and returns its final status; raises JobTimeout
        when it has not ended within `timeout_s` (None: wait as long as it takes). The
        server ends a watch after its own bound; the watch is then opened again."""
        watch = _Watch(self.id, timeout_s, on_update)
        while watch.again():
            with watch:
                for job in self.client.jobs.WatchJob(watch.request, timeout=watch.left()):
                    watch.see(job)
        return watch.final()

    def results(
        self, page_size: int = 1000, include_scores: bool = False, timeout_s: float = 30.0
    ) -> Iterator[jobs_pb2.JobResult]:
        """Every finished item's result, in index order, one page per call."""
        pages = _Pages(self.id, page_size, include_scores)
        while (request := pages.next()) is not None:
            yield from pages.read(self.client.jobs.GetJob(request, timeout=timeout_s)).results

    def cancel(self, timeout_s: float = 10.0) -> jobs_pb2.Job:
        job: jobs_pb2.Job = self.client.jobs.CancelJob(
            jobs_pb2.CancelJobRequest(job_id=self.id), timeout=timeout_s
        )
        return job


class AsyncJob:
    """`Job` for `AsyncClient`: the same calls, as coroutines (`results` is an async iterator)."""

    def __init__(self, client: AsyncClient, job_id: str) -> None:
        self.client = client
        self.id = job_id

    async def status(self, timeout_s: float = 10.0) -> jobs_pb2.Job:
        job: jobs_pb2.Job = await self.client.jobs.GetJob(
            jobs_pb2.GetJobRequest(job_id=self.id), timeout=timeout_s
        )
        return job

    async def wait(
        self, timeout_s: float | None = None, on_update: Callable[[jobs_pb2.Job], None] | None = None
    ) -> jobs_pb2.Job:
        """As `Job.wait`: the final status, or JobTimeout after `timeout_s` (None: no bound)."""
        watch = _Watch(self.id, timeout_s, on_update)
        while watch.again():
            with watch:
                async for job in self.client.jobs.WatchJob(watch.request, timeout=watch.left()):
                    watch.see(job)
        return watch.final()

    async def results(
        self, page_size: int = 1000, include_scores: bool = False, timeout_s: float = 30.0
    ) -> AsyncIterator[jobs_pb2.JobResult]:
        """Every finished item's result, in index order, one page per call."""
        pages = _Pages(self.id, page_size, include_scores)
        while (request := pages.next()) is not None:
            for result in pages.read(await self.client.jobs.GetJob(request, timeout=timeout_s)).results:
                yield result

    async def cancel(self, timeout_s: float = 10.0) -> jobs_pb2.Job:
        job: jobs_pb2.Job = await self.client.jobs.CancelJob(
            jobs_pb2.CancelJobRequest(job_id=self.id), timeout=timeout_s
        )
        return job
