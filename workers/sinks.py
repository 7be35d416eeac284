"""Where a batch's interactive answers go: the reply lists of the API processes waiting for them.

Bulk results go into their job through inferpool.jobs.JobStore."""

from __future__ import annotations

import redis


class ReplySink:
    """Writes replies to their reply lists, one pipeline per batch."""

    def __init__(self, client: redis.Redis, reply_ttl_s: int) -> None:
        self.client = client
        self.reply_ttl_s = reply_ttl_s

    def push(self, replies: dict[str, list[bytes]]) -> None:
        pipe = self.client.pipeline(transaction=False)
        for key, values in replies.items():
            pipe.rpush(key, *values)
            # The list outlives its API process only by the TTL.
            pipe.expire(key, self.reply_ttl_s)
        pipe.execute()
