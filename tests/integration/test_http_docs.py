"""The curl examples of docs/protocols.md's HTTP section, run as written (the port
substituted) against the real stack."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.stack import free_port
from tests.servers import ApiThread, MemcachedServer, RedisServer, Worker, stack_settings

pytestmark = pytest.mark.timeout(180)

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "protocols.md"


def curl_blocks() -> list[str]:
    text = DOC.read_text()
    section = text.split("## HTTP: ", 1)[1].split("\n## ", 1)[0]
    return [b for b in re.findall(r"```sh\n(.*?)```", section, re.S) if "curl" in b]


@pytest.fixture(scope="module")
def docs_api(
    redis_server: RedisServer, memcached_server: MemcachedServer, worker: Worker
) -> Iterator[ApiThread]:
    api = ApiThread(stack_settings(redis_server, memcached_server, http_port=free_port()))
    yield api
    api.stop()


def test_there_are_curl_examples() -> None:
    assert len(curl_blocks()) == 2


@pytest.mark.parametrize("index", [0, 1])
def test_curl_examples_run_as_written(docs_api: ApiThread, index: int, tmp_path: Path) -> None:
    block = curl_blocks()[index].replace("127.0.0.1:8080", f"127.0.0.1:{docs_api.server.http_port}")
    (tmp_path / "models").symlink_to(ROOT / "models")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", block],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-2000:])
    if index == 0:
        assert done.stdout.startswith("ready\n")
        assert '"platform":"pytorch_libtorch"' in done.stdout
        assert '"datatype":"BYTES","shape":[1,2]' in done.stdout
    else:
        assert '"state": "SUCCEEDED"' in done.stdout
        assert '"next_offset":2' in done.stdout
        assert done.stdout.rstrip().endswith("360 results.jsonl")
