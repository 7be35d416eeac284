"""Several API replicas on one Redis, behind a real HAProxy: calls spread, a draining
replica stops getting calls before it stops, a killed one costs only its calls in
flight (UNAVAILABLE, answered on retry), and what each process keeps to itself
(reply list, flight locks, idempotency keys, callers) stays right across replicas.

Every answer is checked against the model run here (torch), not only its status.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from bench.proxies import ProxyProcess
from inferpool.client import Client
from inferpool.jobs import state_name
from tests.servers import (
    ROOT,
    ApiProcess,
    ApiThread,
    MemcachedServer,
    RedisServer,
    Worker,
    stack_settings,
    wait_until,
)

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning"),
]

WINDOW = 8  # calls the load keeps in flight


@pytest.fixture(scope="module")
def inputs() -> tuple[np.ndarray, np.ndarray]:
    """Inputs whose top class is clear (margin > 0.1), and that class, from the model here."""
    x = np.load(ROOT / "models" / "digits" / "heldout.npz")["x"].astype(np.float32)
    module = torch.jit.load(str(ROOT / "models" / "digits" / "1" / "model.pt")).eval()
    with torch.inference_mode():
        p = torch.softmax(module(torch.from_numpy(x)).float(), dim=1).numpy()
    top2 = np.sort(p, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 0.1
    return x[clear], p[clear].argmax(axis=1)


class Load:
    """Classify calls through `target` from a thread, WINDOW in flight, until stop().
    Each input is new (a tiny distinct offset), so each call is a miss a worker answers."""

    def __init__(self, target: str, inputs: tuple[np.ndarray, np.ndarray], max_attempts: int = 4) -> None:
        self.x, self.want = inputs
        self.client = Client(target, max_attempts=max_attempts)
        self.results: list[tuple[int, grpc.StatusCode, int]] = []  # (call, code, top class)
        self.sent: dict[int, np.ndarray] = {}
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._n = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def item(self, i: int) -> np.ndarray:
        k = i % len(self.x)
        # Offsets far below what moves a clear top class; distinct per call.
        return self.x[k : k + 1] + np.float32(1e-6) * (1 + i // len(self.x))

    def _run(self) -> None:
        pending: list[tuple[int, grpc.Future]] = []
        while not self._stop.is_set() or pending:
            while not self._stop.is_set() and len(pending) < WINDOW:
                i, self._n = self._n, self._n + 1
                self.sent[i] = self.item(i)
                pending.append((i, self.client.classify_future(self.sent[i], "digits", timeout_s=30)))
            i, future = pending.pop(0)
            try:
                response = future.result()
                self.results.append((i, grpc.StatusCode.OK, response.classes[0].index))
            except grpc.RpcError as exc:
                self.results.append((i, exc.code(), -1))
                self.errors.append(f"{i} {exc.code().name} {exc.details()} {time.monotonic():.2f}")

    def wait_for(self, more: int, timeout_s: float = 60) -> None:
        target = len(self.results) + more
        wait_until(lambda: len(self.results) >= target, timeout_s, f"{more} more answers")

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(60)
        self.client.close()

    def wrong(self) -> list[tuple[int, int, int]]:
        """(call, answer, expected) of every OK answer that is not the model's."""
        return [
            (i, top, int(self.want[i % len(self.x)]))
            for i, code, top in self.results
            if code == grpc.StatusCode.OK and top != self.want[i % len(self.x)]
        ]


@pytest.fixture
def replicas(
    redis_server: RedisServer, memcached_server: MemcachedServer, worker: Worker, logdir: Path
) -> Iterator[Callable[..., list[ApiProcess]]]:
    started: list[ApiProcess] = []

    def start(n: int, **env: str) -> list[ApiProcess]:
        settings = stack_settings(redis_server, memcached_server)
        for _ in range(n):
            started.append(ApiProcess(settings, logdir, **env))
        return started[-n:]

    yield start
    for proc in started:
        proc.kill()


@pytest.fixture
def proxy(logdir: Path) -> Iterator[Callable[[list[ApiProcess]], ProxyProcess]]:
    started: list[ProxyProcess] = []

    def start(backends: list[ApiProcess]) -> ProxyProcess:
        started.append(ProxyProcess("haproxy", [b.target for b in backends], logdir / "haproxy.log"))
        p = started[-1]
        wait_until(lambda: all(p.servers_up().values()), 30, "HAProxy to see every replica up")
        return p

    yield start
    for p in started:
        p.stop()


def test_calls_spread_across_replicas(
    replicas: Callable[..., list[ApiProcess]],
    proxy: Callable[[list[ApiProcess]], ProxyProcess],
    inputs: tuple[np.ndarray, np.ndarray],
) -> None:
    apis = replicas(3)
    lb = proxy(apis)
    load = Load(lb.target, inputs)
    try:
        load.wait_for(90)
    finally:
        load.stop()
    assert {code for _, code, _ in load.results} == {grpc.StatusCode.OK}, load.errors[:5]
    assert load.wrong() == []
    counts = [api.answered() for api in apis]
    assert sum(counts) == len(load.results)
    # Round-robin per call: each replica gets its share, give or take the window.
    assert min(counts) >= len(load.results) / 3 - WINDOW, counts


def test_sigterm_drains_a_replica_without_losing_a_call(
    replicas: Callable[..., list[ApiProcess]],
    proxy: Callable[[list[ApiProcess]], ProxyProcess],
    inputs: tuple[np.ndarray, np.ndarray],
) -> None:
    # A long drain, ended by a second signal once the proxy has moved away: the test
    # waits on what happens, not on a time.
    stopping, staying = replicas(2, INFERPOOL_DRAIN_S="120")
    lb = proxy([stopping, staying])
    load = Load(lb.target, inputs)
    try:
        wait_until(lambda: stopping.answered() >= 5 and staying.answered() >= 5, 60, "both replicas serving")
        stopping.popen.send_signal(signal.SIGTERM)
        x, want = inputs
        # A bare channel (no service config, so no client-side health checking).
        with Client(channel=grpc.insecure_channel(stopping.target)) as direct:
            wait_until(lambda: direct.health() == "NOT_SERVING", 30, "the replica to report NOT_SERVING")
            # Draining, not stopped: a call that reaches it is still answered.
            assert direct.classify(x[:1] + np.float32(0.5e-6), "digits").classes[0].index == want[0]
        # inferpool's clients given the replicas (not a proxy) watch their health and send a
        # draining one nothing more.
        with Client(f"ipv4:{stopping.target}", max_attempts=1) as client, pytest.raises(grpc.RpcError) as err:
            client.classify(x[:1], "digits")
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "unhealthy" in (err.value.details() or "")
        wait_until(lambda: not lb.servers_up()["api0"], 30, "HAProxy to take the replica out")
        before = stopping.answered()
        load.wait_for(40)
        # Only calls already on their way when the proxy took it out may land there.
        assert stopping.answered() - before <= WINDOW
        stopping.popen.send_signal(signal.SIGTERM)  # ends the drain
        assert stopping.popen.wait(30) == 0
        load.wait_for(20)
    finally:
        load.stop()
    assert {code for _, code, _ in load.results} == {grpc.StatusCode.OK}, load.errors[:5]
    assert load.wrong() == []


def test_sigkill_costs_only_the_calls_in_flight(
    replicas: Callable[..., list[ApiProcess]],
    proxy: Callable[[list[ApiProcess]], ProxyProcess],
    inputs: tuple[np.ndarray, np.ndarray],
) -> None:
    dying, living = replicas(2)
    lb = proxy([dying, living])
    load = Load(lb.target, inputs, max_attempts=1)  # no retries: the losses stay visible
    try:
        wait_until(lambda: dying.answered() >= 5 and living.answered() >= 5, 60, "both replicas serving")
        dying.kill()
        wait_until(lambda: not lb.servers_up()["api0"], 30, "HAProxy to take the dead replica out")
        load.wait_for(40)
    finally:
        load.stop()
    failed = [(i, code) for i, code, _ in load.results if code != grpc.StatusCode.OK]
    assert {code for _, code in failed} <= {grpc.StatusCode.UNAVAILABLE}, failed
    assert len(failed) <= WINDOW, failed
    assert load.wrong() == []
    # Each lost call succeeds when sent again, with the right answer.
    x, want = inputs
    with Client(lb.target) as client:
        for i, _ in failed:
            assert client.classify(load.sent[i], "digits").classes[0].index == want[i % len(x)]


# --- What each process keeps to itself, with two replicas on one Redis.


@pytest.fixture
def two_apis(
    redis_server: RedisServer, memcached_server: MemcachedServer, worker: Worker, tmp_path: Path
) -> Iterator[list[ApiThread]]:
    tokens = tmp_path / "tokens"
    tokens.write_text("alice:alice-token-0123456789abcdef\nbob:bob-token-0123456789abcdef0\n")
    settings = stack_settings(redis_server, memcached_server, auth_tokens_file=str(tokens))
    apis = [ApiThread(settings), ApiThread(settings)]
    yield apis
    for api in apis:
        api.stop()


ALICE, BOB = "alice-token-0123456789abcdef", "bob-token-0123456789abcdef0"


def test_replies_and_single_flight_across_two_replicas(
    two_apis: list[ApiThread], worker: Worker, inputs: tuple[np.ndarray, np.ndarray]
) -> None:
    x, want = inputs
    assert two_apis[0].server.replies.key != two_apis[1].server.replies.key
    clients = [Client(api.target, token=ALICE) for api in two_apis]
    followed = [api.server.plane.counters.coalesced_remote for api in two_apis]
    try:
        for k in range(4):
            # The same new input through both replicas at once: each replica's callers get
            # the answer (through its own reply list or the cache), and at most one
            # computation per replica: a replica whose first call found no cache entry
            # and arrived after the other's flight ended (its lock freed) computes anew.
            item = x[k : k + 1] + np.float32(5.3e-6)  # an input no other test sends
            computed = worker.stats()["items_computed"]
            calls = [c.classify_future(item, "digits", timeout_s=30) for _ in range(4) for c in clients]
            assert {f.result().classes[0].index for f in calls} == {want[k]}
            assert computed + 1 <= worker.stats()["items_computed"] <= computed + 2
        # Calls that overlapped a flight on the other replica followed it instead of
        # computing: without the cross-replica lock no replica ever follows.
        assert sum(api.server.plane.counters.coalesced_remote for api in two_apis) > sum(followed)
    finally:
        for c in clients:
            c.close()


def test_idempotency_and_callers_across_two_replicas(
    two_apis: list[ApiThread], inputs: tuple[np.ndarray, np.ndarray]
) -> None:
    x, want = inputs
    a_alice, b_alice = Client(two_apis[0].target, token=ALICE), Client(two_apis[1].target, token=ALICE)
    b_bob = Client(two_apis[1].target, token=BOB)
    try:
        key = f"scale-{time.time_ns()}"
        first = a_alice.submit(x[:10], "digits", idempotency_key=key)
        # The key is in Redis, not in the replica: the other replica returns the same job.
        again = b_alice.submit(x[:10], "digits", idempotency_key=key)
        assert again.id == first.id
        # Bob's same key is his own.
        assert b_bob.submit(x[:10], "digits", idempotency_key=key).id != first.id
        final = b_alice.job(first.id).wait(timeout_s=60)
        assert state_name(final.state) == "SUCCEEDED"
        assert [r.classes[0].index for r in b_alice.job(first.id).results()] == list(want[:10])
        # The job is Alice's on every replica: Bob gets NOT_FOUND through either.
        with pytest.raises(grpc.RpcError) as err:
            b_bob.job(first.id).status()
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        # A token is checked by every replica alike.
        with (
            Client(two_apis[1].target, token="nobody-0123456789abcdef0123") as stranger,
            pytest.raises(grpc.RpcError) as err,
        ):
            stranger.classify(x[:1], "digits")
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        for c in (a_alice, b_alice, b_bob):
            c.close()
