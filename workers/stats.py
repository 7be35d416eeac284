"""Worker counters, readable over Celery's remote control (`inferpool_stats`).

Tests and operators use them to see what a worker really computed: batches and
their sizes, and requests dropped because their deadline passed before compute.
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any


class WorkerStats:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.batches = 0
        self.items_computed = 0
        self.items_expired = 0
        self.messages_expired = 0
        self.items_failed = 0
        self.messages_poison = 0
        self.messages_inline = 0  # taken on the consumer thread (workers/strategy.py)
        self.items_cancelled = 0
        self.batches_split = 0  # batches the model failed on, rerun item by item
        self.chunks_done = 0
        self.compute_s = 0.0
        self.batch_sizes: Counter[int] = Counter()

    def batch(self, size: int, compute_s: float) -> None:
        with self._lock:
            self.batches += 1
            self.items_computed += size
            self.compute_s += compute_s
            self.batch_sizes[size] += 1

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + n)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "batches": self.batches,
                "items_computed": self.items_computed,
                "items_expired": self.items_expired,
                "messages_expired": self.messages_expired,
                "items_failed": self.items_failed,
                "messages_poison": self.messages_poison,
                "messages_inline": self.messages_inline,
                "items_cancelled": self.items_cancelled,
                "batches_split": self.batches_split,
                "chunks_done": self.chunks_done,
                "compute_s": round(self.compute_s, 6),
                # JSON object keys must be strings.
                "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())},
            }


STATS = WorkerStats()
