"""The modules a Classify miss passes through, on the API and on the worker, read from
the code as it runs.

    python scripts/miss_chain.py        # starts Redis, Memcached, a worker and an API, prints both chains

A profiler (`sys.setprofile`) records every call into a hand-written module (api/,
workers/, inferpool/ less the generated inferpool/v1 and inferpool/triton) while one
miss travels: on the API's event loop thread from the servicer to the reply, and in a
worker process on every thread (the Celery consumer, the batcher, the results thread)
from the message's arrival to its acknowledgement. Each side's report says which
modules it touched, in order, and which it re-entered: a module is left when its last
frame has finished (a coroutine suspended at an `await` has not finished), and a call
into it after that is a re-entry. Returning to a caller is not a re-entry.

tests/integration/test_miss_chain.py runs the same trace and asserts the bounds.

The worker side runs `inferpool.workers.main` under this script (`--worker OUT -- <worker
arguments>`): the profiler is installed for every thread before any starts (Python 3.11
cannot add one to a running thread), recording from SIGRTMIN until SIGRTMIN+1 and the
last frame entered since has finished; then it writes its report to OUT. Celery keeps
SIGUSR1 for itself, so real-time signals are used.
"""

from __future__ import annotations

import asyncio
import dis
import json
import signal
import sys
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

HAND_WRITTEN = ("api/", "workers/", "inferpool/")
GENERATED = ("inferpool/v1/", "inferpool/triton/")
LINKED = ("inferpool/api/", "inferpool/workers/")
_YIELD = dis.opmap["YIELD_VALUE"]
START_SIGNAL = signal.SIGRTMIN
STOP_SIGNAL = signal.SIGRTMIN + 1
# Tasks on the API's loop that run on their own timers, whatever the request does.
API_BACKGROUND_TASKS = ("health-probe", "loop-lag", "http")
# The worker's thread that polls the bulk queues on its own timer.
WORKER_BACKGROUND_THREADS = ("bulk-consumer",)
# The kombu transport subclass: kombu's and Celery's loops call it on every poll, so it
# is counted as theirs, not as a module of the flow.
TRANSPORT = ("inferpool/broker.py",)
NOT_COUNTED = (*GENERATED, *TRANSPORT)


def _suspended(frame: FrameType) -> bool:
    """Whether a 'return' event is a generator or coroutine pausing, not finishing."""
    return frame.f_lasti >= 0 and frame.f_code.co_code[frame.f_lasti] == _YIELD


def _awaiting(coro: Any) -> list[FrameType]:
    """The frames of a suspended coroutine and of what it awaits, outermost first."""
    frames = []
    while coro is not None:
        frame = (
            getattr(coro, "cr_frame", None)
            or getattr(coro, "gi_frame", None)
            or getattr(coro, "ag_frame", None)
        )
        if frame is None:
            break
        frames.append(frame)
        coro = (
            getattr(coro, "cr_await", None)
            or getattr(coro, "gi_yieldfrom", None)
            or getattr(coro, "ag_await", None)
        )
    return frames


@dataclass
class ChainRecorder:
    """A profile function that records the hand-written modules a flow touches."""

    begin: str  # the module whose first call opens the window (the servicer, the strategy)
    root: str = str(ROOT) + "/"
    skip_tasks: tuple[str, ...] = ()
    skip_threads: tuple[str, ...] = ()
    begun: bool = False
    active: bool = False
    stopping: bool = False
    steps: list[tuple[str, str, str]] = field(default_factory=list)  # (thread, module, function)
    reentered: list[tuple[str, str]] = field(default_factory=list)
    finished: threading.Event = field(default_factory=threading.Event)
    _live: Counter[str] = field(default_factory=Counter)
    # frames entered since the start -> (module, function)
    _frames: dict[int, tuple[str, str]] = field(default_factory=dict)
    _seen: set[str] = field(default_factory=set)
    _modules: dict[str, str | None] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _before: set[int] = field(default_factory=set)  # frames from before the start
    _outside: set[int] = field(default_factory=set)  # frames entered before the window opened

    def module(self, path: str) -> str | None:
        known = self._modules.get(path, "")
        if known != "":
            return known
        rel = path[len(self.root) :] if path.startswith(self.root) else None
        if rel is not None and rel.startswith(LINKED):
            # Imported through inferpool/api or inferpool/workers: named by the folder.
            rel = rel[len("inferpool/") :]
        ours = rel is not None and rel.startswith(HAND_WRITTEN) and not rel.startswith(NOT_COUNTED)
        self._modules[path] = rel if ours else None
        return rel if ours else None

    def start(self) -> None:
        """Counts the hand-written frames that exist already as live: those on every
        thread's stack, and, on an event loop, those of its suspended tasks (a loop that
        will call on into the flow has not left its module)."""
        for frame in sys._current_frames().values():
            f: FrameType | None = frame
            while f is not None:
                self._adopt(f)
                f = f.f_back
        try:
            tasks = asyncio.all_tasks()
        except RuntimeError:  # no loop on this thread
            tasks = set()
        for task in tasks:
            for frame in _awaiting(task.get_coro()):
                self._adopt(frame)
        self.active = True

    def _adopt(self, frame: FrameType) -> None:
        module = self.module(frame.f_code.co_filename)
        if module is not None and id(frame) not in self._before:
            self._before.add(id(frame))
            self._live[module] += 1
            self._seen.add(module)

    def stop(self) -> None:
        """Ends the recording once every frame entered since the start has finished."""
        self.stopping = True
        if not self._frames:
            self._finish()

    def _finish(self) -> None:
        self.active = False
        self.finished.set()

    def profile(self, frame: FrameType, event: str, arg: Any) -> None:
        if not self.active or (event != "call" and event != "return"):
            return
        module = self.module(frame.f_code.co_filename)
        if module is None or self._skipped():
            return
        with self._lock:
            self._record(frame, event, module)

    def _record(self, frame: FrameType, event: str, module: str) -> None:
        key = id(frame)
        if key in self._outside:
            if event == "return" and not _suspended(frame):
                self._outside.discard(key)
            return
        if key in self._before:
            if event == "return" and not _suspended(frame):
                self._before.discard(key)
                self._live[module] -= 1
            return
        if event == "call":
            if key in self._frames:
                return  # a coroutine or generator resumed
            if not self._in_window(frame, module):
                return
            if module in self._seen and self._live[module] == 0:
                self.reentered.append((module, frame.f_code.co_name))
            self._frames[key] = (module, frame.f_code.co_name)
            self._live[module] += 1
            self._seen.add(module)
            self.steps.append((threading.current_thread().name, module, frame.f_code.co_name))
        elif key in self._frames and not _suspended(frame):
            del self._frames[key]
            self._live[module] -= 1
            if self.stopping and not self._frames:
                self._finish()

    def _in_window(self, frame: FrameType, module: str) -> bool:
        """Whether a call belongs to the flow: from the first call into `begin` on, a call
        made by a frame of the flow (or one that existed at the start: a thread's loop,
        the reply listener), or, until `stop`, one from outside any hand-written frame (a
        task or callback the flow started). A call made by a hand-written frame outside
        the flow is not: the interceptors around the servicer, entered before it."""
        if not self.begun:
            self.begun = module == self.begin
            if not self.begun:
                self._outside.add(id(frame))
            return self.begun
        caller = frame.f_back
        while caller is not None and self.module(caller.f_code.co_filename) is None:
            caller = caller.f_back
        if caller is None:
            return not self.stopping
        return id(caller) in self._frames or id(caller) in self._before

    def _skipped(self) -> bool:
        if threading.current_thread().name.startswith(self.skip_threads or ("\0",)):
            return True
        if not self.skip_tasks:
            return False
        try:
            task = asyncio.current_task()
        except RuntimeError:
            return False
        return task is not None and task.get_name() in self.skip_tasks

    def report(self) -> dict[str, Any]:
        package = self.begin.split("/", 1)[0] + "/"
        return {
            "steps": self.steps,
            "modules": list(dict.fromkeys(module for _, module, _ in self.steps)),
            # The side's own package (api/ or workers/), without the shared inferpool/ helpers.
            "package_modules": list(dict.fromkeys(m for _, m, _ in self.steps if m.startswith(package))),
            "reentered": self.reentered,
            # Frames still running when the report was taken (none once finished).
            "open": sorted(set(self._frames.values())),
        }


def chain_text(report: dict[str, Any]) -> str:
    """`module function, function -> module function ...`: each run of calls in one
    module as one link, re-entries marked."""
    links: list[tuple[str, list[str]]] = []
    for _, module, function in report["steps"]:
        if links and links[-1][0] == module:
            if function not in links[-1][1]:
                links[-1][1].append(function)
        else:
            links.append((module, [function]))
    reentered = {module for module, _ in report["reentered"]}
    lines = [
        f"{len(report['modules'])} hand-written modules, {len(report['package_modules'])} of them "
        f"in its own package; re-entered: {', '.join(sorted(reentered)) or 'none'}"
    ]
    lines += [f"  {module}: {', '.join(functions)}" for module, functions in links]
    return "\n".join(lines)


def worker_main(out: Path, argv: list[str]) -> None:
    """`inferpool.workers.main` with a recorder on every thread, driven by START/STOP_SIGNAL."""
    recorder = ChainRecorder(begin="workers/strategy.py", skip_threads=WORKER_BACKGROUND_THREADS)

    def write() -> None:
        # A thread back in its wait for the next message never finishes that frame: the
        # report lists it as open.
        recorder.finished.wait(3)
        out.write_text(json.dumps(recorder.report()))

    def on_start(signum: int, frame: Any) -> None:
        recorder.start()
        out.with_suffix(".started").touch()

    def on_stop(signum: int, frame: Any) -> None:
        threading.Thread(target=write, name="miss-chain-report", daemon=True).start()
        recorder.stop()

    signal.signal(START_SIGNAL, on_start)
    signal.signal(STOP_SIGNAL, on_stop)
    threading.setprofile(recorder.profile)
    sys.setprofile(recorder.profile)
    from inferpool.workers.main import main

    main(argv)


def trace_one_miss(redis_server: Any, memcached: Any, logdir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Starts a traced worker and an in-process API on the given servers, sends two
    untraced misses (first-call set-up is not the miss path), then traces one miss on
    both sides; returns the API's report and the worker's."""
    import os

    import numpy as np

    from inferpool.client import Client
    from tests.servers import ApiThread, Worker, stack_settings, wait_until

    out = logdir / f"miss-chain-{os.getpid()}-{id(logdir)}.json"
    settings = stack_settings(redis_server, memcached, shed_loop_lag_ms=0)
    worker = Worker(settings, logdir, launcher=(__file__, "--worker", str(out), "--"))
    try:
        api = ApiThread(settings)
        try:
            rng = np.random.default_rng()
            with Client(api.target) as client:
                for _ in range(2):
                    client.classify(rng.random((1, 1, 28, 28), dtype=np.float32), "digits", timeout_s=30)
                os.kill(worker.pid, START_SIGNAL)
                wait_until(out.with_suffix(".started").exists, 30, "the worker's recorder to start")
                recorder = ChainRecorder(begin="api/servicer.py", skip_tasks=API_BACKGROUND_TASKS)

                def trace() -> None:  # on the API's loop thread
                    recorder.start()
                    sys.setprofile(recorder.profile)

                api.call(trace)
                reply = client.classify(rng.random((1, 1, 28, 28), dtype=np.float32), "digits", timeout_s=30)
                assert not reply.cached
                api.call(recorder.stop)
                finished = recorder.finished.wait(30)
                api.call(lambda: sys.setprofile(None))
                assert finished, "the API's frames of the miss did not finish"
                os.kill(worker.pid, STOP_SIGNAL)
                wait_until(out.exists, 60, "the worker's report")
        finally:
            api.stop()
    finally:
        worker.stop()
    return recorder.report(), json.loads(out.read_text())


def demo() -> None:
    """Starts a stack of its own and prints both chains."""
    import tempfile

    from tests.servers import MemcachedServer, RedisServer

    with tempfile.TemporaryDirectory() as tmp:
        logdir = Path(tmp)
        redis_server, memcached = RedisServer(logdir), MemcachedServer(logdir)
        try:
            api_side, worker_side = trace_one_miss(redis_server, memcached, logdir)
        finally:
            redis_server.stop()
            memcached.stop()
    print("API side (servicer to reply):\n" + chain_text(api_side))
    print("Worker side (message to acknowledgement):\n" + chain_text(worker_side))


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        worker_main(Path(sys.argv[2]), [a for a in sys.argv[3:] if a != "--"])
    else:
        demo()
