"""The `inferpool` CLI as a user runs it: a subprocess against the session stack."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from tests.servers import ApiThread


def cli(api: ApiThread, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "inferpool.cli", "--target", api.target, *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_submit_wait_and_write_results(
    api: ApiThread, heldout: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    x, y = heldout
    np.save(tmp_path / "digits.npy", x)
    out = tmp_path / "results.jsonl"
    run = cli(
        api, "submit", str(tmp_path / "digits.npy"), "--model", "digits", "--top-k", "3", "--out", str(out)
    )
    assert run.returncode == 0, run.stderr
    job_id = run.stdout.strip()
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(len(x)))
    assert all(r["ok"] and len(r["classes"]) == 3 for r in rows)
    accuracy = np.mean([r["classes"][0]["index"] == label for r, label in zip(rows, y, strict=True)])
    assert accuracy >= 0.95

    run = cli(api, "job", job_id, "--out", str(tmp_path / "probs.npy"))
    assert run.returncode == 0, run.stderr
    status = json.loads(run.stdout)
    assert status["state"] == "SUCCEEDED" and int(status["counts"]["done"]) == len(x)
    probs = np.load(tmp_path / "probs.npy")
    assert probs.shape == (len(x), 10)
    assert (probs.argmax(axis=1) == [r["classes"][0]["index"] for r in rows]).all()

    run = cli(api, "watch", job_id)
    assert run.returncode == 0 and json.loads(run.stdout)["state"] == "SUCCEEDED"


def test_classify_file_and_errors(
    api: ApiThread, heldout: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    x, y = heldout
    np.save(tmp_path / "some.npy", x[:20])
    run = cli(api, "classify", str(tmp_path / "some.npy"), "--model", "digits")
    assert run.returncode == 0, run.stderr
    rows = [json.loads(line) for line in run.stdout.splitlines()]
    assert [r["index"] for r in rows] == list(range(20))
    assert sum(r["classes"][0]["index"] == label for r, label in zip(rows, y[:20], strict=True)) >= 19

    run = cli(api, "job", "0" * 32)
    assert run.returncode == 2 and "NOT_FOUND" in run.stderr
    run = cli(api, "cancel", "x" * 5000)
    assert run.returncode == 2 and "INVALID_ARGUMENT: job_id must be 32 lowercase hex digits" in run.stderr
    assert len(run.stderr) < 200  # the id is not echoed whole
