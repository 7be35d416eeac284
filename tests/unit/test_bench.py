"""The benchmark harness's measuring parts: the tests that need no server (those against
real servers: tests/integration/test_bench.py)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from bench.cells import Cell, cpu_record
from bench.loadgen import HOT_ITEMS, MAX_LAG_P99_MS, Load, inputs

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


def test_the_baseline_comparison_pairs_each_cell_and_divides_tree_by_ref() -> None:
    from types import SimpleNamespace

    from bench.compare import CELLS, THIS_TREE, table

    cells = []
    for workload, concurrency in CELLS:
        for system, rps in ((THIS_TREE, 90.0), ("main (abc)", 100.0)):
            cell = Cell(system, "digits", workload, "closed", concurrency)
            cell.add(_run(rps=rps))
            cells.append(cell)
    rows = table(SimpleNamespace(cells=cells), "main (abc)")  # type: ignore[arg-type]
    assert [r["cell"] for r in rows] == ["miss@64", "hit@64", "miss@1"]
    assert all(r["rps"] == {"tree": 90.0, "ref": 100.0, "ratio": 0.9} for r in rows)
    assert all(r["p50_ms"]["ratio"] == 1.0 for r in rows)


def test_the_baseline_ref_is_checked_and_exported_as_committed() -> None:
    from bench.compare import exported, resolve
    from bench.stack import ROOT

    with pytest.raises(SystemExit, match="not a commit"):
        resolve("no-such-ref-anywhere")
    commit = resolve("HEAD")
    with exported(commit) as tree:
        listed = subprocess.run(
            ["git", "-C", str(ROOT), "ls-tree", "-r", "--name-only", commit],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        # Links count as the entries git lists them as: inferpool/api, inferpool/workers.
        files = [p for p in tree.rglob("*") if p.is_file() or p.is_symlink()]
        assert sorted(str(p.relative_to(tree)) for p in files) == sorted(listed)
    assert not tree.exists()


def test_results_of_one_minute_do_not_overwrite_each_other(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bench import results

    monkeypatch.setattr(results, "RESULTS", tmp_path)
    info = {"date": "2026-12-05T09:26:41", "commit": "9d91deb0"}
    paths = [results.write("profile", {"run": i}, info=info) for i in range(3)]
    assert [p.name for p in paths] == [
        "20261205T0926Z-9d91deb.json",
        "20261205T0926Z-9d91deb-2.json",
        "20261205T0926Z-9d91deb-3.json",
    ]
    assert [json.loads(p.read_text())["run"] for p in paths] == [0, 1, 2]
