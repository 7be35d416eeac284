"""The API's Redis clients for requests, by model: the main Redis (INFERPOOL_REDIS_URL)
and one client per shard of INFERPOOL_BROKER_SHARDS (inferpool.shards). The publisher
pushes a model's envelopes, and takes their flight locks, on its model's client; the
reply listener pops this replica's reply list on every one of them."""

from __future__ import annotations

from collections.abc import Mapping

import redis.asyncio as aioredis

from inferpool.settings import Settings
from inferpool.shards import shard_map


class Brokers:
    def __init__(self, main: aioredis.Redis, shards: Mapping[str, aioredis.Redis] | None = None) -> None:
        self.main = main
        self._by_model = dict(shards or {})
        # Distinct clients, the main one first: what the reply listener pops.
        self.all = [main, *{id(c): c for c in self._by_model.values() if c is not main}.values()]

    @classmethod
    def from_settings(cls, settings: Settings, main: aioredis.Redis) -> Brokers:
        """`main` for redis_url, and a client of its own for each other shard URL."""
        clients: dict[str, aioredis.Redis] = {settings.redis_url: main}
        shards = {}
        for model, url in shard_map(settings).items():
            if url not in clients:
                clients[url] = aioredis.Redis.from_url(
                    url, socket_connect_timeout=1.0, health_check_interval=10
                )
            shards[model] = clients[url]
        return cls(main, shards)

    def of(self, model: str) -> aioredis.Redis:
        """The client that carries `model`'s requests."""
        return self._by_model.get(model, self.main)

    async def close(self) -> None:
        """Closes the shards' clients (the main one is its owner's to close)."""
        for client in self.all[1:]:
            await client.aclose()


def brokers(client: aioredis.Redis | Brokers) -> Brokers:
    """`client` as Brokers: a bare client carries every model."""
    return client if isinstance(client, Brokers) else Brokers(client)
