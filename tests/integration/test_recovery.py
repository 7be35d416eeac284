"""Recovery: how soon the stack answers again after Redis restarts; what a worker does
with work for a model version it does not serve; one worker serving two models."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import redis
import torch

from inferpool.bulkqueue import BulkQueues, processing_key
from inferpool.client import Client
from inferpool.jobs import state_name
from inferpool.names import bulk_queue_name
from tests.servers import ApiThread, RedisServer, Worker, stack_settings, wait_until, write_model

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.timeout(180),
    # The repository format is TorchScript, which torch 2.13 marks deprecated.
    pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning"),
]

# How long Redis stays down. Long enough that a client backing off in steps of seconds
# (kombu's stock reconnect waits 2, 4, 6 ... s) is asleep when Redis comes back.
OUTAGE_S = 3.0
# From Redis answering PING again to the first Classify answered (measured on a loaded
# 2-core machine: 0.13-0.25 s; 2.8-3.1 s while workers reconnected at kombu's stock pace).
FIRST_OK_BOUND_S = 1.0
# Classify calls are sent this often while waiting for the first OK: the resolution of
# the measurement.
PROBE_EVERY_S = 0.05


def _answers_ping(url: str) -> bool:
    r = redis.Redis.from_url(url, socket_connect_timeout=0.2, socket_timeout=0.2, retry=None)
    try:
        return bool(r.ping())
    except redis.RedisError:
        return False
    finally:
        r.close()


def test_first_ok_soon_after_redis_restarts(fresh_redis: RedisServer, logdir: Path) -> None:
    # No Memcached: every probe is a new input that only a worker can answer.
    settings = stack_settings(fresh_redis, None, health_interval_s=0.2)
    worker = Worker(settings, logdir)
    api = ApiThread(settings)
    restarted: RedisServer | None = None
    rng = np.random.default_rng(5)
    try:
        with Client(api.target) as client:
            first = client.classify(rng.random((1, 1, 28, 28), dtype=np.float32), "digits", timeout_s=10)
            assert first.classes and not first.cached
            fresh_redis.kill()
            wait_until(lambda: client.health() == "NOT_SERVING", 5, "health to turn NOT_SERVING")
            # Redis stays down for the outage: the scenario, not an ordering.
            time.sleep(OUTAGE_S)
            restarted = RedisServer(logdir, port=fresh_redis.port)
            wait_until(lambda: _answers_ping(restarted.url), 10, "the restarted Redis to answer PING")
            t_up = time.monotonic()
            # A new call every PROBE_EVERY_S, each with a deadline long enough to be
            # answered once the path is back: the first to complete OK marks recovery.
            calls: list[grpc.Future] = []
            answered_at: list[float] = []

            def record(call: grpc.Future) -> None:
                if call.exception() is None:
                    answered_at.append(time.monotonic())

            deadline = t_up + 30
            while not answered_at and time.monotonic() < deadline:
                image = rng.random((1, 1, 28, 28), dtype=np.float32)
                call = client.classify_future(image, "digits", timeout_s=2.0)
                call.add_done_callback(record)
                calls.append(call)
                time.sleep(PROBE_EVERY_S)  # the probing rate, not an ordering
            first_ok = min(answered_at, default=None)
            assert first_ok is not None, "no Classify answered within 30 s of Redis answering again"
            elapsed = first_ok - t_up
            print(f"first OK {elapsed * 1000:.0f} ms after Redis answered PING again")
            for call in calls:  # none is left running past the test
                with contextlib.suppress(grpc.RpcError):
                    call.result()
            assert elapsed <= FIRST_OK_BOUND_S, f"first OK {elapsed:.2f}s after Redis answered again"
            # Recovered, not lucky: the next ones are answered too.
            for _ in range(3):
                again = client.classify(rng.random((1, 1, 28, 28), dtype=np.float32), "digits", timeout_s=2)
                assert again.classes and not again.cached
    finally:
        api.stop()
        worker.stop()
        if restarted is not None:
            restarted.stop()


def _copy_digits(repository: Path, version: int) -> None:
    target = repository / "digits" / str(version)
    shutil.copytree(ROOT / "models" / "digits" / "1", target)
    config = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**config, "version": version}))


def test_version_the_worker_does_not_serve_fails_clearly(
    fresh_redis: RedisServer, logdir: Path, tmp_path: Path
) -> None:
    # The API knows digits v1 and v2; the worker was deployed with v1 only.
    worker_settings = stack_settings(fresh_redis, None)
    api_repository = tmp_path / "api-models"
    _copy_digits(api_repository, 1)
    _copy_digits(api_repository, 2)
    worker = Worker(worker_settings, logdir)
    api = ApiThread(dataclasses.replace(worker_settings, model_repository=api_repository))
    rng = np.random.default_rng(6)
    try:
        with Client(api.target) as client:
            served = client.classify(rng.random((1, 1, 28, 28), dtype=np.float32), "digits", version=1)
            assert served.version == 1 and len(served.classes) == 1
            # Answered with the reason, long before the deadline would have ended the wait.
            with pytest.raises(grpc.RpcError) as info:
                client.classify(
                    rng.random((1, 1, 28, 28), dtype=np.float32), "digits", version=2, timeout_s=30
                )
            assert info.value.code() == grpc.StatusCode.INTERNAL, info.value
            assert "does not serve digits v2" in (info.value.details() or ""), info.value.details()

            items = 40
            job = client.submit(rng.random((items, 1, 28, 28), dtype=np.float32), "digits", version=2)
            final = job.wait(timeout_s=60)
            assert (final.counts.total, final.counts.failed) == (items, items), final
            results = list(job.results())
            assert [res.index for res in results] == list(range(items))
            assert all(not res.ok and "does not serve digits v2" in res.error for res in results), results[0]
        stats = worker.stats()
        assert stats["items_failed"] == 1 + items, stats
        assert stats["items_computed"] == 1, stats  # only the v1 request
    finally:
        api.stop()
        worker.stop()


class Affine(torch.nn.Module):
    """A second model, small and exactly known: softmax(x W + b) over three classes."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 3)
        with torch.no_grad():
            self.linear.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 2.0, 0, 0], [0, 0, -1.0, 1.0]]))
            self.linear.bias.copy_(torch.tensor([0.0, -0.5, 0.25]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.linear(x), dim=1)


def _affine(x: np.ndarray) -> np.ndarray:
    w = np.array([[1.0, 0, 0, 0], [0, 2.0, 0, 0], [0, 0, -1.0, 1.0]])
    logits = x.astype(np.float64) @ w.T + np.array([0.0, -0.5, 0.25])
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _digits(x: np.ndarray) -> np.ndarray:
    module = torch.jit.load(str(ROOT / "models" / "digits" / "1" / "model.pt")).eval()
    with torch.inference_mode():
        return torch.softmax(module(torch.from_numpy(x)).float(), dim=1).numpy()


def test_one_worker_serves_two_models(fresh_redis: RedisServer, logdir: Path, tmp_path: Path) -> None:
    repository = write_model(
        tmp_path,
        "affine",
        Affine(),
        {
            "input": {"name": "x", "dtype": "float32", "shape": [4]},
            "output": {"name": "p", "kind": "probabilities"},
            "labels": ["a", "b", "c"],
            "max_batch_size": 16,
            "max_delay_ms": 1,
        },
    )
    _copy_digits(repository, 1)
    settings = dataclasses.replace(stack_settings(fresh_redis, None), model_repository=repository)
    worker = Worker(settings, logdir)
    api = ApiThread(settings)
    rng = np.random.default_rng(7)
    try:
        heldout = np.load(ROOT / "models" / "digits" / "heldout.npz")["x"][:64].astype(np.float32)
        vectors = rng.normal(size=(64, 4)).astype(np.float32)
        want_digits, want_affine = _digits(heldout), _affine(vectors)
        with Client(api.target) as client:
            # Interleaved, so both models' queues and batchers are busy at once.
            calls = []
            for i in range(8):
                calls.append(("digits", i, client.classify_future(heldout[i : i + 1], "digits", top_k=10)))
                calls.append(("affine", i, client.classify_future(vectors[i : i + 1], "affine", top_k=3)))
            for model, i, call in calls:
                response = call.result()
                assert response.model == model
                want = (want_digits if model == "digits" else want_affine)[i]
                got = np.zeros_like(want)
                for c in response.classes:
                    got[c.index] = c.score
                np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=f"{model} item {i}")
            jobs = {"digits": client.submit(heldout, "digits"), "affine": client.submit(vectors, "affine")}
            for model, job in jobs.items():
                final = job.wait(timeout_s=60)
                assert state_name(final.state) == "SUCCEEDED", final
                want = want_digits if model == "digits" else want_affine
                results = list(job.results(include_scores=True))
                assert [res.index for res in results] == list(range(len(want)))
                got = np.array([list(res.scores) for res in results])
                np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=model)
                assert [res.classes[0].index for res in results] == want.argmax(axis=1).tolist()
    finally:
        api.stop()
        worker.stop()


def test_consumer_returns_chunks_it_did_not_know_it_held(fresh_redis: RedisServer) -> None:
    """An LMOVE whose reply was lost with its connection, or an ack that failed with it,
    leaves a chunk in the processing list of a consumer that does not hold it: nobody
    would ever finish it (the consumer's lease stays alive). The consumer puts it back."""
    r = redis.Redis.from_url(fresh_redis.url)
    queue = bulk_queue_name("digits")
    processing = processing_key("w", queue)
    try:
        consumer = BulkQueues(r, "w", [queue], lease_s=60.0)
        consumer.renew()
        r.lpush(queue, b"a", b"b", b"c", b"d")
        held = [consumer.take(), consumer.take()]
        assert held == [(queue, b"a"), (queue, b"b")]
        # What a lost LMOVE reply leaves behind: moved, never seen by the consumer.
        r.lmove(queue, processing, "RIGHT", "LEFT")
        assert r.lrange(processing, 0, -1) == [b"c", b"b", b"a"]

        assert consumer.return_unheld(queue, [b"a", b"b"]) == 1
        assert r.lrange(processing, 0, -1) == [b"b", b"a"]
        assert r.lrange(queue, 0, -1) == [b"d", b"c"]  # back at the head, first in line
        # Nothing more to return, looked at in full or not.
        assert consumer.return_unheld(queue, [b"a", b"b"]) == 0
        assert consumer.return_unheld(queue, [b"a", b"b"], check_all=True) == 0
        # A chunk held twice (the same body submitted twice) is matched twice.
        r.lpush(processing, b"a")
        assert consumer.return_unheld(queue, [b"a", b"a", b"b"]) == 0
        assert consumer.return_unheld(queue, [b"a", b"b"], check_all=True) == 1
        assert r.lrange(processing, 0, -1) == [b"b", b"a"]
    finally:
        r.close()


def test_worker_refuses_a_lease_renewed_too_rarely() -> None:
    # One late renewal would make a live worker look dead: refused at start, by name.
    env = {**os.environ, "INFERPOOL_BULK_LEASE_S": "3", "INFERPOOL_BULK_LEASE_RENEW_S": "2"}
    done = subprocess.run(
        [sys.executable, "-m", "inferpool.workers.main"],
        env=env,
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 1, done
    assert (
        b"INFERPOOL_BULK_LEASE_RENEW_S=2.0: must be at most half of INFERPOOL_BULK_LEASE_S=3.0" in done.stderr
    ), done.stderr[-2000:]
