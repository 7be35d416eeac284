"""Which Redis carries a model's requests: the model -> broker URL map
(INFERPOOL_BROKER_SHARDS) that the API's publisher, its reply listener, the workers and
the queue-depth gauges all read, so that one Redis is not the ceiling of the pool.

A model is the unit: a miss's whole trip stays on its model's Redis (the envelope, its
items' flight locks, taken and pushed in one script, and the worker's reply). Job
records, bulk queues, idempotency keys and auth stay on INFERPOOL_REDIS_URL. Why not
Redis Cluster: docs/decisions.md.
"""

from __future__ import annotations

from collections.abc import Iterable

from inferpool.settings import Settings, SettingsError


def shard_map(settings: Settings) -> dict[str, str]:
    """model -> broker URL, for the models INFERPOOL_BROKER_SHARDS lists."""
    shards = {}
    for entry in filter(None, settings.broker_shards.split(",")):
        model, _, url = entry.partition("=")
        shards[model.strip()] = url.strip()
    return shards


def broker_url(settings: Settings, model: str) -> str:
    """The Redis that carries `model`'s requests and replies."""
    return shard_map(settings).get(model, settings.redis_url)


def brokers_by_url(settings: Settings, models: Iterable[str]) -> dict[str, list[str]]:
    """`models` grouped by the broker URL that carries them, the main one first."""
    groups: dict[str, list[str]] = {settings.redis_url: []}
    shards = shard_map(settings)
    for model in models:
        groups.setdefault(shards.get(model, settings.redis_url), []).append(model)
    return {url: names for url, names in groups.items() if names or url == settings.redis_url}


def worker_broker(settings: Settings, models: Iterable[str]) -> str:
    """The one broker a worker serving `models` consumes from (SettingsError when they
    are on several: a Celery worker has one broker; start one worker per shard)."""
    groups = {url: names for url, names in brokers_by_url(settings, models).items() if names}
    if len(groups) > 1:
        spread = "; ".join(f"{', '.join(names)} on shard {i}" for i, names in enumerate(groups.values()))
        raise SettingsError(
            f"this worker's models are on {len(groups)} brokers ({spread}): set INFERPOOL_WORKER_MODELS "
            "to the models of one INFERPOOL_BROKER_SHARDS entry"
        )
    return next(iter(groups), settings.redis_url)
