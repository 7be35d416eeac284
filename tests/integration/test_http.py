"""The HTTP front through the real stack: KServe v2 REST driven by the unmodified
tritonclient.http (in a subprocess, tests/http_client.py), and what it does with bad input."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bench.stack import free_port
from tests.servers import ApiThread, MemcachedServer, RedisServer, Worker, stack_settings

pytestmark = pytest.mark.timeout(180)

ROOT = Path(__file__).resolve().parents[2]
CLIENT = ROOT / "tests" / "http_client.py"
HELDOUT = ROOT / "models" / "digits" / "heldout.npz"


def triton(target: str, scenario: str, *args: object) -> Any:
    done = subprocess.run(
        [sys.executable, str(CLIENT), target, scenario, *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def http_api(
    redis_server: RedisServer, memcached_server: MemcachedServer, worker: Worker
) -> Iterator[ApiThread]:
    api = ApiThread(stack_settings(redis_server, memcached_server, http_port=free_port()))
    yield api
    api.stop()


def http_target(api: ApiThread) -> str:
    return f"127.0.0.1:{api.server.http_port}"


def test_server_and_model_metadata(http_api: ApiThread) -> None:
    got = triton(http_target(http_api), "server")
    assert got["live"] and got["ready"] and got["model_ready"] and got["model_v1_ready"]
    assert not got["unknown_ready"]
    assert got["server_metadata"]["name"] == "inferpool"
    assert got["server_metadata"]["extensions"] == ["classification"]
    assert got["model_metadata"] == {
        "name": "digits",
        "versions": ["1"],
        "platform": "pytorch_libtorch",
        "inputs": [{"name": "image", "datatype": "FP32", "shape": [-1, 1, 28, 28]}],
        "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}],
    }
    config = got["model_config"]
    assert config["name"] == "digits" and config["max_batch_size"] == 64
    assert config["input"] == [{"name": "image", "data_type": "TYPE_FP32", "dims": [1, 28, 28]}]
    assert config["dynamic_batching"] == {"max_queue_delay_microseconds": 2000}
    assert got["statistics"]["model_stats"][0]["name"] == "digits"


@pytest.mark.parametrize("binary", ["binary", "json"])
def test_heldout_digits_accuracy(
    http_api: ApiThread, heldout: tuple[np.ndarray, np.ndarray], binary: str
) -> None:
    x, y = heldout
    assert len(x) >= 200
    got = triton(http_target(http_api), "heldout", HELDOUT, 8, binary)
    # Outputs came back as binary data exactly when the client asked for it.
    assert got["binary"] == [binary == "binary"]
    assert got["shapes"][0] == [8, 10] and sum(s[0] for s in got["shapes"]) == len(x)
    assert np.allclose(got["row_sums"], 1.0, atol=1e-4)
    accuracy = float((np.array(got["predicted"]) == y).mean())
    assert accuracy >= 0.95, accuracy


def test_repeat_is_a_cache_hit_and_classification_strings(http_api: ApiThread) -> None:
    before = http_api.call(lambda: http_api.server.plane.counters.hits)
    got = triton(http_target(http_api), "repeat", 9119)
    # Four fresh rows: computed the first time; the repeat (as JSON this time) all hits.
    assert got["hits"] == [0, 4] and got["same"]
    assert http_api.call(lambda: http_api.server.plane.counters.hits) - before >= 4 + 2
    for row, strings in zip(np.array(got["probs"]), got["top"], strict=True):
        best = np.argsort(-row, kind="stable")[:3]
        assert strings == [f"{row[i]:f}:{i}:{i}" for i in best]


def test_errors_map_as_triton_does(http_api: ApiThread) -> None:
    got = triton(http_target(http_api), "errors")
    assert got["unknown_model"]["status"] == "404" and "nope" in got["unknown_model"]["message"]
    assert got["unknown_version"]["status"] == "404"
    assert got["metadata_unknown"]["status"] == "404"
    assert got["bad_shape"]["status"] == "400"
    assert "shape [-1, 1, 28, 28]" in got["bad_shape"]["message"]
    assert got["bad_shape_json"]["status"] == "400"
    assert (
        got["too_many_rows"]["status"] == "400"
        and "batch size must be 1..64" in got["too_many_rows"]["message"]
    )


def test_overload_and_deadline_map_as_triton_does(fresh_redis: RedisServer, tmp_path: Path) -> None:
    repo = tmp_path / "models"
    shutil.copytree(ROOT / "models" / "digits" / "1", repo / "digits" / "1")
    config = json.loads((repo / "digits" / "1" / "config.json").read_text())
    (repo / "digits" / "1" / "config.json").write_text(json.dumps({**config, "max_queue_size": 4}))
    # No worker: whatever is admitted waits out its deadline (Triton's `timeout`, 3 s).
    api = ApiThread(
        dataclasses.replace(stack_settings(fresh_redis, None), model_repository=repo, http_port=free_port())
    )
    try:
        got = triton(http_target(api), "overload", 8, 3_000_000, 3)["errors"]
        statuses = sorted(e["status"] for e in got)
        assert statuses == ["503"] * 4 + ["504"] * 4, got
        assert all("max_queue_size 4" in e["message"] for e in got if e["status"] == "503")
        assert all("deadline" in e["message"].lower() for e in got if e["status"] == "504")
    finally:
        api.stop()


def test_perf_analyzer_reads_the_http_fronts_statistics(http_api: ApiThread) -> None:
    triton(http_target(http_api), "repeat", 4242)  # four rows computed, then four hits
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, json; from bench.perf_analyzer import model_stats; "
            "print(json.dumps(model_stats(sys.argv[1], 'http')))",
            http_target(http_api),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    stats = json.loads(done.stdout)
    assert stats["hits"] >= 4 and stats["misses"] >= 4 and stats["requests"] >= 3
