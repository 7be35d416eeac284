"""Admission control and single-flight: the tests that need no server (those against real
servers: tests/integration/test_overload.py)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from inferpool.api.admission import OVERLOAD_HOLD_S, Admission, LoopLag
from inferpool.errors import Overloaded
from inferpool.repository import ModelConfig, Repository

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.timeout(120)


def test_shedding_at_the_door_weighs_what_is_left_of_the_deadline() -> None:
    """Pure unit: a call that spent its deadline in the queues (less left than the loop's
    lag and a millisecond) is refused before any work; one with time left is not."""
    admission = Admission(shed_lag_s=0.05, lag=LoopLag())
    for _ in range(LoopLag.SUSTAINED):
        admission.lag.sample(0.010)
    assert admission.shed(1.0) is None
    assert admission.shed(None) is None
    reason = admission.shed(0.0105)
    assert reason is not None and "deadline" in reason
    assert (admission.shed_spent, admission.rejected) == (1, 1)
    for _ in range(LoopLag.SUSTAINED):  # lag that persists over successive wakes
        admission.lag.sample(0.06)
    assert "event loop" in (admission.shed(1.0) or "")
    assert admission.shed_on_lag == 1
    admission.lag.sample(0.0)  # one prompt wake: the loop caught up
    assert admission.shed(1.0) is None


def _digits() -> ModelConfig:
    return Repository.load(ROOT / "models").resolve("digits", 0)


def test_the_limit_is_cut_by_late_answers_once_per_round_trip_and_grows_back() -> None:
    """Pure unit: a late answer cuts the limit to 0.9x the requests in flight; the others
    admitted before that cut, late too, carry no news; answers in time raise it by about
    one per round trip, only while it binds."""
    cfg = _digits()
    admission = Admission()
    for _ in range(40):
        admission.admit(cfg, budget_s=0.1)
    backlog = admission.backlog(cfg)
    assert backlog.limit == cfg.max_queue_size
    admission.settle(cfg, answered=True, elapsed_s=0.02, budget_s=0.1)  # in time: answers seen
    admission.settle(cfg, answered=True, elapsed_s=0.09, budget_s=0.1)  # late: 38 + 1 in flight
    assert backlog.limit == pytest.approx(39 * 0.9)
    cut = backlog.limit
    for _ in range(10):  # admitted before the cut: no second cut
        admission.settle(cfg, answered=False, elapsed_s=0.1, budget_s=0.1)
    assert backlog.limit == cut
    with pytest.raises(Overloaded, match="as many as recent answers"):
        for _ in range(40):
            admission.admit(cfg, budget_s=0.1)
    assert backlog.waiting == int(cut) + 1 and admission.over_limit == 1
    for _ in range(backlog.waiting):  # answers in time while the limit binds: it grows
        admission.settle(cfg, answered=True, elapsed_s=0.01, budget_s=0.1)
    assert cut + 0.5 < backlog.limit < cut + 2
    grown = backlog.limit
    admission.admit(cfg, budget_s=0.1)
    admission.settle(cfg, answered=True, elapsed_s=0.01, budget_s=0.1)  # idle: not binding
    assert backlog.limit == grown


def test_lapses_without_recent_answers_do_not_cut_the_limit() -> None:
    """Pure unit: with no answers in the rate window the pool is down or cold, not
    overloaded; a caller that left early teaches nothing either."""
    cfg = _digits()
    admission = Admission()
    for _ in range(3):
        admission.admit(cfg, budget_s=0.1)
    admission.settle(cfg, answered=False, elapsed_s=0.1, budget_s=0.1)
    admission.settle(cfg, answered=False, elapsed_s=0.01, budget_s=0.1)
    admission.settle(cfg, answered=False)
    assert admission.backlog(cfg).limit == cfg.max_queue_size


def test_while_overloaded_the_door_wants_a_quick_answers_time_left() -> None:
    """Pure unit: after a refusal for the backlog, a call with less left than the first
    quartile of recent round trips is refused at the door (it would lapse); without
    overload only the loop's lag and a millisecond count."""
    admission = Admission()
    admission.round_trips.extend([0.010, 0.020, 0.030, 0.040])
    assert admission.shed(0.015) is None
    admission.overloaded_at = time.monotonic()
    assert admission.quick_answer_s() == 0.020
    assert "deadline" in (admission.shed(0.015) or "")
    assert admission.shed(0.025) is None
    admission.overloaded_at -= OVERLOAD_HOLD_S
    assert admission.shed(0.015) is None
