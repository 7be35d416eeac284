"""The model alone, no RPC and no queue: items/s by batch size, in this process.

Every benchmark that compares with the compute limit times the model through here
(`ModelRunner`, the same frozen TorchScript the worker runs).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path


def batch_sizes(max_batch_size: int) -> list[int]:
    return sorted({b for b in (1, 8, 16, 32, 64, 128) if b <= max_batch_size} | {max_batch_size})


def model_alone(
    repository: Path, model: str, seconds: float = 0.5, repeats: int = 3, torch_threads: int | None = None
) -> dict[str, float]:
    """Items/s of `model` by batch size, up to its max_batch_size: the median of
    `repeats` timings of `seconds` each. `torch_threads` None = every usable core (the
    machine's compute limit); 0 = the worker's own rule (the usable cores minus one)."""
    import numpy as np

    from inferpool.repository import Repository
    from inferpool.workers.runtime import ModelRunner, configure_threads, pick_device, usable_cores

    configure_threads(usable_cores() if torch_threads is None else torch_threads)
    cfg = Repository.load(repository).resolve(model, 0)
    runner = ModelRunner(cfg, pick_device("cpu"))
    runner.warm_up()
    rates: dict[str, float] = {}
    for batch in batch_sizes(cfg.max_batch_size):
        x = np.random.default_rng(batch).random((batch, *cfg.input_shape), dtype=np.float32)
        runner.run(x)  # a first call per shape lets the JIT settle
        timings = []
        for _ in range(repeats):
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                runner.run(x)
                n += batch
            timings.append(n / (time.perf_counter() - t0))
        rates[str(batch)] = statistics.median(timings)
    return rates


def best(rates: dict[str, float]) -> dict[str, float | int | dict[str, float]]:
    batch = max(rates, key=lambda k: rates[k])
    return {"by_batch": rates, "best_batch": int(batch), "best_items_per_s": rates[batch]}
