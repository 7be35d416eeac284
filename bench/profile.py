"""Where a miss's CPU goes: per process and per stage, on the stack users run.

Starts the Procfile stack (Flower on, as `make up`; `--no-flower` without it), warms it,
then drives distinct inputs (every call a miss: the generator counts cached replies) at
`--concurrency` in flight from a generator in its own process group while `py-spy`
samples each Python process of the stack (API, worker, Flower) without pausing it.
Each sample is put in the stage of the deepest frame that names one (STAGES: the first
rule a frame matches), and a process's CPU per request (from /proc, every thread) is
split over its stages in proportion to their samples. Redis and Memcached are C: their
CPU per request is reported whole.

    python -m bench.profile [--concurrency 64] [--seconds 10] [--rate 250] [--no-flower]

py-spy samples only the thread holding the GIL (`--gil`): a thread blocked in a socket
read is not running, and without `--gil` py-spy cannot tell it from one that is. Time in
a C extension that keeps the GIL (protobuf's upb, hiredis, gRPC's Cython layer) is
charged to the Python frame that called it; C work done without the GIL (torch's kernels,
gRPC's core threads, the kernel's socket work) is in the process's CPU but in no stage,
and shows as "outside the GIL".
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench import procs
from bench.generators import Generators
from bench.loadgen import Load
from bench.results import write
from bench.stack import LocalStack

# (stage, substrings of a frame "function (file:line)"): the first rule a frame matches
# names its stage; a sample's stage is that of its deepest frame that matches any rule.
STAGES: list[tuple[str, tuple[str, ...]]] = [
    ("model forward", ("torch/", "workers/runtime.py")),
    ("cache key (HMAC)", ("hmac.py", "inferpool/cache.py")),
    ("memcached client", ("pymemcache/", "aiomcache/", "api/front_cache.py")),
    ("task events", ("celery/events/",)),
    ("protobuf", ("google/protobuf/", "_pb2.py", "inferpool/codec.py", "inferpool/tensor.py")),
    ("redis client", ("redis/", "hiredis")),
    ("kombu/celery consume+ack", ("kombu/", "celery/worker/", "celery/app/", "celery/concurrency/")),
    ("worker: intake", ("workers/intake.py",)),
    ("worker: batching", ("workers/batcher.py", "workers/strategy.py")),
    ("worker: results", ("workers/results.py", "workers/sinks.py")),
    ("api: publish", ("api/publisher.py",)),
    ("api: dispatcher (replies, flight locks)", ("api/dispatcher.py",)),
    ("api: admission", ("api/admission.py",)),
    ("api: data plane", ("api/core.py", "api/servicer.py", "api/kserve")),
    ("metrics", ("prometheus_client/", "api/metrics.py", "workers/metrics.py", "api/status.py")),
    ("flower", ("flower/", "tornado/")),
    ("grpc", ("grpc/",)),
    ("event loop", ("asyncio/", "uvloop/")),
    ("threads", ("threading.py", "concurrent/futures/", "queue.py")),
    ("logging", ("logging/",)),
]
PROFILED = ("api", "worker", "flower")


def stage_of(frame: str) -> str | None:
    for stage, needles in STAGES:
        if any(n in frame for n in needles):
            return stage
    return None


def classify(raw: str) -> Counter[str]:
    """py-spy's raw (collapsed) output -> samples per stage."""
    counts: Counter[str] = Counter()
    for line in raw.splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        stage = "other"
        for frame in stack.split(";")[1:]:  # the first is the thread's name
            found = stage_of(frame)
            if found is not None:
                stage = found
        counts[stage] += int(n)
    return counts


def profile(args: argparse.Namespace) -> dict[str, Any]:
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    with LocalStack(flower=not args.no_flower) as stack, Generators(1) as gens:
        found = procs.find(stack.pid)
        target = stack.target
        gens.run(Load(target, "digits", "miss", concurrency=args.concurrency, seconds=2.0), seed_base=7)
        with tempfile.TemporaryDirectory() as tmp:
            spies = {
                name: subprocess.Popen(
                    [
                        *(spy, "record", "--pid", str(pid), "--duration", str(int(args.seconds) + 1)),
                        *("--rate", str(args.rate), "--format", "raw", "--threads"),
                        # --native must pause the process to unwind C frames: slower, use
                        # it for where the time goes, not for the CPU figures.
                        *(["--native"] if args.native else ["--nonblocking", "--gil"]),
                        *("--output", os.path.join(tmp, name)),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                for name, pid in found.items()
                if name in PROFILED
            }
            time.sleep(0.5)  # py-spy attaches (bounded: it samples for a fixed duration)
            before = procs.cpu_by_label(procs.tree(stack.pid))
            run = gens.run(
                Load(target, "digits", "miss", concurrency=args.concurrency, seconds=args.seconds),
                seed_base=100,
            )
            used = procs.delta(before, procs.cpu_by_label(procs.tree(stack.pid)))
            for p in spies.values():
                p.wait(timeout=args.seconds + 60)
            raws = {name: Path(tmp, name).read_text() for name in spies if Path(tmp, name).exists()}
            if args.keep:
                args.keep.mkdir(parents=True, exist_ok=True)
                for name, raw in raws.items():
                    (args.keep / f"{name}.txt").write_text(raw)
    requests = run.ok
    out: dict[str, Any] = {
        "concurrency": args.concurrency,
        "seconds": run.elapsed_s,
        "ok": run.ok,
        "cached": run.cached,
        "errors": run.errors,
        "rps": run.rps,
        "generator_cpu_s": run.cpu_s,
        "generator_lag_p99_ms": run.lag_p99_ms,
        "flower": not args.no_flower,
        "cpu_ms_per_request": {k: v * 1000 / requests for k, v in used.items() if v > 0 and requests},
        "stages_ms_per_request": {},
    }
    for name, raw in raws.items():
        counts = classify(raw)
        total = sum(counts.values())
        cpu_ms = out["cpu_ms_per_request"].get(name, 0.0)
        # Samples are taken at a fixed rate: those beyond the process's CPU are not
        # possible, those short of it are CPU spent without the GIL.
        held_s = total / args.rate
        gil_ms = min(cpu_ms, held_s * 1000 / requests) if requests else 0.0
        stages = {stage: gil_ms * n / total for stage, n in counts.most_common()} if total else {}
        stages["outside the GIL"] = max(0.0, cpu_ms - gil_ms)
        out["stages_ms_per_request"][name] = stages
    return out


def show(res: dict[str, Any]) -> None:
    print(
        f"miss @{res['concurrency']} in flight, Flower {'on' if res['flower'] else 'off'}: "
        f"{res['rps']:,.0f} req/s, {res['ok']} OK, {res['cached']} cached, errors {res['errors']}, "
        f"generator lag p99 {res['generator_lag_p99_ms']:.1f} ms"
    )
    total = sum(res["cpu_ms_per_request"].values())
    print(f"server CPU per request: {total:.3f} ms")
    for name, ms in sorted(res["cpu_ms_per_request"].items(), key=lambda kv: -kv[1]):
        print(f"  {name:<10} {ms:.3f} ms")
        for stage, sms in res["stages_ms_per_request"].get(name, {}).items():
            if sms >= 0.005:
                print(f"      {stage:<28} {sms:.3f} ms")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--no-flower", action="store_true")
    parser.add_argument("--native", action="store_true", help="py-spy --native: C frames too (slower)")
    parser.add_argument("--keep", type=Path, help="a folder to keep py-spy's raw stacks in")
    args = parser.parse_args(argv)
    res = profile(args)
    show(res)
    path = write("profile", res)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
