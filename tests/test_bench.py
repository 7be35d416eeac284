"""The benchmark harness's measuring parts: what a cell trusts, and the load generator."""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import pytest

from bench import procs
from bench.baselines import baseline_server
from bench.cells import Cell, cpu_record
from bench.generators import Generators
from bench.loadgen import HOT_ITEMS, MAX_LAG_P99_MS, Load, inputs
from bench.stack import ROOT

MACHINE = {"busy": 0.0, "steal": 0.0}


def _run(cached: int = 0, lag_p99_ms: float = 1.0, rps: float = 100.0) -> dict[str, object]:
    return {
        "rps": rps,
        "p50_ms": 1.0,
        "p99_ms": 2.0,
        "ok": 100,
        "errors": {},
        "cached": cached,
        "sent": 100,
        "distinct_inputs": 100,
        "shed": 0,
        "gen_cpu_ms_per_request": 0.2,
        "gen_lag_p50_ms": 0.5,
        "gen_lag_p99_ms": lag_p99_ms,
    } | cpu_record({"api": 0.05, "worker": 0.03}, 100, 1.0, MACHINE, 0.0)


def test_a_miss_cell_with_a_cached_reply_fails() -> None:
    cell = Cell("inferpool", "digits", "miss", "closed", 8)
    cell.add(_run())
    assert cell.valid
    cell.add(_run(cached=1))
    assert not cell.valid
    assert cell.problems()[0] == "FAIL: 1 of 200 miss replies were cached"


def test_runs_whose_generator_lagged_are_left_out_of_the_figures() -> None:
    cell = Cell("b2 threads", "digits", "miss", "closed", 64)
    cell.add(_run(rps=100.0))
    cell.add(_run(rps=900.0, lag_p99_ms=MAX_LAG_P99_MS + 1))
    cell.add(_run(rps=300.0))
    assert cell.spread("rps") == {"min": 100.0, "median": 200.0, "max": 300.0}
    assert cell.valid
    lagging = Cell("b2 threads", "digits", "miss", "closed", 64)
    lagging.add(_run(lag_p99_ms=MAX_LAG_P99_MS + 1))
    assert not lagging.valid


def test_cpu_per_request_per_process() -> None:
    record = cpu_record({"api": 0.05, "worker": 0.03}, 100, 2.0, {"busy": 0.5, "steal": 0.0}, 0.1)
    assert record["server_cpu_ms_per_request"] == pytest.approx({"api": 0.5, "worker": 0.3})
    assert record["server_cpu_total_ms_per_request"] == pytest.approx(0.8)
    # 0.5 s of the machine's CPU less 0.08 of the server and 0.1 of the generator, over 2 s.
    assert record["outside_cores_busy"] == pytest.approx(0.16)


def test_workloads_draw_the_inputs_they_state() -> None:
    def distinct(workload: str, n: int) -> int:
        source = inputs(Load("unused", workload=workload, seed=3))
        return len({next(source).tobytes() for _ in range(n)})

    assert distinct("miss", 2000) == 2000
    assert distinct("hit", 2000) == HOT_ITEMS


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
