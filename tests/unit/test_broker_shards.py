"""The model -> broker map (INFERPOOL_BROKER_SHARDS) as the settings, the API and the
workers read it (tests/integration/test_broker_shards.py runs it on two Redis)."""

from __future__ import annotations

from pathlib import Path

import pytest

from inferpool.settings import Settings, SettingsError
from inferpool.shards import broker_url, brokers_by_url, worker_broker

ROOT = Path(__file__).resolve().parents[2]
MAIN, SHARD = "redis://main:6379/0", "redis://shard:6379/0"


def _settings(**env: str) -> Settings:
    return Settings.from_env(
        {"INFERPOOL_REDIS_URL": MAIN, "INFERPOOL_MODEL_REPOSITORY": str(ROOT / "models"), **env}
    )


def test_listed_models_go_to_their_shard_and_the_rest_to_the_main_redis() -> None:
    settings = _settings(INFERPOOL_BROKER_SHARDS=f" b={SHARD}, c={SHARD} ")
    assert broker_url(settings, "a") == MAIN and broker_url(settings, "b") == SHARD
    assert brokers_by_url(settings, ["a", "b", "c"]) == {MAIN: ["a"], SHARD: ["b", "c"]}
    # The main Redis is always there (job records, bulk queues), even with no model on it.
    assert brokers_by_url(settings, ["b"]) == {MAIN: [], SHARD: ["b"]}


@pytest.mark.parametrize("bad", ["b", f"b={SHARD},b={MAIN}", "b=http://x", f"no/name={SHARD}"])
def test_a_malformed_map_is_refused_at_start_up(bad: str) -> None:
    with pytest.raises(SettingsError, match="INFERPOOL_BROKER_SHARDS"):
        _settings(INFERPOOL_BROKER_SHARDS=bad)


def test_a_worker_consumes_from_its_models_one_shard() -> None:
    settings = _settings(INFERPOOL_BROKER_SHARDS=f"b={SHARD}")
    assert worker_broker(settings, ["b"]) == SHARD
    assert worker_broker(settings, ["a"]) == MAIN
    with pytest.raises(SettingsError, match="INFERPOOL_WORKER_MODELS"):
        worker_broker(settings, ["a", "b"])


def test_a_worker_whose_models_span_shards_refuses_to_start() -> None:
    from inferpool.workers.app import create_app

    settings = _settings(
        INFERPOOL_BROKER_SHARDS="digits_onnx=redis://127.0.0.1:1/0",
        INFERPOOL_CACHE_KEY_SECRET="a-unit-test-secret-of-enough-length",
    )
    with pytest.raises(SettingsError, match="INFERPOOL_WORKER_MODELS"):
        create_app(settings)
    # Given one shard's models, it starts on that shard's Redis (no connection made yet).
    app = create_app(Settings.from_env({**settings.env(), "INFERPOOL_WORKER_MODELS": "digits_onnx"}))
    assert app.conf.broker_url == "redis://127.0.0.1:1/0"
