"""Real servers for the tests: redis-server, memcached, worker processes, the API.

Each starts on a free loopback port and is stopped by PID. Readiness is waited for
on a condition (a port accepting, a Celery ping answered), bounded in time.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from bench.stack import ROOT, free_port, wait_port
from inferpool.api.server import ApiServer
from inferpool.broker import make_celery
from inferpool.settings import Settings
from inferpool.shards import worker_broker


def _binary(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin")
    if path is None:
        raise RuntimeError(f"{name} not found: run scripts/ensure-servers.sh (or apt-get install {name})")
    return path


def wait_until(predicate: Callable[[], object], timeout_s: float, what: str, poll_s: float = 0.05) -> None:
    """Polls a condition (bounded): for state another process changes, with no event to wait on."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(poll_s)


def write_model(root: Path, name: str, module: Any, config: dict[str, Any]) -> Path:
    """Scripts `module` into `<root>/models/<name>/1/` with its config.json, as a model
    repository a Worker can serve; returns the repository root."""
    import torch  # tests only: the API side never needs it

    folder = root / "models" / name / "1"
    folder.mkdir(parents=True)
    torch.jit.script(module).save(str(folder / "model.pt"))
    (folder / "config.json").write_text(json.dumps(config))
    return root / "models"


class Proc:
    # Every process still running, so the session can reap what a failed test left.
    live: ClassVar[set[Proc]] = set()

    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.args = args
        self.log = log
        self._out = log.open("ab")
        self.popen = subprocess.Popen(args, stdout=self._out, stderr=subprocess.STDOUT, env=env)
        Proc.live.add(self)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 15) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self._out.close()
        Proc.live.discard(self)

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def ready(self, check: Callable[[], None]) -> None:
        """Runs the readiness check; a process that never gets ready is not left behind."""
        try:
            check()
        except BaseException:
            self.stop(signal.SIGKILL)
            raise

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])


class RedisServer(Proc):
    def __init__(self, logdir: Path, port: int | None = None) -> None:
        # A given port restarts "the same" Redis (fault tests); empty, as after a crash.
        self.port = port or free_port()
        super().__init__(
            [
                _binary("redis-server"),
                "--bind",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(logdir),
            ],
            logdir / f"redis-{self.port}.log",
        )
        self.ready(lambda: wait_port(self.port, 10, self.popen))

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


class MemcachedServer(Proc):
    def __init__(self, logdir: Path) -> None:
        self.port = free_port()
        super().__init__(
            [
                _binary("memcached"),
                "--listen=127.0.0.1",
                f"--port={self.port}",
                "--udp-port=0",
                "--memory-limit=64",
            ]
            + (["--user=nobody"] if os.geteuid() == 0 else []),
            logdir / f"memcached-{self.port}.log",
        )
        self.ready(lambda: wait_port(self.port, 10, self.popen))

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


# Shared by every process a test starts (each calls stack_settings on its own).
TEST_CACHE_KEY_SECRET = "inferpool-tests-cache-key-secret"


def stack_settings(redis: RedisServer, memcached: MemcachedServer | None, **overrides: Any) -> Settings:
    return Settings.from_env(
        {},
        redis_url=redis.url,
        memcached=memcached.address if memcached else "",
        model_repository=ROOT / "models",
        grpc_port=0,
        **{"cache_key_secret": TEST_CACHE_KEY_SECRET, **overrides},
    )


class Worker(Proc):
    """`python -m inferpool.workers.main` as a real process, ready once it answers a Celery ping."""

    _count = 0

    def __init__(
        self,
        settings: Settings,
        logdir: Path,
        ready_timeout_s: float = 90,
        extra_env: dict[str, str] | None = None,
        launcher: tuple[str, ...] = ("-m", "inferpool.workers.main"),
    ) -> None:
        """`launcher`: what the interpreter runs instead of `-m inferpool.workers.main` (a wrapper
        that takes the worker's arguments after it, as scripts/miss_chain.py does)."""
        Worker._count += 1
        self.name = f"test-{os.getpid()}-{Worker._count}@localhost"
        self.settings = settings
        env = {**os.environ, **settings.env(), **(extra_env or {})}
        super().__init__(
            [sys.executable, *launcher, f"--hostname={self.name}"],
            logdir / f"worker-{Worker._count}.log",
            env=env,
        )
        # Pinged over its own broker: its models' shard (inferpool.shards).
        from inferpool.workers.app import served_repository

        broker = worker_broker(settings, served_repository(settings).names)
        self.control = make_celery(settings, main="test-control", broker_url=broker)
        self.ready(lambda: self._wait_ready(ready_timeout_s))

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.control.control.ping(destination=[self.name], timeout=0.5):
            if self.popen.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker did not become ready:\n{self.tail()}")

    def stats(self) -> dict[str, Any]:
        replies = self.control.control.broadcast(
            "inferpool_stats", destination=[self.name], reply=True, timeout=2.0
        )
        for reply in replies:
            if self.name in reply:
                result: dict[str, Any] = reply[self.name]
                return result
        raise RuntimeError(f"worker {self.name} did not answer inferpool_stats")

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 15) -> None:
        super().stop(sig, timeout_s)
        self.control.close()


class ApiThread:
    """The real grpc.aio server on port 0, in its own event loop on a thread, so tests
    can drive it with the blocking client and still reach its counters."""

    def __init__(self, settings: Settings) -> None:
        self.loop = asyncio.new_event_loop()
        started = threading.Event()
        self._error: BaseException | None = None

        async def start() -> None:
            # grpc.aio binds its server to the loop running when it is created.
            self.server = ApiServer(settings)
            await self.server.start()

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            try:
                self.loop.run_until_complete(start())
            except BaseException as exc:
                self._error = exc
                started.set()
                return
            started.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, name="api", daemon=True)
        self.thread.start()
        if not started.wait(30):
            raise TimeoutError("API did not start")
        if self._error is not None:
            raise self._error
        self.target = f"127.0.0.1:{self.server.port}"

    def call(self, fn: Callable[[], Any]) -> Any:
        """Runs fn on the server's loop (to read state without racing it)."""

        async def wrapper() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(wrapper(), self.loop).result(10)

    def stop(self, grace_s: float = 1.0) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(grace_s=grace_s), self.loop).result(grace_s + 20)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


class ApiProcess(Proc):
    """`python -m inferpool.api` as a real process on free ports (gRPC and /metrics), as deployed:
    SIGTERM drains it (INFERPOOL_DRAIN_S), SIGKILL kills it."""

    _count = 0

    def __init__(self, settings: Settings, logdir: Path, **env: str) -> None:
        ApiProcess._count += 1
        self.port, self.metrics_port = free_port(), free_port()
        variables = {
            **os.environ,
            **settings.env(),
            "INFERPOOL_GRPC_PORT": str(self.port),
            "INFERPOOL_METRICS_PORT": str(self.metrics_port),
            **env,
        }
        super().__init__(
            [sys.executable, "-m", "inferpool.api"], logdir / f"api-{ApiProcess._count}.log", env=variables
        )
        self.target = f"127.0.0.1:{self.port}"
        self.ready(lambda: wait_port(self.port, 60, self.popen))

    def answered(self, rpc: str = "Classify", code: str = "OK") -> float:
        """How many `rpc` calls this replica answered with `code` (its own counter)."""
        from bench.scrape import scrape, total

        return total(
            scrape(f"http://127.0.0.1:{self.metrics_port}/metrics"),
            "inferpool_requests_total",
            rpc=rpc,
            code=code,
        )


# --- Security stacks: certificates made at test time, Redis with a password
# and/or TLS, Memcached over TLS.


class TlsFiles:
    """A throwaway CA and, signed by it, a server certificate for 127.0.0.1/localhost
    and a client certificate (for mutual TLS), made with the openssl CLI (EC P-256,
    valid one day) so the tests need no extra Python package."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.dir = directory
        self.ca, self.ca_key = directory / "ca.pem", directory / "ca.key"
        self.cert, self.key = directory / "server.pem", directory / "server.key"
        self.client_cert, self.client_key = directory / "client.pem", directory / "client.key"
        openssl = _binary("openssl")
        newkey = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
        subprocess.run(
            [
                *(openssl, "req", "-x509", *newkey, "-keyout", str(self.ca_key), "-out", str(self.ca)),
                *("-days", "1", "-subj", "/CN=inferpool test CA"),
                *("-addext", "basicConstraints=critical,CA:TRUE"),
                *("-addext", "keyUsage=critical,keyCertSign,cRLSign"),
            ],
            check=True,
            capture_output=True,
        )
        self._sign("server", self.cert, self.key, "subjectAltName=IP:127.0.0.1,DNS:localhost\n")
        self._sign("client", self.client_cert, self.client_key, "extendedKeyUsage=clientAuth\n")

    def _sign(self, name: str, cert: Path, key: Path, extensions: str) -> None:
        openssl = _binary("openssl")
        csr, ext = self.dir / f"{name}.csr", self.dir / f"{name}.ext"
        ext.write_text(
            "basicConstraints=CA:FALSE\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n"
            + extensions
        )
        subprocess.run(
            [
                *(openssl, "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"),
                *("-keyout", str(key), "-out", str(csr), "-subj", f"/CN=inferpool test {name}"),
            ],
            check=True,
            capture_output=True,
        )
        subprocess.run(
            [
                *(openssl, "x509", "-req", "-in", str(csr), "-CA", str(self.ca), "-CAkey", str(self.ca_key)),
                *("-CAcreateserial", "-out", str(cert), "-days", "1", "-extfile", str(ext)),
            ],
            check=True,
            capture_output=True,
        )
        # memcached drops to `nobody` when started as root; it reads these after that.
        for path in (self.dir, cert, key, self.ca):
            path.chmod(0o755 if path.is_dir() else 0o644)


class SecureRedisServer(RedisServer):
    """redis-server with `requirepass` and/or TLS only (its plain-text port off)."""

    def __init__(self, logdir: Path, *, password: str = "", tls: TlsFiles | None = None) -> None:
        self.port = free_port()
        self.password = password
        self.tls = tls
        args = [_binary("redis-server"), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        args += ["--dir", str(logdir)]
        if password:
            args += ["--requirepass", password]
        if tls is not None:
            args += ["--port", "0", "--tls-port", str(self.port), "--tls-auth-clients", "no"]
            args += ["--tls-cert-file", str(tls.cert), "--tls-key-file", str(tls.key)]
            args += ["--tls-ca-cert-file", str(tls.ca)]
        else:
            args += ["--port", str(self.port)]
        Proc.__init__(self, args, logdir / f"redis-secure-{self.port}.log")
        self.ready(lambda: wait_port(self.port, 10, self.popen))

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        if self.tls is None:
            return f"redis://{auth}127.0.0.1:{self.port}/0"
        # redis-py and kombu both read these query parameters (kombu turns ssl_* into its ssl options).
        return f"rediss://{auth}127.0.0.1:{self.port}/0?ssl_cert_reqs=required&ssl_ca_certs={self.tls.ca}"


class TlsMemcachedServer(MemcachedServer):
    """memcached accepting TLS only (-Z), with the test CA's server certificate."""

    def __init__(self, logdir: Path, tls: TlsFiles) -> None:
        self.port = free_port()
        Proc.__init__(
            self,
            [
                _binary("memcached"),
                "--listen=127.0.0.1",
                f"--port={self.port}",
                "--udp-port=0",
                "--memory-limit=64",
                "--enable-ssl",
                f"--extended=ssl_chain_cert={tls.cert},ssl_key={tls.key}",
            ]
            + (["--user=nobody"] if os.geteuid() == 0 else []),
            logdir / f"memcached-tls-{self.port}.log",
        )
        self.ready(lambda: wait_port(self.port, 10, self.popen))
