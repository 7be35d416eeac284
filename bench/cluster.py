"""N API replicas and M workers on one Redis and one Memcached, on loopback, for the
scaling benchmarks (bench/proxy.py, bench/capacity.py): each a real process on free
ports, the API replicas optionally behind a proxy (bench/proxies.py).

    with Cluster(apis=2, workers=1, proxy="haproxy") as c:
        c.target            # the proxy's address, or the replicas' (ipv4:a,b) without one
        c.cpu()             # CPU seconds so far per role (api, worker, redis, memcached, proxy)
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

import numpy as np

from bench import procs
from bench.proxies import ProxyProcess, binary
from bench.stack import ROOT, free_port, wait_port
from inferpool.client import Client


class Cluster:
    def __init__(
        self,
        apis: int = 1,
        workers: int = 1,
        proxy: str = "",
        extra_env: dict[str, str] | None = None,
        model_repository: Path | None = None,
    ) -> None:
        self.n_apis, self.n_workers, self.proxy_kind = apis, workers, proxy
        self.extra_env = extra_env or {}
        self.model_repository = model_repository or ROOT / "models"
        self.dir = Path(tempfile.mkdtemp(prefix="inferpool-cluster-"))
        self.procs: dict[str, list[subprocess.Popen[bytes]]] = {}
        self.proxy: ProxyProcess | None = None
        self.api_ports: list[int] = []
        self.metrics_ports: list[int] = []

    def _start(
        self, role: str, args: list[str], env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        n = len(self.procs.get(role, []))
        out = (self.dir / f"{role}-{n}.log").open("wb")
        popen = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        self.procs.setdefault(role, []).append(popen)
        return popen

    def __enter__(self) -> Cluster:
        try:
            self._up()
        except BaseException:
            self.stop()
            raise
        return self

    def _up(self) -> None:
        redis_port, memcached_port = free_port(), free_port()
        redis = self._start(
            "redis",
            [
                *(binary("redis-server"), "--bind", "127.0.0.1", "--port", str(redis_port)),
                *("--save", "", "--appendonly", "no", "--dir", str(self.dir)),
            ],
        )
        memcached = self._start(
            "memcached",
            [binary("memcached"), "--listen=127.0.0.1", f"--port={memcached_port}", "--udp-port=0"]
            + ["--memory-limit=256"]
            + (["--user=nobody"] if os.geteuid() == 0 else []),
        )
        wait_port(redis_port, 10, redis)
        wait_port(memcached_port, 10, memcached)
        self.redis_url = f"redis://127.0.0.1:{redis_port}/0"
        self.memcached = f"127.0.0.1:{memcached_port}"
        env = {
            **os.environ,
            "INFERPOOL_REDIS_URL": self.redis_url,
            "INFERPOOL_MEMCACHED": f"127.0.0.1:{memcached_port}",
            "INFERPOOL_MODEL_REPOSITORY": str(self.model_repository),
            "INFERPOOL_CACHE_KEY_SECRET": secrets.token_hex(16),
            "PYTHONPATH": str(ROOT),
            **self.extra_env,
        }
        for i in range(self.n_workers):
            self._start(
                "worker",
                [sys.executable, "-m", "inferpool.workers.main", f"--hostname=bench-{i}@localhost"],
                env,
            )
        for _ in range(self.n_apis):
            port, metrics_port = free_port(), free_port()
            self.api_ports.append(port)
            self.metrics_ports.append(metrics_port)
            api = self._start(
                "api",
                [sys.executable, "-m", "inferpool.api"],
                {**env, "INFERPOOL_GRPC_PORT": str(port), "INFERPOOL_METRICS_PORT": str(metrics_port)},
            )
            wait_port(port, 60, api)
        self.direct = [f"127.0.0.1:{p}" for p in self.api_ports]
        if self.proxy_kind:
            self.proxy = ProxyProcess(self.proxy_kind, self.direct, self.dir / f"{self.proxy_kind}.log")
            self.target = self.proxy.target
        else:
            self.target = "ipv4:" + ",".join(self.direct) if len(self.direct) > 1 else self.direct[0]
        self._ready()

    def _ready(self, timeout_s: float = 180) -> None:
        """Until a miss through the target is answered by every worker's pool: the models
        are loaded and warm. One answered miss per replica at least."""
        rng = np.random.default_rng()
        deadline = time.monotonic() + timeout_s
        with Client(self.target) as client:
            answered = 0
            while answered < 2 * max(self.n_apis, self.n_workers):
                try:
                    client.classify(rng.random((1, 1, 28, 28), dtype=np.float32), "digits", timeout_s=30)
                    answered += 1
                except Exception:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.5)

    def pids(self) -> dict[str, list[int]]:
        out = {role: [p.pid for p in ps] for role, ps in self.procs.items()}
        if self.proxy is not None:
            # nginx's and HAProxy's workers are children of the process started.
            out["proxy"] = procs.tree(self.proxy.popen.pid)
        return out

    def cpu(self) -> dict[str, float]:
        """CPU seconds used so far, per role (every process of the role summed)."""
        out: dict[str, float] = {}
        for role, pids in self.pids().items():
            for pid in pids:
                tree = procs.tree(pid) if role == "worker" else [pid]
                out[role] = out.get(role, 0.0) + sum(procs.cpu_s(p) for p in tree)
        return out

    def metrics_urls(self) -> list[str]:
        return [f"http://127.0.0.1:{p}/metrics" for p in self.metrics_ports]

    def stop(self) -> None:
        if self.proxy is not None:
            self.proxy.stop()
        for role in ("api", "worker", "memcached", "redis"):
            for p in self.procs.get(role, []):
                if p.poll() is None:
                    p.terminate()
            for p in self.procs.get(role, []):
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
