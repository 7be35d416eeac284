"""Queue, task and key names: the wire-level agreement between API and workers.

Model names are restricted so that they are safe inside every name built here
(Redis keys, Celery queue and task names, Memcached keys).
"""

import re

MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

PREFIX = "inferpool"
BULK_SUFFIX = ".bulk"


def queue_name(model: str) -> str:
    """The Celery queue (a Redis list) that carries interactive requests for a model."""
    return f"{PREFIX}.{model}"


def bulk_queue_name(model: str) -> str:
    """The queue that carries bulk-job chunks for a model; workers serve it only when
    the interactive queue leaves room."""
    return f"{PREFIX}.{model}{BULK_SUFFIX}"


def is_interactive_queue(name: str) -> bool:
    """Whether a queue is a model's interactive queue (queue_name), not its bulk queue
    or one of Celery's own. (A model named like "x.bulk" reads as bulk: the safe side.)"""
    return name.startswith(f"{PREFIX}.") and not name.endswith(BULK_SUFFIX)


def bulk_task_name(model: str) -> str:
    return f"{PREFIX}.bulk.{model}"


def job_key(job_id: str) -> str:
    """Redis hash: the job record (state, counts, timestamps)."""
    return f"{PREFIX}:job:{job_id}"


def job_results_key(job_id: str) -> str:
    """Redis hash: item index -> serialized Reply, written once per index."""
    return f"{PREFIX}:job:{job_id}:results"


def job_idempotency_key(scope: str, key: str) -> str:
    """Redis string: a client's idempotency key -> the job it created."""
    return f"{PREFIX}:jobkey:{scope}:{key}"


def flight_key(cache_key: str) -> str:
    """Redis lock naming the API replica that computes an input others also wait for."""
    return f"{PREFIX}:flight:{cache_key}"


def dead_letter_key(queue: str) -> str:
    """Redis list where a queue's undecodable messages are kept for inspection (newest
    first, capped at DEAD_LETTER_MAX) instead of being retried forever."""
    return f"{queue}.dead"


DEAD_LETTER_MAX = 1000


def task_name(model: str) -> str:
    """Per-model task names make Flower's task list and Celery's stats readable per model."""
    return f"{PREFIX}.classify.{model}"


def reply_key(api_instance: str) -> str:
    """The Redis list one API process drains for all its pending requests."""
    return f"{PREFIX}:reply:{api_instance}"


def cache_key(key_format: str, model: str, version: int, digest: str) -> str:
    """Memcached key (<= 250 bytes, no spaces): the version is part of the key, so a
    new model version never serves an old version's answers, and so is the key format,
    so an entry is never read under a key computed another way."""
    return f"{PREFIX}:{key_format}:{model}:{version}:{digest}"
