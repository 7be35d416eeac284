"""Bulk-job records in Redis: the layout and the atomic updates both sides share.

A job is two hashes: the record (`names.job_key`: state, counts, timestamps) and
its results (`names.job_results_key`: item index -> serialized Reply). Every
change goes through one of the Lua scripts below, so it is atomic in Redis:

- RECORD writes results with HSETNX and counts only the indexes that were new.
  A chunk redelivered after a worker died rewrites nothing and counts nothing
  twice: execution is at-least-once, results exactly-once.
- SEAL fixes the total once the upload ends; a job ends when it is sealed and
  every item has a result.
- END / ABORT / OBSERVE move a live job to CANCELLED / FAILED / EXPIRED (ABORT, for a
  broken upload, also frees its idempotency key in the same step).

States are stored by name ("QUEUED"), the JobState enum without its prefix (State).
JobStore (blocking, the workers') and AsyncJobStore (the API's) are the two faces of
the store: both call the one script set below, registered on their own client.
"""

from __future__ import annotations

import enum
import secrets
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

from google.protobuf.timestamp_pb2 import Timestamp

from inferpool.names import job_key, job_results_key
from inferpool.v1 import jobs_pb2

if TYPE_CHECKING:  # the client SDK imports this module and does not depend on redis
    import redis
    import redis.asyncio as aioredis


class State(enum.StrEnum):
    """A job's state as stored in Redis (the scripts below spell the same names)."""

    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    EXPIRED = "EXPIRED"


LIVE = (State.QUEUED, State.RUNNING)
TERMINAL = (State.SUCCEEDED, State.FAILED, State.CANCELLED, State.EXPIRED)

# Result kinds passed to RECORD.
OK, CACHED, FAILED = "ok", "cached", "failed"

_SETTLE = """
local function settle(job, now)
  local f = redis.call('HMGET', job, 'state', 'sealed', 'total', 'done', 'failed', 'started_ms')
  local state = f[1]
  if f[2] ~= '1' or (state ~= 'QUEUED' and state ~= 'RUNNING') then return state end
  local total, done, failed = tonumber(f[3]), tonumber(f[4]), tonumber(f[5])
  if done + failed < total then return state end
  local final = 'SUCCEEDED'
  if total > 0 and done == 0 then
    final = 'FAILED'
    redis.call('HSET', job, 'error', 'every item failed')
  end
  redis.call('HSET', job, 'state', final, 'finished_ms', now)
  if f[6] == '0' then redis.call('HSET', job, 'started_ms', now) end
  return final
end
"""

# KEYS: job, results. ARGV: now_ms, then (index, kind, payload) triples.
# Returns {new results, the job's state after them}, or {-1, ''} when the job no longer
# exists: the state tells a worker, at no extra round trip, to stop computing a job
# that was cancelled or ended.
RECORD = (
    _SETTLE
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return {-1, ''} end
local done, failed, cached = 0, 0, 0
for i = 2, #ARGV, 3 do
  if redis.call('HSETNX', KEYS[2], ARGV[i], ARGV[i + 2]) == 1 then
    if ARGV[i + 1] == 'failed' then
      failed = failed + 1
    else
      done = done + 1
      if ARGV[i + 1] == 'cached' then cached = cached + 1 end
    end
  end
end
if done + failed == 0 then return {0, redis.call('HGET', KEYS[1], 'state')} end
redis.call('HINCRBY', KEYS[1], 'done', done)
redis.call('HINCRBY', KEYS[1], 'failed', failed)
redis.call('HINCRBY', KEYS[1], 'cached', cached)
-- Results live exactly as long as their record.
redis.call('PEXPIRE', KEYS[2], math.max(1, redis.call('PTTL', KEYS[1])))
if redis.call('HGET', KEYS[1], 'state') == 'QUEUED' then
  redis.call('HSET', KEYS[1], 'state', 'RUNNING', 'started_ms', ARGV[1])
end
return {done + failed, settle(KEYS[1], ARGV[1])}
"""
)

# KEYS: job. ARGV: now_ms, total. Returns the state after sealing.
SEAL = (
    _SETTLE
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
redis.call('HSET', KEYS[1], 'total', ARGV[2], 'sealed', '1')
return settle(KEYS[1], ARGV[1])
"""
)

# KEYS: job. ARGV: now_ms, target state, error. Moves a live job to the target
# state; returns the state after the call (false when the job does not exist).
END = """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local state = redis.call('HGET', KEYS[1], 'state')
if state == 'QUEUED' or state == 'RUNNING' then
  redis.call('HSET', KEYS[1], 'state', ARGV[2], 'finished_ms', ARGV[1], 'error', ARGV[3])
  return ARGV[2]
end
return state
"""

# KEYS: job, idempotency key (or ''). ARGV: now_ms, error, job id. Fails a job whose
# upload broke off and, in the same step, frees the idempotency key if it still names
# this job: whoever sees the job FAILED can retry with the key at once.
ABORT = """
if KEYS[2] ~= '' and redis.call('GET', KEYS[2]) == ARGV[3] then redis.call('DEL', KEYS[2]) end
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local state = redis.call('HGET', KEYS[1], 'state')
if state == 'QUEUED' or state == 'RUNNING' then
  redis.call('HSET', KEYS[1], 'state', 'FAILED', 'finished_ms', ARGV[1], 'error', ARGV[2])
  return 'FAILED'
end
return state
"""

# KEYS: job. ARGV: now_ms. The record, after ending it EXPIRED if its deadline passed.
OBSERVE = """
local f = redis.call('HMGET', KEYS[1], 'state', 'deadline_ms')
if not f[1] then return false end
if (f[1] == 'QUEUED' or f[1] == 'RUNNING') and tonumber(f[2]) > 0 and tonumber(f[2]) <= tonumber(ARGV[1]) then
  redis.call('HSET', KEYS[1], 'state', 'EXPIRED', 'finished_ms', ARGV[1],
    'error', 'the job timeout passed before every item ran')
end
return redis.call('HGETALL', KEYS[1])
"""


def new_job_id() -> str:
    """128 random bits: job ids are capabilities, so they must not be guessable."""
    return secrets.token_hex(16)


def record_args(now_ms: int, entries: Iterable[tuple[int, str, bytes]]) -> list[int | str | bytes]:
    args: list[int | str | bytes] = [now_ms]
    for index, kind, payload in entries:
        args += [index, kind, payload]
    return args


def new_record(
    model: str, version: int, top_k: int, now_ms: int, deadline_ms: int, owner: str
) -> dict[Any, Any]:  # redis-py's hset(mapping=) wants its own key union
    return {
        "model": model,
        "version": version,
        "state": State.QUEUED.value,
        "top_k": top_k,
        "total": 0,
        "sealed": 0,
        "done": 0,
        "failed": 0,
        "cached": 0,
        "created_ms": now_ms,
        "started_ms": 0,
        "finished_ms": 0,
        "deadline_ms": deadline_ms,
        "owner": owner,
        "error": "",
    }


def decode_record(raw: Mapping[bytes, bytes] | list[bytes]) -> dict[str, str]:
    """HGETALL's reply (a mapping, or the flat list a Lua script returns) as str -> str."""
    if isinstance(raw, list):
        raw = dict(zip(raw[::2], raw[1::2], strict=True))
    return {k.decode(): v.decode() for k, v in raw.items()}


def _timestamp(ms: str) -> Timestamp | None:
    if not ms or ms == "0":
        return None
    ts = Timestamp()
    ts.FromMilliseconds(int(ms))
    return ts


def to_proto(job_id: str, record: Mapping[str, str]) -> jobs_pb2.Job:
    job = jobs_pb2.Job(
        job_id=job_id,
        model=record["model"],
        version=int(record["version"]),
        state="JOB_STATE_" + record["state"],
        counts=jobs_pb2.JobCounts(
            total=int(record["total"]),
            done=int(record["done"]),
            failed=int(record["failed"]),
            cached=int(record["cached"]),
        ),
        error=record.get("error", ""),
    )
    for name in ("created", "started", "finished"):
        ts = _timestamp(record.get(f"{name}_ms", ""))
        if ts is not None:
            getattr(job, name).CopyFrom(ts)
    return job


def state_name(state: int) -> str:
    """JobState enum value -> the short name used in Redis, logs and the CLI."""
    return jobs_pb2.JobState.Name(state).removeprefix("JOB_STATE_")


EXPIRED_ERROR = "the job timeout passed before every item ran"
# Results written to Redis per script call: a long list goes in slices, so one call never
# holds Redis (and every call waiting on it) for long.
RECORD_BATCH = 512


def now_ms() -> int:
    return int(time.time() * 1000)


def _text(value: bytes | str | None) -> str:
    return value.decode() if isinstance(value, bytes) else str(value or "")


class _Scripts:
    """The job scripts, registered on one client, blocking or asyncio (redis-py's Script
    is called the same way on both; on an asyncio client the call is awaited)."""

    def __init__(self, client: Any) -> None:
        self.record = client.register_script(RECORD)
        self.seal = client.register_script(SEAL)
        self.end = client.register_script(END)
        self.abort = client.register_script(ABORT)
        self.observe = client.register_script(OBSERVE)


def _record_call(job_id: str, entries: Iterable[tuple[int, str, bytes]]) -> dict[str, Any]:
    return {"keys": [job_key(job_id), job_results_key(job_id)], "args": record_args(now_ms(), entries)}


def _end_call(job_id: str, state: State, error: str) -> dict[str, Any]:
    return {"keys": [job_key(job_id)], "args": [now_ms(), state.value, error]}


class JobStore:
    """The workers' face: writes results (idempotently per item index) and answers
    whether a job still wants its items computed."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self._scripts = _Scripts(client)

    def record(self, job_id: str, entries: Iterable[tuple[int, str, bytes]]) -> tuple[int, str | None]:
        """How many results were new (-1: the job is gone), and the job's state after
        them ("" when gone, None when there was nothing to write)."""
        call = _record_call(job_id, entries)
        if len(call["args"]) == 1:
            return 0, None
        new, state = self._scripts.record(**call)
        return int(new), _text(state)

    def live(self, job_ids: Iterable[str]) -> set[str]:
        """The jobs among these that are neither ended nor expired from Redis."""
        ids = list(job_ids)
        pipe = self.client.pipeline(transaction=False)
        for job_id in ids:
            pipe.hget(job_key(job_id), "state")
        states = pipe.execute()
        return {job_id for job_id, state in zip(ids, states, strict=True) if _text(state) in LIVE}

    def expire(self, job_id: str) -> None:
        self._scripts.end(**_end_call(job_id, State.EXPIRED, EXPIRED_ERROR))


class AsyncJobStore:
    """The API's face: creates, seals, ends and reads jobs, and records the results it
    knows at once (invalid or cached items). Redis errors propagate to the caller."""

    def __init__(self, client: aioredis.Redis, ttl_s: int) -> None:
        self.client = client
        self.ttl_s = ttl_s
        self._scripts = _Scripts(client)

    async def create(self, job_id: str, record: Mapping[Any, Any]) -> None:
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(job_key(job_id), mapping=dict(record))
        pipe.pexpire(job_key(job_id), self.ttl_s * 1000)
        await pipe.execute()

    async def record(self, job_id: str, entries: Sequence[tuple[int, str, bytes]]) -> None:
        for at in range(0, len(entries), RECORD_BATCH):
            await self._scripts.record(**_record_call(job_id, entries[at : at + RECORD_BATCH]))

    async def seal(self, job_id: str, total: int) -> None:
        await self._scripts.seal(keys=[job_key(job_id)], args=[now_ms(), total])

    async def end(self, job_id: str, state: State, error: str = "") -> str:
        """Moves a live job to `state`; the state after the call ("" if it is gone)."""
        return _text(await self._scripts.end(**_end_call(job_id, state, error)))

    async def abort(self, job_id: str, idempotency_key: str, error: str) -> None:
        """Fails a job whose upload broke off, freeing `idempotency_key` (a Redis key, or
        "") if it still names this job."""
        await self._scripts.abort(keys=[job_key(job_id), idempotency_key], args=[now_ms(), error, job_id])

    async def observe(self, job_id: str) -> dict[str, str] | None:
        """The record (ended EXPIRED first if its deadline passed), or None."""
        raw = await self._scripts.observe(keys=[job_key(job_id)], args=[now_ms()])
        return decode_record(raw) if raw else None

    async def results(self, job_id: str, indexes: list[int]) -> list[bytes | None]:
        # bytes: the API's client does not decode responses.
        return cast(list[bytes | None], await self.client.hmget(job_results_key(job_id), indexes))
