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

States are stored by name ("QUEUED"), the JobState enum without its prefix.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Mapping
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from inferpool.v1 import jobs_pb2

LIVE = ("QUEUED", "RUNNING")
TERMINAL = ("SUCCEEDED", "FAILED", "CANCELLED", "EXPIRED")

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
        "state": "QUEUED",
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
