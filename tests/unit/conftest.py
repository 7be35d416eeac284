"""tests/unit needs no servers and runs in seconds (`pytest tests/unit`): a test here
that asks for one of the server fixtures fails at once, naming where it belongs."""

from __future__ import annotations

from collections.abc import Callable

import pytest

SERVER_FIXTURES = (
    "redis_server",
    "memcached_server",
    "fresh_redis",
    "fresh_memcached",
    "worker",
    "api",
    "client",
    "redis_client",
)


def _refused(name: str) -> Callable[[], None]:
    @pytest.fixture(name=name)
    def fixture() -> None:
        pytest.fail(f"{name} starts a server: a test that needs it belongs in tests/integration/")

    return fixture


for _name in SERVER_FIXTURES:
    globals()[f"_{_name}"] = _refused(_name)
