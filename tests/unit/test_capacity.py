"""The capacity model's simulation (bench/capacity_sim.py): how it shares cores, and
that its publisher batches as the API's does."""

from __future__ import annotations

import pytest

from bench.capacity_costs import Costs
from bench.capacity_sim import Sim, simulate


def _finish_times(sharing: bool, cores: float, tasks: int) -> list[float]:
    sim = Sim(cores, sharing=sharing)
    ends: list[float] = []
    for _ in range(tasks):
        sim.cpu.run(1.0, lambda: ends.append(sim.now))
    sim.run(100.0)
    return ends


def test_processor_sharing_slows_every_running_task_alike() -> None:
    # Four one-second tasks on two cores: each gets half a core, all end at 2 s.
    assert _finish_times(True, 2, 4) == pytest.approx([2.0] * 4)
    # Fewer tasks than cores: none runs faster than one core.
    assert _finish_times(True, 2, 1) == pytest.approx([1.0])
    # A fractional share left by other tenants: 1.5 cores for three tasks.
    assert _finish_times(True, 1.5, 3) == pytest.approx([2.0] * 3)


def test_without_sharing_tasks_queue_for_whole_cores() -> None:
    assert _finish_times(False, 2, 4) == pytest.approx([1.0, 1.0, 2.0, 2.0])


def test_a_task_arriving_later_shares_from_then_on() -> None:
    sim = Sim(1)
    ends: dict[str, float] = {}
    sim.cpu.run(1.0, lambda: ends.setdefault("first", sim.now))
    sim.at(0.5, lambda: sim.cpu.run(1.0, lambda: ends.setdefault("second", sim.now)))
    sim.run(100.0)
    # 0.5 s alone, then half a core each: the first needs 1 s more, the second ends 0.5 s after.
    assert ends == pytest.approx({"first": 1.5, "second": 2.0})


COSTS = Costs(api_hit_ms=0.5, api_miss_ms=1.0, redis_miss_ms=0.1, worker_item_ms=0.1, worker_batch_ms=1.0)


def test_fewer_cores_left_means_less_throughput_and_a_longer_tail() -> None:
    whole = simulate(COSTS, 1, 1, cores=2, concurrency=64, seconds=1)
    busy = simulate(COSTS, 1, 1, cores=1, concurrency=64, seconds=1)
    assert busy["rps"] < 0.75 * whole["rps"] and busy["p99_ms"] > whole["p99_ms"]


def test_envelopes_grow_with_the_callers_waiting() -> None:
    # One envelope in flight per API replica: what queues meanwhile leaves together.
    one = simulate(COSTS, 1, 1, cores=4, concurrency=1, seconds=1)
    many = simulate(COSTS, 1, 1, cores=4, concurrency=64, seconds=1)
    assert one["mean_batch"] == 1 and many["mean_batch"] > 2


def test_broker_shards_split_the_redis_work() -> None:
    one = simulate(COSTS, 2, 2, cores=8, concurrency=64, seconds=1)
    two = simulate(COSTS, 2, 2, cores=8, concurrency=64, seconds=1, brokers=2)
    assert two["utilisation"]["redis"] < 0.7 * one["utilisation"]["redis"]
