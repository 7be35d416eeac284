from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis

from inferpool.client import Client
from tests.servers import ApiThread, MemcachedServer, Proc, RedisServer, Worker, stack_settings

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session", autouse=True)
def _reap_processes() -> Iterator[None]:
    yield
    for proc in list(Proc.live):
        proc.kill()


@pytest.fixture(scope="session")
def logdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("logs")


@pytest.fixture(scope="session")
def redis_server(logdir: Path) -> Iterator[RedisServer]:
    server = RedisServer(logdir)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def memcached_server(logdir: Path) -> Iterator[MemcachedServer]:
    server = MemcachedServer(logdir)
    yield server
    server.stop()


@pytest.fixture
def fresh_redis(logdir: Path) -> Iterator[RedisServer]:
    """A Redis of the test's own, for stacks a test may break or must keep apart."""
    server = RedisServer(logdir)
    yield server
    server.stop()


@pytest.fixture
def fresh_memcached(logdir: Path) -> Iterator[MemcachedServer]:
    server = MemcachedServer(logdir)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def worker(redis_server: RedisServer, memcached_server: MemcachedServer, logdir: Path) -> Iterator[Worker]:
    w = Worker(stack_settings(redis_server, memcached_server), logdir)
    yield w
    w.stop()


@pytest.fixture(scope="session")
def api(redis_server: RedisServer, memcached_server: MemcachedServer, worker: Worker) -> Iterator[ApiThread]:
    # No shedding on loop lag here: this API shares its GIL with the test process, whose
    # own work (a browser, an OTLP receiver, fuzzing) can stall its loop for a moment and
    # turn an unrelated test's call into RESOURCE_EXHAUSTED. tests/integration/
    # test_overload.py sheds on lag with an API of its own.
    server = ApiThread(stack_settings(redis_server, memcached_server, shed_loop_lag_ms=0))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def client(api: ApiThread) -> Iterator[Client]:
    with Client(api.target) as c:
        yield c


@pytest.fixture(scope="session")
def redis_client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    r = redis.Redis.from_url(redis_server.url)
    yield r
    r.close()


@pytest.fixture(scope="session")
def heldout() -> tuple[np.ndarray, np.ndarray]:
    data = np.load(ROOT / "models" / "digits" / "heldout.npz")
    return data["x"], data["y"]
