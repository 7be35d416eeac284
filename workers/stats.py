"""`celery inspect inferpool_stats`: a worker's counts, read from its Prometheus metrics.

Each event is counted once, in workers/metrics.py; this sums those series into the
few numbers tests and operators ask a worker for over Celery's remote control (what it
really computed, dropped, split or dead-lettered), so the two can never disagree.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client.metrics import MetricWrapperBase

from inferpool.names import bulk_task_name
from inferpool.workers import metrics

_BULK_TASK_PREFIX = bulk_task_name("")


def _total(
    metric: MetricWrapperBase, suffix: str = "_total", where: Callable[[dict[str, str]], bool] | None = None
) -> float:
    """The sum of `metric`'s samples named <name><suffix> whose labels pass `where`."""
    return sum(
        sample.value
        for family in metric.collect()
        for sample in family.samples
        if sample.name.endswith(suffix) and (where is None or where(sample.labels))
    )


def _is(label: str, *values: str) -> Callable[[dict[str, str]], bool]:
    return lambda labels: labels.get(label) in values


def snapshot() -> dict[str, Any]:
    """The worker's counts since it started, by the names `inferpool_stats` has always used."""
    buckets: dict[str, float] = {}
    for family in metrics.BATCH_SIZE.collect():
        for sample in family.samples:
            if sample.name.endswith("_bucket"):
                le = sample.labels["le"]
                buckets[le] = buckets.get(le, 0.0) + sample.value
    return {
        "batches": int(_total(metrics.BATCH_SIZE, "_count")),
        "items_computed": int(_total(metrics.COMPUTED, where=_is("outcome", "ok"))),
        "items_failed": int(
            _total(metrics.COMPUTED, where=_is("outcome", "failed"))
            + _total(metrics.DROPPED, where=_is("reason", "invalid"))
        ),
        "items_expired": int(_total(metrics.DROPPED, where=_is("reason", "expired"))),
        "items_cancelled": int(_total(metrics.DROPPED, where=_is("reason", "cancelled"))),
        "messages_expired": int(_total(metrics.TASKS, where=_is("state", "expired"))),
        "messages_poison": int(_total(metrics.TASKS, where=_is("state", "rejected"))),
        "messages_inline": int(_total(metrics.INLINE_MESSAGES)),
        "messages_revoked": int(_total(metrics.TASKS, where=_is("state", "revoked"))),
        "batches_split": int(_total(metrics.SPLIT_BATCHES)),
        "chunks_done": int(
            _total(
                metrics.TASKS,
                where=lambda labels: (
                    labels["state"] == "succeeded" and labels["task"].startswith(_BULK_TASK_PREFIX)
                ),
            )
        ),
        "compute_s": round(_total(metrics.COMPUTE_DURATION, "_sum"), 6),
        # Batches by size, cumulative per histogram bucket (Prometheus' `le`).
        "batch_sizes": {le: int(n) for le, n in buckets.items()},
    }
