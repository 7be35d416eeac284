"""Runs the Procfile stack (honcho) on free loopback ports for the demo and benchmarks."""

from __future__ import annotations

import base64
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from inferpool.client import Client

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout_s: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Until something accepts on 127.0.0.1:port; fails early if `proc` exits."""
    deadline = time.monotonic() + timeout_s
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout_s}s") from None
            time.sleep(0.02)


def _procfile_names(root: Path = ROOT) -> list[str]:
    lines = (root / "Procfile").read_text().splitlines()
    return [line.split(":", 1)[0] for line in lines if line.strip() and not line.startswith("#")]


class LocalStack:
    """`with LocalStack() as stack:` starts redis, memcached, a worker, the API and Flower,
    as `make up` does, and returns once a first Classify has been answered and Flower has
    reached the worker (`task_events_on`: Flower sees its task events).

    Flower binds 127.0.0.1 with basic auth: FLOWER_BASIC_AUTH (`user:password`) from the
    environment or `extra_env`, else a fresh password (`stack.flower_auth`). `flower=False`
    leaves it out; then nothing turns the worker's task events on (the worker starts
    without them and Flower enables them), so such a stack runs a lighter path than what
    users run with `make up`.
    `model_repository` replaces models/ (it must hold digits: readiness classifies one).
    `root` runs another checkout's Procfile and code (bench/compare.py: a git ref beside
    this tree); the client that checks readiness is this tree's.
    """

    def __init__(
        self,
        extra_env: dict[str, str] | None = None,
        quiet: bool = True,
        flower: bool = True,
        model_repository: Path | None = None,
        root: Path = ROOT,
    ) -> None:
        self.root = root
        self.ports = {
            "REDIS_PORT": free_port(),
            "MEMCACHED_PORT": free_port(),
            "GRPC_PORT": free_port(),
            "HTTP_PORT": free_port(),
            "FLOWER_PORT": free_port(),
            "API_METRICS_PORT": free_port(),
            "WORKER_METRICS_PORT": free_port(),
        }
        self.extra_env = extra_env or {}
        self.quiet = quiet
        self.flower = flower
        self.model_repository = model_repository or root / "models"
        self._flower_basic_auth = (
            self.extra_env.get("FLOWER_BASIC_AUTH")
            or os.environ.get("FLOWER_BASIC_AUTH")
            or f"inferpool:{secrets.token_hex(8)}"
        )
        # Flower accepts several comma-separated pairs; the first is the one shown.
        user, _, password = self._flower_basic_auth.split(",")[0].partition(":")
        self.flower_auth = (user, password)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = root / "bench" / "results" / "stack.log"
        self.task_events_on = False

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.ports['GRPC_PORT']}"

    @property
    def http_target(self) -> str:
        return f"127.0.0.1:{self.ports['HTTP_PORT']}"

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.ports['REDIS_PORT']}/0"

    @property
    def flower_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['FLOWER_PORT']}"

    @property
    def metrics_urls(self) -> dict[str, str]:
        """Prometheus endpoints: the worker's, and the API's once it serves one."""
        return {
            name: f"http://127.0.0.1:{self.ports[var]}/metrics"
            for name, var in (("api", "API_METRICS_PORT"), ("worker", "WORKER_METRICS_PORT"))
        }

    def __enter__(self) -> LocalStack:
        # extra_env last: it may override a port (HTTP_PORT=0 turns the HTTP server off).
        env = {**os.environ, **{k: str(v) for k, v in self.ports.items()}, **self.extra_env}
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        env["INFERPOOL_MODEL_REPOSITORY"] = str(self.model_repository)
        env["FLOWER_BASIC_AUTH"] = self._flower_basic_auth
        processes = [] if self.flower else [p for p in _procfile_names(self.root) if p != "flower"]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        out = self.log_path.open("wb") if self.quiet else None
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "honcho",
                "start",
                "-f",
                str(self.root / "Procfile"),
                "-d",
                str(self.root),
                *processes,
            ],
            env=env,
            # honcho's -d only finds the Procfile: its processes start in this cwd, and
            # `python -m inferpool.workers.main` imports from there before the installed package,
            # so the stack runs this tree's code whoever starts it, from wherever.
            cwd=self.root,
            stdout=out,
            stderr=subprocess.STDOUT if out else None,
            start_new_session=True,
        )
        try:
            wait_port(self.ports["GRPC_PORT"], 60, self.proc)
            with Client(self.target) as client:
                client.wait_ready(30)
                # Readiness = one answered miss: the worker has loaded and warmed the model.
                probe = np.random.default_rng().random((1, 1, 28, 28), dtype=np.float32)
                client.classify(probe, "digits", timeout_s=90)
            if self.flower:
                wait_port(self.ports["FLOWER_PORT"], 30, self.proc)
                self.task_events_on = self.wait_task_events(30)
        except BaseException:
            self.stop()
            raise
        return self

    @property
    def pid(self) -> int:
        """honcho's pid: every process of the stack is below it."""
        assert self.proc is not None, "the stack is not running"
        return self.proc.pid

    def flower_json(self, path: str) -> Any:
        """GET `path` of Flower's HTTP API (with its basic auth), as JSON."""
        request = urllib.request.Request(f"{self.flower_url}{path}")
        token = base64.b64encode(":".join(self.flower_auth).encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.loads(response.read())

    def wait_task_events(self, timeout_s: float) -> bool:
        """Until Flower sees the worker's task events; False if not within `timeout_s`.
        Workers start with them off and Flower turns them on with a broadcast every few
        seconds: before that the stack runs without them, unlike the stack users run.
        Probes with random inputs (misses nothing else asks for)."""
        from inferpool.names import task_name

        rng = np.random.default_rng()
        deadline = time.monotonic() + timeout_s
        with Client(self.target) as client:
            while time.monotonic() < deadline:
                client.classify(rng.random((1, 1, 28, 28), dtype=np.float32), "digits", timeout_s=10)
                try:
                    if self.flower_json(f"/api/tasks?taskname={task_name('digits')}&limit=1"):
                        return True
                except OSError:
                    pass  # Flower still starting: ask again
                time.sleep(0.5)
        return False

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        # honcho forwards SIGTERM to every process it started and waits for them.
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
