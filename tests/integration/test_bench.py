"""The benchmark harness's measuring parts: what a cell trusts, and the load generator."""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import pytest

from bench import procs
from bench.baselines import baseline_server
from bench.generators import Generators
from bench.loadgen import HOT_ITEMS, Load
from bench.stack import ROOT


@pytest.fixture(scope="module")
def generators() -> Iterator[Generators]:
    with Generators(2) as gens:
        yield gens


def test_generators_run_apart_and_report_their_cpu_and_lag(generators: Generators) -> None:
    assert len(generators.pids) == 2 and generators.pids[0] == generators.leader.pid
    assert set(procs.tree(generators.leader.pid)) == set(generators.pids)
    for pid in generators.pids:
        assert os.getsid(pid) == generators.leader.pid != os.getsid(0)
        assert os.getpgid(pid) == generators.leader.pid
    with baseline_server("fixed", ROOT / "models") as server:
        run = generators.run(Load(server.target, workload="hit", concurrency=4, seconds=0.3))
    assert run.ok > 0 and not run.errors
    assert run.cached == run.ok  # the fixed reply says cached
    assert run.distinct <= HOT_ITEMS
    assert run.cpu_s > 0
    assert np.isfinite(run.lag_p99_ms)


def test_b5_batcher_answers_as_the_model_does() -> None:
    from inferpool.client import Client

    x = np.random.default_rng(5).random((16, 1, 1, 28, 28), dtype=np.float32)
    answers = []
    for kind in ("threadpool", "batcher"):
        with baseline_server(kind, ROOT / "models") as server, Client(server.target) as client:
            futures = [client.classify_future(row, "digits") for row in x]
            answers.append([(f.result(timeout=30).classes[0].index, f.result().cached) for f in futures])
    assert answers[0] == answers[1]
    assert not any(cached for _, cached in answers[1])
