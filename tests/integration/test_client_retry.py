"""The clients' retry discipline against real grpc.aio servers that fail on purpose.

Each fake replica counts every attempt it receives, so the tests see what the client
really sent: retryable failures (UNAVAILABLE) are retried, others never; no attempt
starts after the caller's deadline; a submit is sent again only with the same
idempotency key, and a call the channel must not repeat is sent once.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator

import grpc
import numpy as np
import pytest

from inferpool.client import MAX_ATTEMPTS, AsyncClient, Client, submit_requests
from inferpool.v1 import inference_pb2, inference_pb2_grpc, jobs_pb2, jobs_pb2_grpc

CODES = [
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.DEADLINE_EXCEEDED,
]
CALLS = 12
FAIL_EVERY = 2  # calls 0, 2, 4, ...: half of them
FAILS_PER_CALL = 2  # under MAX_ATTEMPTS, so a retried call succeeds


class Flaky(inference_pb2_grpc.InferenceServiceServicer, jobs_pb2_grpc.JobServiceServicer):
    """A replica that fails the first `fails` attempts of every FAIL_EVERY-th call (by
    request id) with `code`; `hang_after` > 0 makes attempts past that number never answer."""

    def __init__(
        self, code: grpc.StatusCode = grpc.StatusCode.OK, fails: int = 0, hang_after: int = 0
    ) -> None:
        self.code, self.fails, self.hang_after = code, fails, hang_after
        self.attempts: collections.Counter[str] = collections.Counter()
        self.submits: list[str] = []  # each submit attempt's idempotency key
        self.jobs: dict[str, str] = {}
        self.cancelled = threading.Event()

    async def _fail_or_hang(self, n: int, failing: bool, context: grpc.aio.ServicerContext) -> None:
        if self.hang_after and n > self.hang_after:
            try:
                await asyncio.Event().wait()  # until the client's deadline cancels it
            finally:
                self.cancelled.set()
        if failing and n <= self.fails and self.code != grpc.StatusCode.OK:
            await context.abort(self.code, f"failing on purpose ({n})")

    async def Classify(
        self, request: inference_pb2.ClassifyRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.ClassifyResponse:
        self.attempts[request.request_id] += 1
        n = self.attempts[request.request_id]
        await self._fail_or_hang(n, int(request.request_id) % FAIL_EVERY == 0, context)
        return inference_pb2.ClassifyResponse(model=request.model, request_id=request.request_id)

    async def SubmitJobStream(
        self, request_iterator: AsyncIterator[jobs_pb2.SubmitJobRequest], context: grpc.aio.ServicerContext
    ) -> jobs_pb2.SubmitJobResponse:
        messages = [m async for m in request_iterator]
        key = messages[0].idempotency_key
        self.submits.append(key)
        # The job is recorded before the failure: the answer is what gets lost.
        created = not key or key not in self.jobs
        job_id = self.jobs.setdefault(key, f"{len(self.jobs):032x}") if key else f"{len(self.submits):032x}"
        await self._fail_or_hang(len(self.submits), True, context)
        total = sum(t.shape[0] for m in messages for t in m.inputs)
        return jobs_pb2.SubmitJobResponse(
            job_id=job_id,
            created=created,
            job=jobs_pb2.Job(job_id=job_id, counts=jobs_pb2.JobCounts(total=total)),
        )


class Replica:
    """A grpc.aio server on a free loopback port, on its own loop in a thread."""

    def __init__(self, servicer: Flaky) -> None:
        self.servicer = servicer
        self.loop = asyncio.new_event_loop()
        started = threading.Event()

        async def start() -> None:
            self.server = grpc.aio.server()
            inference_pb2_grpc.add_InferenceServiceServicer_to_server(servicer, self.server)
            jobs_pb2_grpc.add_JobServiceServicer_to_server(servicer, self.server)
            self.port = self.server.add_insecure_port("127.0.0.1:0")
            await self.server.start()

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            self.loop.run_until_complete(start())
            started.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        assert started.wait(10), "test server did not start"
        self.target = f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(0), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def replicas() -> Iterator[Callable[..., Replica]]:
    started: list[Replica] = []

    def start(servicer: Flaky) -> Replica:
        started.append(Replica(servicer))
        return started[-1]

    yield start
    for replica in started:
        replica.stop()


X = np.zeros((1, 1, 8, 8), dtype=np.float32)


def _classify_all(target: str, use_async: bool, timeout_s: float = 10.0) -> list[grpc.StatusCode]:
    """Sends CALLS classifies (request ids 0..CALLS-1) with the sync or async client;
    returns each call's outcome."""
    if not use_async:
        with Client(target) as client:
            codes = []
            for i in range(CALLS):
                try:
                    r = client.classify(X, "m", request_id=str(i), timeout_s=timeout_s)
                    assert r.request_id == str(i)
                    codes.append(grpc.StatusCode.OK)
                except grpc.RpcError as exc:
                    codes.append(exc.code())
            return codes

    async def run() -> list[grpc.StatusCode]:
        async with AsyncClient(target) as client:
            codes = []
            for i in range(CALLS):
                try:
                    r = await client.classify(X, "m", request_id=str(i), timeout_s=timeout_s)
                    assert r.request_id == str(i)
                    codes.append(grpc.StatusCode.OK)
                except grpc.RpcError as exc:
                    codes.append(exc.code())
            return codes

    return asyncio.run(run())


@pytest.mark.parametrize("use_async", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("code", CODES, ids=[c.name for c in CODES])
def test_only_unavailable_is_retried(
    replicas: Callable[..., Replica], code: grpc.StatusCode, use_async: bool
) -> None:
    flaky = Flaky(code, fails=FAILS_PER_CALL)
    codes = _classify_all(replicas(flaky).target, use_async)
    failing = [i for i in range(CALLS) if i % FAIL_EVERY == 0]
    if code == grpc.StatusCode.UNAVAILABLE:
        assert codes == [grpc.StatusCode.OK] * CALLS
        assert {i: flaky.attempts[str(i)] for i in failing} == {i: FAILS_PER_CALL + 1 for i in failing}
    else:
        assert [codes[i] for i in failing] == [code] * len(failing)
        assert {i: flaky.attempts[str(i)] for i in failing} == {i: 1 for i in failing}
    # The calls that did not fail were sent once, whatever the code.
    assert all(flaky.attempts[str(i)] == 1 for i in range(CALLS) if i not in failing)
    assert all(c == grpc.StatusCode.OK for i, c in enumerate(codes) if i not in failing)


def test_attempts_are_bounded(replicas: Callable[..., Replica]) -> None:
    flaky = Flaky(grpc.StatusCode.UNAVAILABLE, fails=100)
    codes = _classify_all(replicas(flaky).target, use_async=False)
    assert codes[0] == grpc.StatusCode.UNAVAILABLE
    assert flaky.attempts["0"] == MAX_ATTEMPTS


@pytest.mark.parametrize("use_async", [False, True], ids=["sync", "async"])
def test_no_attempt_after_the_deadline(replicas: Callable[..., Replica], use_async: bool) -> None:
    # The first attempt fails at once, the second never answers: the call must end at its
    # deadline, and no third attempt may follow.
    flaky = Flaky(grpc.StatusCode.UNAVAILABLE, fails=1, hang_after=1)
    replica = replicas(flaky)
    timeout_s = 1.0
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        if use_async:

            async def one() -> None:
                async with AsyncClient(replica.target) as client:
                    await client.classify(X, "m", request_id="0", timeout_s=timeout_s)

            asyncio.run(one())
        else:
            with Client(replica.target) as client:
                client.classify(X, "m", request_id="0", timeout_s=timeout_s)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started >= timeout_s
    assert flaky.cancelled.wait(10), "the hanging attempt was never cancelled"
    assert flaky.attempts["0"] == 2


@pytest.mark.parametrize("use_async", [False, True], ids=["sync", "async"])
def test_submit_retries_with_the_same_generated_key(
    replicas: Callable[..., Replica], use_async: bool
) -> None:
    # The first attempt records the job, then fails UNAVAILABLE (its answer lost): the
    # retry must carry the same key, so the server returns the job it already has.
    flaky = Flaky(grpc.StatusCode.UNAVAILABLE, fails=1)
    replica = replicas(flaky)
    inputs = np.zeros((3, 1, 8, 8), dtype=np.float32)
    if use_async:

        async def submit() -> str:
            async with AsyncClient(replica.target) as client:
                return (await client.submit(inputs, "m", timeout_s=10)).id

        job_id = asyncio.run(submit())
    else:
        with Client(replica.target) as client:
            job_id = client.submit(inputs, "m", timeout_s=10).id
    assert len(flaky.submits) == 2
    assert flaky.submits[0] and flaky.submits[0] == flaky.submits[1]
    assert flaky.jobs == {flaky.submits[0]: job_id}


@pytest.mark.parametrize(
    "code", [grpc.StatusCode.INTERNAL, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNKNOWN]
)
def test_submit_is_not_retried_on_other_codes(
    replicas: Callable[..., Replica], code: grpc.StatusCode
) -> None:
    flaky = Flaky(code, fails=1)
    replica = replicas(flaky)
    with Client(replica.target) as client, pytest.raises(grpc.RpcError) as err:
        client.submit(np.zeros((2, 1, 8, 8), dtype=np.float32), "m", timeout_s=10)
    assert err.value.code() == code
    assert len(flaky.submits) == 1


def test_submit_retries_stop_at_the_deadline(replicas: Callable[..., Replica]) -> None:
    flaky = Flaky(grpc.StatusCode.UNAVAILABLE, fails=1, hang_after=1)
    replica = replicas(flaky)
    with Client(replica.target) as client, pytest.raises(grpc.RpcError) as err:
        client.submit(np.zeros((2, 1, 8, 8), dtype=np.float32), "m", timeout_s=1.0)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert flaky.cancelled.wait(10)
    assert len(flaky.submits) == 2 and flaky.submits[0] == flaky.submits[1]


def test_a_raw_submit_on_the_clients_channel_is_sent_once(replicas: Callable[..., Replica]) -> None:
    # A submit without a key is not idempotent: the channel's retry policy must leave it
    # alone, even on UNAVAILABLE.
    flaky = Flaky(grpc.StatusCode.UNAVAILABLE, fails=1)
    replica = replicas(flaky)
    with Client(replica.target) as client, pytest.raises(grpc.RpcError) as err:
        client.jobs.SubmitJobStream(
            submit_requests(np.zeros((2, 1, 8, 8), dtype=np.float32), "m"), timeout=10
        )
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert flaky.submits == [""]


def test_round_robin_over_every_address_and_retry_elsewhere(replicas: Callable[..., Replica]) -> None:
    healthy = [replicas(Flaky()), replicas(Flaky())]
    both = "ipv4:" + ",".join(r.target for r in healthy)
    assert _classify_all(both, use_async=False) == [grpc.StatusCode.OK] * CALLS
    counts = [sum(r.servicer.attempts.values()) for r in healthy]
    assert sum(counts) == CALLS and min(counts) >= CALLS // 2 - 1, counts

    # One replica refuses every call with UNAVAILABLE (as a draining or dying one does):
    # every call still succeeds, its retry landing on the other replica.
    down, up = replicas(Flaky(grpc.StatusCode.UNAVAILABLE, fails=100)), replicas(Flaky())
    with Client(f"ipv4:{down.target},{up.target}") as client:
        # Even request ids only: the failing replica fails those.
        answers = [client.classify(X, "m", request_id=str(2 * i), timeout_s=10) for i in range(CALLS)]
    assert [a.request_id for a in answers] == [str(2 * i) for i in range(CALLS)]
    assert sum(down.servicer.attempts.values()) >= 1
    assert sum(up.servicer.attempts.values()) == CALLS
