"""What a client can make the front write to its status details and logs, and what
settings reveal: the tests that need no server (the rest:
tests/integration/test_hygiene.py)."""

from __future__ import annotations

import pytest

from inferpool.api import status
from inferpool.errors import clip
from inferpool.settings import Settings, SettingsError, redact

pytestmark = pytest.mark.timeout(120)


def test_log_rate_limit_counts_what_it_suppressed() -> None:
    now = [0.0]
    limiter = status.RateLimiter(10.0, clock=lambda: now[0])
    assert limiter.allow(("m", "undecodable")) == 0
    assert limiter.allow(("m", "undecodable")) is None
    assert limiter.allow(("m", "unimplemented")) == 0  # another kind has its own window
    now[0] = 9.9
    assert limiter.allow(("m", "undecodable")) is None
    now[0] = 10.0
    assert limiter.allow(("m", "undecodable")) == 2
    assert limiter.allow(("m", "undecodable")) is None


def test_details_and_clip_bound_client_text() -> None:
    assert status.details("short") == "short"
    cut = status.details("x" * 10_000)
    assert len(cut) == status.MAX_DETAILS_CHARS and cut.endswith("... (10000 chars)")
    assert clip("abc") == "'abc'"
    assert clip("y" * 1000) == repr("y" * 64) + "... (1000 chars)"


def test_settings_errors_redact_credentials() -> None:
    with pytest.raises(SettingsError) as info:
        Settings.from_env(
            {
                "INFERPOOL_REDIS_URL": "redis//:hunter2-redis@10.0.0.1:6379/0",  # malformed
                "INFERPOOL_GRPC_PORT": "http://admin:hunter2-port@x/",
            }
        )
    message = str(info.value)
    assert "hunter2" not in message
    assert "INFERPOOL_REDIS_URL='redis//:***@10.0.0.1:6379/0'" in message
    assert "INFERPOOL_GRPC_PORT='http://admin:***@x/'" in message
    with pytest.raises(SettingsError) as raised:
        raise SettingsError("cannot reach rediss://user:hunter2@h:6380/0?password=hunter3&db=1")
    assert str(raised.value) == "cannot reach rediss://user:***@h:6380/0?password=***&db=1"
    settings = Settings.from_env({}, redis_url="redis://:hunter2@h:1/0", auth_tokens="a:0123456789abcdef0")
    assert "hunter2" not in repr(settings) and "0123456789abcdef0" not in repr(settings)
    assert "redis_url='redis://:***@h:1/0'" in repr(settings)


def test_redact_leaves_urls_without_credentials_alone() -> None:
    for text in ("redis://127.0.0.1:6379/0", "unix:///run/redis.sock?db=2", "no url: at all@here"):
        assert redact(text) == text
