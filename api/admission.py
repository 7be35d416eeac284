"""Admission control: a miss is refused (Overloaded, RESOURCE_EXHAUSTED) before anything
is queued for it when it could not be answered within its deadline.

A call's wait has parts the handler sees and parts it does not, and admission weighs all:

- Before the handler: the server bounds the RPCs it holds (`max_concurrent_rpcs`, in
  api/server.py), so excess calls are refused by gRPC itself in microseconds instead of
  queueing for the event loop until their deadlines pass. What a call did wait is already
  spent from its budget: gRPC's server deadline runs from the call's arrival (the client's
  `grpc-timeout` is consumed by the core, never shown to handlers), so the
  `time_remaining()` the handler passes in is what is left after gRPC's and the loop's
  queues, and that, not the deadline the client set, is what the rest must fit in.
  A call with no more left than the loop's lag is refused at the door (SheddingInterceptor),
  before any lookup or validation.
- The event loop: every answer waits for the loop, so its current lag is added to every
  prediction, and while it runs more than `shed_lag_s` behind, inference calls are refused
  at the door (a loop that far behind only falls further behind with more work).
- The backlog: once a batch or more waits, the requests of this process still waiting on
  the model, plus the batch the call would be computed in, at the rate workers recently
  answered them.
- What the answers say: a concurrency limit per model, learned from outcomes (additive
  increase, multiplicative decrease, as TCP and Netflix's concurrency-limits do). An
  answer within `admit_share` of its budget raises the limit by about one per round trip;
  a call answered later than that, or lapsed, cuts it to 0.9x the requests in flight when
  it came back, once per round trip. The estimate above cannot see everything a call
  waits for (a batch larger than the deadline allows, a worker sharing its core with the
  API, the reply's way back); the limit sees the result of all of it.

The wait must fit in `admit_share` of what is left: under a sustained overload the backlog
sits at the admission bound, so the calls let in wait about as long as the bound allows,
and the margin absorbs the estimate's noise and the hops it leaves out (reply, send).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc

from inferpool.api.metrics import SHED
from inferpool.errors import Overloaded
from inferpool.repository import ModelConfig

# Answers counted over this window give the service rate admission estimates with.
RATE_WINDOW_S = 2.0
# The default share of a caller's remaining budget its predicted wait may take.
ADMIT_SHARE = 0.8
# A call is refused at the door when it has no more than this left beyond the loop's lag.
MIN_LEFT_S = 0.001
# The learned concurrency limit: cut to this share of the requests in flight when one came
# back late, and never below this many (a pool that answers nothing in time still gets
# calls through to show when it recovers).
LIMIT_CUT = 0.9
MIN_LIMIT = 2.0
# While the pool is overloaded (a call refused for its backlog within this long), a call
# is refused at the door unless it has at least a quick answer's time left (the first
# quartile of the last ROUND_TRIPS answered): it would lapse, and a lapse costs the pool
# as much as an answer while its caller retries at once; a refusal tells it to back off.
OVERLOAD_HOLD_S = 1.0
ROUND_TRIPS = 64


@dataclass
class _Backlog:
    """One model version's requests from this process, and how fast they were answered."""

    # Requests admitted whose callers still wait (queued here, on the broker or on a
    # worker): this process's share of the model's backlog.
    waiting: int = 0
    # When recent requests were answered: the model's service rate as this process sees it.
    answered_at: deque[float] = field(default_factory=deque)
    # When this process started sending the model requests: until RATE_WINDOW_S has
    # passed since, answers are counted over that shorter span, not the whole window
    # (which would read a cold start's first answers as a fraction of the true rate).
    since: float = field(default_factory=time.monotonic)
    # The learned bound on `waiting` (starts at max_queue_size: it only falls on evidence),
    # and when it was last cut: calls admitted before then carry no news about the cut.
    limit: float = 0.0
    cut_at: float = 0.0

    def learn(self, admitted_at: float, late: bool, now: float, ceiling: int) -> None:
        """One call's outcome: answered within its share of the deadline, or `late`."""
        if late:
            if admitted_at >= self.cut_at and self.rate(now) > 0:
                # With no recent answers the pool is down or cold, not overloaded:
                # max_queue_size bounds it, and the limit keeps what it learned.
                self.limit = max(MIN_LIMIT, min(self.limit, self.waiting + 1) * LIMIT_CUT)
                self.cut_at = now
        elif self.waiting + 1 >= self.limit / 2:
            # Only while the limit binds: an idle period must not raise it unchecked.
            self.limit = min(float(ceiling), self.limit + 1 / self.limit)

    def trim(self, now: float) -> None:
        while self.answered_at and self.answered_at[0] < now - RATE_WINDOW_S:
            self.answered_at.popleft()

    def rate(self, now: float) -> float:
        self.trim(now)
        span_s = min(RATE_WINDOW_S, now - self.since)
        return len(self.answered_at) / span_s if span_s > 0 else 0.0

    def answered(self, now: float) -> None:
        self.answered_at.append(now)
        self.trim(now)


class LoopLag:
    """How far behind the event loop runs: a task that sleeps `interval_s` at a time
    and measures how late it wakes. `lag_s` is the least lateness of the last
    `SUSTAINED` wakes: a loop that is behind stays behind from one wake to the next,
    while one stall (a collection, a neighbour taking the core) shows in one wake only
    and must not refuse calls on an otherwise idle server."""

    SUSTAINED = 3

    def __init__(self, interval_s: float = 0.005) -> None:
        self.interval_s = interval_s
        self.lag_s = 0.0
        self.max_lag_s = 0.0  # the largest single lateness since start, for operators
        self._recent: deque[float] = deque([0.0] * self.SUSTAINED, maxlen=self.SUSTAINED)

    def sample(self, late_s: float) -> None:
        self._recent.append(max(0.0, late_s))
        self.lag_s = min(self._recent)
        self.max_lag_s = max(self.max_lag_s, late_s)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + self.interval_s
            await asyncio.sleep(self.interval_s)
            self.sample(loop.time() - due)


class Admission:
    def __init__(
        self, admit_share: float = ADMIT_SHARE, shed_lag_s: float = 0.0, lag: LoopLag | None = None
    ) -> None:
        self.admit_share = admit_share
        self.shed_lag_s = shed_lag_s  # 0: never shed on lag
        self.lag = lag if lag is not None else LoopLag()
        self._backlogs: dict[tuple[str, int], _Backlog] = {}
        self.admitted = 0
        self.rejected = 0
        self.shed_on_lag = 0  # of rejected: while the loop ran behind
        self.shed_spent = 0  # of rejected: too little of the deadline left on arrival
        self.over_limit = 0  # of rejected: past the limit learned from answers
        # How long recent answers took from admission (any model), and when a call was
        # last refused for a model's backlog.
        self.round_trips: deque[float] = deque(maxlen=ROUND_TRIPS)
        self.overloaded_at = -OVERLOAD_HOLD_S

    def quick_answer_s(self) -> float:
        """The first quartile of the recent answers' round trips."""
        ordered = sorted(self.round_trips)
        return ordered[len(ordered) // 4]

    def shed(self, left_s: float | None) -> str | None:
        """Why a call with `left_s` of its deadline left must be refused before any work
        is done for it, or None. Counted in SHED and `rejected`."""
        lag_s = self.lag.lag_s
        floor_s = MIN_LEFT_S
        if self.round_trips and time.monotonic() - self.overloaded_at < OVERLOAD_HOLD_S:
            floor_s = max(floor_s, self.quick_answer_s())
        if self.shed_lag_s and lag_s > self.shed_lag_s:
            self.shed_on_lag += 1
            self.rejected += 1
            SHED.labels("loop_lag").inc()
            return f"the server is overloaded (event loop {lag_s * 1000:.0f} ms behind); retry later"
        if left_s is not None and left_s <= lag_s + floor_s:
            self.shed_spent += 1
            self.rejected += 1
            SHED.labels("spent").inc()
            return (
                f"the call waited in the server's queues until {left_s * 1000:.0f} ms of its deadline "
                "were left; retry later"
            )
        return None

    def backlog(self, cfg: ModelConfig) -> _Backlog:
        backlog = self._backlogs.get((cfg.name, cfg.version))
        if backlog is None:
            backlog = self._backlogs[cfg.name, cfg.version] = _Backlog(limit=float(cfg.max_queue_size))
        return backlog

    @property
    def waiting(self) -> int:
        """Admitted requests still waiting, over all models."""
        return sum(b.waiting for b in self._backlogs.values())

    def admit(self, cfg: ModelConfig, budget_s: float | None = None) -> None:
        """Lets one miss in, or raises Overloaded before anything is queued for it.
        `budget_s`: what is left of its deadline now (None: only max_queue_size and
        the loop's lag apply)."""
        backlog = self.backlog(cfg)
        if backlog.waiting >= cfg.max_queue_size:
            self._refuse(
                f"model {cfg.name!r} has {backlog.waiting} requests waiting for a worker "
                f"(max_queue_size {cfg.max_queue_size}); retry later"
            )
        if backlog.waiting >= backlog.limit:
            self.over_limit += 1
            self._refuse(
                f"model {cfg.name!r} has {backlog.waiting} requests waiting, as many as recent answers "
                "within their deadlines allow; retry later"
            )
        lag_s = self.lag.lag_s
        if self.shed_lag_s and lag_s > self.shed_lag_s:
            self.shed_on_lag += 1
            self._refuse(f"the server is overloaded (event loop {lag_s * 1000:.0f} ms behind); retry later")
        now = time.monotonic()
        if budget_s is not None:
            # The loop's lag, at least: the answer waits for the loop too. With a batch
            # or more waiting, workers are busy and the recent answer rate is what the
            # pool can do: the requests ahead, and the batch this one is computed in, at
            # that rate. Below that the rate is the offered load, not the pool's (and a
            # rate that admission itself holds down would keep refusing: measured, with
            # the requests waiting over the rate from eight up, goodput fell to a
            # tenth); with no recent answers (cold start, stalled workers) only
            # max_queue_size bounds the backlog. (Nor is the fastest recent round trip a
            # floor: one slow answer, a cold worker's first, refused every short
            # deadline until it aged out, and refused calls bring no faster answers.)
            wait_s = lag_s
            if backlog.waiting >= cfg.max_batch_size:
                rate = backlog.rate(now)
                if rate > 0:
                    wait_s += (backlog.waiting + cfg.max_batch_size) / rate
            if wait_s > self.admit_share * budget_s:
                self._refuse(
                    f"model {cfg.name!r} is overloaded: {backlog.waiting} requests ahead would take "
                    f"~{wait_s * 1000:.0f} ms, too close to the {budget_s * 1000:.0f} ms left of "
                    "the deadline; retry later"
                )
        backlog.waiting += 1
        self.admitted += 1

    def settle(
        self, cfg: ModelConfig, answered: bool = False, elapsed_s: float = 0.0, budget_s: float | None = None
    ) -> None:
        """The caller of one admit() stopped waiting: answered by a worker, or not, after
        `elapsed_s` of the `budget_s` it was admitted with. An answer within admit_share of
        the budget, or one later than that or none by the deadline, teaches the limit; a
        caller that left early (or a call with no deadline) teaches nothing."""
        backlog = self.backlog(cfg)
        backlog.waiting -= 1
        now = time.monotonic()
        if answered:
            backlog.answered(now)
            self.round_trips.append(elapsed_s)
        if budget_s is None:
            return
        late = elapsed_s > self.admit_share * budget_s
        if answered or late:
            backlog.learn(now - elapsed_s, late, now, cfg.max_queue_size)

    def _refuse(self, message: str) -> None:
        self.rejected += 1
        self.overloaded_at = time.monotonic()
        raise Overloaded(message)


class SheddingInterceptor(grpc.aio.ServerInterceptor):
    """Refuses inference calls at the door, before their handler does any work (no cache
    lookup, no validation), while the event loop runs behind or when a call has already
    spent its deadline waiting in gRPC's and the loop's queues. Only the methods named
    are guarded: health checks, job queries and reflection are always served."""

    def __init__(self, admission: Admission, methods: frozenset[str]) -> None:
        self.admission = admission
        self.methods = methods
        # Per method: the handler as found, and its guarded form (built once).
        self._guarded: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or method not in self.methods or handler.unary_unary is None:
            return handler
        cached = self._guarded.get(method)
        if cached is None or cached[0] is not handler:
            cached = self._guarded[method] = (handler, self._guard(handler))
        return cached[1]

    def _guard(self, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        behaviour = handler.unary_unary
        admission = self.admission

        async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
            reason = admission.shed(context.time_remaining())
            if reason is not None:
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, reason)
            return await behaviour(request, context)

        return grpc.unary_unary_rpc_method_handler(
            guarded,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
