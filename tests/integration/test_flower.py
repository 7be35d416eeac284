"""Flower against the live pool: its REST API, and its pages in headless Chromium.

Flower runs as a real process (`celery flower`) on a free loopback port with basic
auth, against the session's Redis and worker. It only sees task events published
while it listens, so it is ready once it lists the worker (from its heartbeats).
"""

from __future__ import annotations

import ast
import base64
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import numpy as np
import pytest
import redis

from bench.stack import free_port, wait_port
from inferpool.api import metrics as api_metrics
from inferpool.client import Client
from inferpool.codec import SERIALIZER
from inferpool.names import bulk_queue_name, queue_name, task_name
from tests.servers import ROOT, ApiThread, Proc, RedisServer, Worker

T = TypeVar("T")

TASK = task_name("digits")
QUEUE = queue_name("digits")


def wait_for(condition: Callable[[], T | None], timeout_s: float, what: str) -> T:
    """Polls `condition` until it returns something truthy; fails after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.1)


class Flower(Proc):
    def __init__(self, broker_url: str, logdir: Path) -> None:
        self.port = free_port()
        self.user, self.password = "ops", secrets.token_urlsafe(12)
        # Only what this test sets: a developer's own FLOWER_* must not change the outcome.
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWER_")}
        env["FLOWER_BASIC_AUTH"] = f"{self.user}:{self.password}"
        super().__init__(
            [
                sys.executable,
                "-m",
                "celery",
                f"--broker={broker_url}",
                "flower",
                "--address=127.0.0.1",
                f"--port={self.port}",
                # As the Procfile and compose start it: /metrics needs the password too.
                "--conf=" + str(ROOT / "scripts" / "flowerconfig.py"),
            ],
            logdir / f"flower-{self.port}.log",
            env=env,
        )
        self.ready(lambda: wait_port(self.port, 30, self.popen))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def get(self, path: str, password: str | None = None, auth: bool = True) -> tuple[int, Any]:
        request = urllib.request.Request(self.url + path)
        if auth:
            token = base64.b64encode(f"{self.user}:{password or self.password}".encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, None

    def json(self, path: str) -> Any:
        status, body = self.get(path)
        assert status == 200, f"GET {path}: HTTP {status}\n{self.tail()}"
        return body


@pytest.fixture(scope="module")
def flower(redis_server: RedisServer, worker: Worker, client: Client, logdir: Path) -> Iterator[Flower]:
    f = Flower(redis_server.url, logdir)

    def sees_worker() -> bool:
        return any(w.get("hostname") == worker.name for w in f.json("/workers?json=1")["data"])

    def sees_tasks() -> bool:
        # The worker starts without task events; Flower's periodic enable_events
        # broadcast (every 5 s) turns them on. Until then, misses leave no trace here.
        _classify_misses(client, 1)
        return bool(f.json(f"/api/tasks?taskname={TASK}&workername={worker.name}"))

    def ready() -> None:
        wait_for(sees_worker, 30, f"Flower to list {worker.name}")
        wait_for(sees_tasks, 30, f"Flower to turn on task events of {worker.name}")

    f.ready(ready)
    yield f
    f.stop()


def _classify_misses(client: Client, n: int) -> None:
    rng = np.random.default_rng()
    for _ in range(n):
        response = client.classify(rng.random((1, 1, 28, 28), dtype=np.float32), "digits", timeout_s=10)
        assert not response.cached


def test_api_requires_authentication(flower: Flower) -> None:
    assert flower.get("/api/workers", auth=False)[0] == 401
    assert flower.get("/api/workers", password="wrong")[0] == 401


def test_metrics_require_authentication(flower: Flower) -> None:
    def status(headers: dict[str, str]) -> tuple[int, bytes]:
        request = urllib.request.Request(flower.url + "/metrics", headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, b""

    def basic(password: str) -> dict[str, str]:
        return {"Authorization": "Basic " + base64.b64encode(f"{flower.user}:{password}".encode()).decode()}

    assert status({})[0] == 401
    assert status(basic("wrong"))[0] == 401
    code, body = status(basic(flower.password))
    assert code == 200 and b"flower_events_total" in body


def test_api_lists_worker_tasks_and_queues(
    flower: Flower, worker: Worker, client: Client, redis_client: redis.Redis
) -> None:
    n = 5
    _classify_misses(client, n)

    def succeeded() -> dict[str, Any] | None:
        tasks: dict[str, Any] = flower.json(
            f"/api/tasks?taskname={TASK}&state=SUCCESS&workername={worker.name}"
        )
        return tasks if len(tasks) >= n else None

    tasks = wait_for(succeeded, 20, f"{n} succeeded {TASK} tasks in Flower")
    for task in tasks.values():
        assert task["name"] == TASK
        assert task["worker"] == worker.name
        assert task["runtime"] is not None and task["runtime"] >= 0
        # The task's return value is its tally: SUCCESS means its items were computed.
        tally = ast.literal_eval(task["result"])
        assert tally["computed"] >= 1 and tally.get("failed", 0) == 0, tally

    workers = flower.json("/api/workers?refresh=1")
    assert worker.name in workers, sorted(workers)
    info = workers[worker.name]
    assert QUEUE in {q["name"] for q in info["active_queues"]}
    assert TASK in info["registered"]

    # Flower's queue length is the broker's: read both until they agree (the worker may
    # still be taking the last messages), which they must within the bound.
    def lengths() -> tuple[int | None, int]:
        queues = flower.json("/api/queues/length")["active_queues"]
        return {q["name"]: q["messages"] for q in queues}.get(QUEUE), int(redis_client.llen(QUEUE))

    wait_for(lambda: (pair := lengths())[0] == pair[1], 20, f"Flower's length of {QUEUE} to be Redis's")


def test_broker_lists_each_models_queues_and_not_celerys_default(flower: Flower, worker: Worker) -> None:
    """Broker page and `/api/queues/length`: each model's interactive queue and its bulk
    queue (the workers take bulk chunks from Redis themselves, so Celery never reports
    that queue to Flower), and not Celery's default queue `celery`, which nothing here
    uses."""
    names = {q["name"] for q in flower.json("/api/queues/length")["active_queues"]}
    assert {QUEUE, bulk_queue_name("digits")} <= names, names
    assert "celery" not in names, names
    request = urllib.request.Request(flower.url + "/broker")
    token = base64.b64encode(f"{flower.user}:{flower.password}".encode()).decode()
    request.add_header("Authorization", f"Basic {token}")
    with urllib.request.urlopen(request, timeout=10) as response:
        page = response.read().decode()
    assert bulk_queue_name("digits") in page and ">celery<" not in page


def test_undecodable_message_is_not_shown_as_success(flower: Flower, worker: Worker) -> None:
    result = worker.control.send_task(
        TASK, args=(b"not an envelope",), queue=QUEUE, serializer=SERIALIZER, argsrepr="", kwargsrepr=""
    )

    def settled() -> dict[str, Any] | None:
        status, task = flower.get(f"/api/task/info/{result.id}")
        return task if status == 200 and task["state"] not in ("PENDING", "RECEIVED", "STARTED") else None

    task = wait_for(settled, 20, f"task {result.id} to settle in Flower")
    assert task["state"] in ("FAILURE", "REJECTED"), task


def test_bulk_chunks_show_as_tasks_with_true_states(flower: Flower, worker: Worker, client: Client) -> None:
    # Bulk chunks are consumed outside Celery's task pool; the consumer sends the task
    # events itself, so each chunk shows up, and as SUCCESS only once its results are in.
    x = np.random.default_rng().random((40, 1, 28, 28), dtype=np.float32)
    job = client.submit(x, "digits")
    job.wait(timeout_s=30)

    def chunks() -> dict[str, Any] | None:
        tasks: dict[str, Any] = flower.json(
            f"/api/tasks?taskname=inferpool.bulk.digits&workername={worker.name}"
        )
        mine = {k: t for k, t in tasks.items() if t["state"] == "SUCCESS"}
        return mine or None

    tasks = wait_for(chunks, 20, "bulk chunk tasks in Flower")
    assert all(t["runtime"] is not None for t in tasks.values())
    assert any(ast.literal_eval(t["result"])["computed"] > 0 for t in tasks.values())


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail("chromium not found: run scripts/ensure-servers.sh (or apt-get install chromium)")
    return path


@pytest.mark.timeout(90)
def test_dashboard_in_headless_chromium(flower: Flower, worker: Worker, tmp_path: Path) -> None:
    chromium = _chromium()
    base = f"http://{flower.user}:{flower.password}@127.0.0.1:{flower.port}"
    for page, path in (("dashboard", "/"), ("worker", f"/worker/{quote(worker.name)}")):
        shot = tmp_path / f"flower-{page}.png"
        run = subprocess.run(
            [
                chromium,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                f"--user-data-dir={tmp_path / 'chromium'}",
                "--window-size=1280,900",
                # Lets the page's own requests (the workers table reloads over AJAX) finish first.
                "--virtual-time-budget=5000",
                f"--screenshot={shot}",
                "--dump-dom",
                base + path,
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert run.returncode == 0, run.stderr[-2000:]
        assert worker.name in run.stdout, f"{page}: worker not on the page\n{run.stdout[:2000]}"
        assert "Access denied" not in run.stdout
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{page}: no screenshot at {shot}"


def test_every_count_of_one_scenario_agrees(
    flower: Flower, worker: Worker, client: Client, api: ApiThread
) -> None:
    """One scenario, counted by the API (its own counters and its Prometheus series), the
    worker and Flower: n distinct misses, one message each, then the same n again as hits.
    Each count is of the same events, so they must agree exactly."""
    n = 6
    registry = api_metrics.REGISTRY

    def sample(name: str) -> float:
        return registry.get_sample_value(name, {"model": "digits"}) or 0.0

    counters = api.server.plane.counters

    def counts() -> tuple[float, ...]:
        return (
            counters.misses,
            counters.hits,
            sample("inferpool_cache_misses_total"),
            sample("inferpool_cache_hits_total"),
            worker.stats()["items_computed"],
        )

    before = counts()
    since = time.time()
    rng = np.random.default_rng()
    images = [rng.random((1, 1, 28, 28), dtype=np.float32) for _ in range(n)]
    first = [client.classify(image, "digits", timeout_s=10) for image in images]
    again = [client.classify(image, "digits", timeout_s=10) for image in images]
    assert not any(r.cached for r in first) and all(r.cached for r in again)
    assert [r.classes[0].index for r in again] == [r.classes[0].index for r in first]

    assert [a - b for a, b in zip(counts(), before, strict=True)] == [n, n, n, n, n]

    def computed_since() -> int | None:
        tasks: dict[str, Any] = flower.json(
            f"/api/tasks?taskname={TASK}&state=SUCCESS&workername={worker.name}"
        )
        mine = [t for t in tasks.values() if (t.get("received") or 0) >= since]
        total = sum(ast.literal_eval(t["result"])["computed"] for t in mine)
        return total if len(mine) >= n else None

    # Flower learns of the tasks from events, a moment after the answers.
    assert wait_for(computed_since, 20, f"{n} succeeded tasks in Flower") == n
