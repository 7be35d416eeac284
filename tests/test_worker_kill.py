"""A worker SIGKILLed mid-batch: interactive callers fail no later than their deadline,
and what was still queued is answered by the next worker."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from inferpool.client import Client
from tests.servers import ApiThread, RedisServer, Worker, stack_settings, wait_until, write_model

pytestmark = [
    pytest.mark.timeout(120),
    # The repository format is TorchScript, which torch 2.13 marks deprecated.
    pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning"),
]

# Long enough for a replacement worker to start on a loaded CI machine.
DEADLINE_S = 12.0


class Slow(torch.nn.Module):
    """Real work, deliberately long, so a kill lands mid-batch."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(384, 384) / 20)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # 64 rows per input: slow (~60 ms a call) on one intra-op thread too.
        y = x.flatten(1).repeat(64, 96)
        for _ in range(400):
            y = torch.tanh(y @ self.w)
        return torch.softmax(y[: x.shape[0], :4], dim=1)


@pytest.fixture
def slow_repository(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    config = {
        "input": {"name": "x", "dtype": "float32", "shape": [4]},
        "output": {"name": "p", "kind": "probabilities"},
        "labels": ["a", "b", "c", "d"],
        "max_batch_size": 1,
        "max_delay_ms": 0,
    }
    return write_model(tmp_path, "slow", Slow(), config)


def test_sigkill_mid_batch(fresh_redis: RedisServer, slow_repository: Path, logdir: Path) -> None:
    # One message at a time per worker, one request per message: the rest stay queued in Redis.
    settings = dataclasses.replace(
        stack_settings(fresh_redis, None),
        model_repository=slow_repository,
        worker_concurrency=1,
        worker_prefetch=1,
        max_inflight_envelopes=100,
    )
    first = Worker(settings, logdir)
    api = ApiThread(settings)
    second: Worker | None = None
    try:
        with Client(api.target) as client:
            rng = np.random.default_rng(4)
            sent = []
            for _ in range(6):
                sent.append(
                    (
                        time.monotonic(),
                        client.classify_future(
                            rng.random((1, 4), dtype=np.float32), "slow", timeout_s=DEADLINE_S
                        ),
                    )
                )
                time.sleep(0.01)  # distinct envelopes, in order
            wait_until(lambda: first.stats()["batches"] >= 1, 30, "a first batch to finish")
            first.kill()
            second = Worker(settings, logdir)
            answered = failed = 0
            for t0, future in sent:
                try:
                    future.result()
                    answered += 1
                except grpc.RpcError as exc:
                    assert exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED, exc
                    # No caller waits past its deadline, whatever happened to its worker.
                    assert time.monotonic() - t0 <= DEADLINE_S + 0.5
                    failed += 1
            assert answered + failed == 6, (answered, failed)
            # What the killed worker had not taken was answered by the next one.
            assert second.stats()["items_computed"] >= 1
            assert answered >= 2
    finally:
        api.stop()
        if second is not None:
            second.stop()
        first.stop()
