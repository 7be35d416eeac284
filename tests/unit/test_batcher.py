"""The batcher's pure parts (variant choice, metric counting): the tests that need no
server (those against real servers: tests/integration/test_batcher.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from inferpool.repository import Repository
from inferpool.workers import metrics
from inferpool.workers.runtime import ModelRunner, pick_device

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.timeout(60)


def test_a_compiled_variant_that_answers_differently_is_not_used() -> None:
    cfg = Repository.load(ROOT / "models").resolve("digits", 0)
    runner = ModelRunner(cfg, pick_device("cpu"))
    runner.variants[1].run = lambda x: np.zeros((len(x), len(cfg.labels)), dtype=np.float32)
    runner.warm_up(repeats=1)
    assert [v.name for v in runner.variants] == ["frozen"]
    assert {runner.variant_for(n) for n in range(1, cfg.max_batch_size + 1)} == {"frozen"}


def test_observe_many_counts_as_that_many_observes() -> None:
    registry = CollectorRegistry()
    buckets = (0.001, 0.01, 0.1, 1.0)
    many = metrics.Histogram("many_seconds", "", ["model"], buckets=buckets, registry=registry)
    each = metrics.Histogram("each_seconds", "", ["model"], buckets=buckets, registry=registry)
    # On a bound, between bounds, below the first, beyond the last, and zero.
    for value, count in ((0.01, 3), (0.05, 64), (0.0001, 2), (5.0, 7), (0.0, 1)):
        many.labels("m").observe_many(value, count)
        for _ in range(count):
            each.labels("m").observe(value)
    for suffix in ("_bucket", "_count", "_sum"):
        for le in ("0.001", "0.01", "0.1", "1.0", "+Inf"):
            labels = {"model": "m", "le": le} if suffix == "_bucket" else {"model": "m"}
            assert registry.get_sample_value("many_seconds" + suffix, labels) == pytest.approx(
                registry.get_sample_value("each_seconds" + suffix, labels)
            )
