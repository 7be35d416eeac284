"""Admission control and single-flight: the tests that need no server (those against real
servers: tests/integration/test_overload.py)."""

from __future__ import annotations

import pytest

from api.admission import Admission, LoopLag

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
