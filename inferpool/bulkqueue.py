"""The bulk queues: a reliable Redis list queue for bulk-job chunks.

Bulk chunks need at-least-once delivery across a worker being SIGKILLed. kombu's
Redis transport cannot give it: BRPOP removes a message from the list before the
consumer records it as unacknowledged, so a kill in between loses the chunk (seen
here as ~1 in 4 kills losing one chunk). Here a chunk never exists outside Redis:

- the API pushes (`push_chunk`, LPUSH) the encoded Envelope onto `inferpool.<model>.bulk` (no JSON, no
  base64: the body is the protobuf itself);
- a worker takes it with LMOVE (atomic) into its own processing list, one per
  consumer and queue, and LREMs it from there once every item's result is written;
- each consumer holds a short lease key it renews often (seconds, not minutes: a
  dead worker's chunks wait at most about a lease for another worker to take them
  back); when a lease lapses (the worker died), any other consumer's reaper moves that
  consumer's processing lists back onto their queues, and the job's idempotent result
  writes absorb the repeat. A live consumer's lists are never touched: the lease check
  and the move are one script;
- a chunk moved by an LMOVE whose reply was lost with its connection sits in the
  processing list of a consumer that does not know it holds it; the consumer puts
  such chunks back itself (`return_unheld`), or its job would never finish.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import redis

from inferpool.names import DEAD_LETTER_MAX, PREFIX, dead_letter_key

CONSUMERS = f"{PREFIX}:bulk:consumers"


def processing_key(consumer: str, queue: str) -> str:
    return f"{PREFIX}:bulk:processing:{consumer}:{queue}"


def lease_key(consumer: str) -> str:
    return f"{PREFIX}:bulk:lease:{consumer}"


# KEYS: the consumers hash, the consumer's lease (or '' to force), queue1, processing1,
# ... ARGV: the consumer. Unless its lease is alive, puts every chunk of the consumer
# back at the head of its queue, the oldest first in line, and forgets the consumer;
# returns how many chunks.
REAP = """
if KEYS[2] ~= '' and redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
local n = 0
for i = 3, #KEYS, 2 do
  while redis.call('LMOVE', KEYS[i + 1], KEYS[i], 'LEFT', 'RIGHT') do n = n + 1 end
end
redis.call('HDEL', KEYS[1], ARGV[1])
return n
"""

# KEYS: processing, queue. ARGV: chunk. Back at the head of its queue (its results
# could not be written).
REQUEUE = """
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 1 then redis.call('RPUSH', KEYS[2], ARGV[1]) end
return 1
"""


if TYPE_CHECKING:
    import redis.asyncio as aioredis


async def push_chunk(client: aioredis.Redis, queue: str, chunk: bytes) -> None:
    """The producer's side (the API): one encoded Envelope onto `queue`, at the end
    opposite to where BulkQueues.take takes from (first in, first out)."""
    await client.lpush(queue, chunk)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class BulkQueues:
    """One consumer's view of the bulk queues it serves (blocking; one thread uses it)."""

    def __init__(self, client: redis.Redis, consumer: str, queues: list[str], lease_s: float) -> None:
        self.client = client
        self.consumer = consumer
        self.queues = queues
        self.lease_ms = max(1, int(lease_s * 1000))
        self._reap = client.register_script(REAP)
        self._requeue = client.register_script(REQUEUE)

    @staticmethod
    def _pairs(consumer: str, queues: list[str]) -> list[str]:
        return [k for q in queues for k in (q, processing_key(consumer, q))]

    def renew(self) -> None:
        """Renews the lease and announces this consumer with its queues, so that any worker
        can reap them. Announced on each renewal: a consumer a reaper forgot (its lease
        had lapsed though it lived, or Redis restarted empty) is back a renewal later."""
        pipe = self.client.pipeline(transaction=False)
        pipe.set(lease_key(self.consumer), 1, px=self.lease_ms)
        pipe.hset(CONSUMERS, self.consumer, ",".join(self.queues))
        pipe.execute()

    def take(self, block_s: float = 0.0) -> tuple[str, bytes] | None:
        """The oldest chunk of the first non-empty queue, moved into this consumer's
        processing list. With block_s, waits that long for the first queue (the others
        are looked at again on the next call)."""
        # One LMOVE per queue, not a Lua loop over them: a script copies the chunk into a
        # Lua string and back, which cost Redis ~1 ms of CPU per 256-item chunk.
        for queue in self.queues:
            processing = processing_key(self.consumer, queue)
            chunk: bytes | None = self.client.execute_command("LMOVE", queue, processing, "RIGHT", "LEFT")
            if chunk is not None:
                return queue, chunk
        if block_s <= 0:
            return None
        first = self.queues[0]
        moved: bytes | None = self.client.execute_command(
            "BLMOVE", first, processing_key(self.consumer, first), "RIGHT", "LEFT", block_s
        )
        return (first, moved) if moved is not None else None

    def delivery(self, chunk_id: str, ttl_s: int = 86400) -> int:
        """How many times the chunk `chunk_id` has been taken, this time included (a
        redelivery after a lost lease counts 2 and up). Traced workers only ask."""
        key = f"{PREFIX}:bulk:delivery:{chunk_id}"
        pipe = self.client.pipeline(transaction=False)
        pipe.incr(key)
        pipe.expire(key, ttl_s)
        return int(pipe.execute()[0])

    def ack(self, queue: str, chunk: bytes) -> None:
        self.client.execute_command("LREM", processing_key(self.consumer, queue), 1, chunk)

    def requeue(self, queue: str, chunk: bytes) -> None:
        self._requeue(keys=[processing_key(self.consumer, queue), queue], args=[chunk])

    def dead_letter(self, queue: str, chunk: bytes) -> None:
        pipe = self.client.pipeline(transaction=True)
        pipe.execute_command("LREM", processing_key(self.consumer, queue), 1, chunk)
        pipe.lpush(dead_letter_key(queue), chunk)
        pipe.ltrim(dead_letter_key(queue), 0, DEAD_LETTER_MAX - 1)
        pipe.execute()

    def reap(self) -> int:
        """Puts the chunks of every consumer whose lease lapsed back on their queues;
        returns how many."""
        moved = 0
        for raw_consumer, raw_queues in self.client.hgetall(CONSUMERS).items():
            other = _text(raw_consumer)
            if other == self.consumer:
                continue
            queues = [q for q in _text(raw_queues).split(",") if q]
            keys = [CONSUMERS, lease_key(other), *self._pairs(other, queues)]
            moved += int(self._reap(keys=keys, args=[other]))
        return moved

    def return_unheld(self, queue: str, held: list[bytes], check_all: bool = False) -> int:
        """Puts back on `queue` the chunks in this consumer's processing list that it does
        not hold (`held`: the bodies it does); returns how many. Without check_all, looks
        only when the list is longer than `held`."""
        processing = processing_key(self.consumer, queue)
        if not check_all and int(self.client.llen(processing)) <= len(held):
            return 0
        unmatched = list(held)
        returned = 0
        listed: list[bytes] = self.client.lrange(processing, 0, -1)  # type: ignore[assignment]
        for body in listed:
            if body in unmatched:
                unmatched.remove(body)
            else:
                self.requeue(queue, body)
                returned += 1
        return returned

    def release(self) -> int:
        """On shutdown: everything this consumer still holds goes back to its queues."""
        n = int(
            self._reap(keys=[CONSUMERS, "", *self._pairs(self.consumer, self.queues)], args=[self.consumer])
        )
        self.client.delete(lease_key(self.consumer))
        return n
