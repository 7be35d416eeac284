"""Per-item isolation: a model that raises on one input fails that request only."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from inferpool.client import Client
from tests.servers import ApiThread, RedisServer, Worker, stack_settings, write_model

pytestmark = [
    pytest.mark.timeout(120),
    # The repository format is TorchScript, which torch 2.13 marks deprecated.
    pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning"),
]


class Picky(torch.nn.Module):
    """Raises on any negative input value; otherwise a softmax over three features."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool((x < 0).any()):
            raise RuntimeError("negative input")
        return torch.softmax(x.flatten(1)[:, :3], dim=1)


@pytest.fixture
def picky_repository(tmp_path: Path) -> Path:
    config = {
        "input": {"name": "x", "dtype": "float32", "shape": [1, 2, 2]},
        "output": {"name": "p", "kind": "probabilities"},
        "labels": ["a", "b", "c"],
        "max_batch_size": 8,
        # Long enough that the concurrent requests below share one batch.
        "max_delay_ms": 50,
    }
    return write_model(tmp_path, "picky", Picky(), config)


def test_one_bad_input_fails_alone(fresh_redis: RedisServer, picky_repository: Path, logdir: Path) -> None:
    # The API holds the first miss this long for others to join it, so the eight requests
    # leave in one envelope and share one batch. Without it the envelopes follow the
    # answers, and the bad input could land in a batch of its own (then nothing is split).
    # Two seconds: sending eight calls takes milliseconds even on a loaded machine.
    settings = dataclasses.replace(
        stack_settings(fresh_redis, None), model_repository=picky_repository, coalesce_window_ms=2000.0
    )
    worker = Worker(settings, logdir)
    api = ApiThread(settings)
    try:
        with Client(api.target) as client:
            rng = np.random.default_rng(3)
            inputs = [rng.random((1, 1, 2, 2), dtype=np.float32) for _ in range(8)]
            inputs[5] = -inputs[5]
            futures = [client.classify_future(x, "picky", top_k=3, timeout_s=10) for x in inputs]
            outcomes = []
            for f in futures:
                try:
                    outcomes.append(f.result())
                except grpc.RpcError as exc:
                    outcomes.append(exc)
        bad = outcomes.pop(5)
        del inputs[5]
        assert isinstance(bad, grpc.RpcError) and bad.code() == grpc.StatusCode.INTERNAL
        assert "failed on this input" in bad.details()
        assert all(not isinstance(o, grpc.RpcError) for o in outcomes), outcomes
        # Each good input gets its own answer: Picky's softmax over its first three values,
        # classes best first.
        for x, o in zip(inputs, outcomes, strict=True):
            first3 = x.ravel()[:3].astype(np.float64)
            expected = np.exp(first3) / np.exp(first3).sum()
            order = sorted(range(3), key=lambda i: -expected[i])
            assert [c.index for c in o.classes] == order
            assert [c.label for c in o.classes] == ["abc"[i] for i in order]
            np.testing.assert_allclose([c.score for c in o.classes], expected[order], rtol=1e-5)
        assert all(o.timings.batch_size == 8 for o in outcomes)  # they did share a batch
        stats = worker.stats()
        assert stats["batches_split"] >= 1
        assert (stats["items_computed"], stats["items_failed"]) == (7, 1)
    finally:
        api.stop()
        worker.stop()
