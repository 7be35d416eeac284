"""What the access log costs: CPU per call of every process of the stack, access log on
and off, on the hit and miss paths.

Starts the Procfile stack (as `make up`, without Flower: honcho relays every line the
API writes) once with INFERPOOL_ACCESS_LOG=true and once with false, the two in turn
for `--rounds` rounds, drives each closed-loop from this process, and reads every
process's CPU time (/proc, bench/procs.py) before and after each run. CPU per call is
the figure that holds on a busy machine; throughput is reported beside it.

    python -m bench.access_log [--seconds 4] [--rounds 1] [--concurrency 64]

Writes bench/results/access_log/<date>-<commit>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
from typing import Any

from bench import procs, results
from bench.load import closed_loop
from bench.loadgen import HOT_ITEMS
from bench.stack import LocalStack

MODES = ("on", "off")
PATHS = ("hit", "miss")


async def _runs(stack: LocalStack, seconds: float, concurrency: int) -> dict[str, dict[str, Any]]:
    # The hit path's inputs cached, the worker warm.
    await closed_loop(stack.target, "hit", 16, 30, max_requests=HOT_ITEMS)
    await closed_loop(stack.target, "miss", 16, 1.0)
    out: dict[str, dict[str, Any]] = {}
    for path in PATHS:
        pids = procs.tree(stack.pid)
        before = procs.cpu_by_label(pids)
        run = await closed_loop(stack.target, path, concurrency, seconds, seed=4242)
        used = procs.delta(before, procs.cpu_by_label(pids))
        calls = max(1, run["requests"] + run["errors"])
        per_call = {name: round(s / calls * 1e6, 1) for name, s in used.items() if name != "gone"}
        total = round(sum(per_call.values()), 1)
        out[path] = {**run, "cpu_us_per_call": per_call, "cpu_us_per_call_total": total}
    return out


def measure(seconds: float, rounds: int, concurrency: int) -> dict[str, Any]:
    runs: dict[str, list[dict[str, dict[str, Any]]]] = {mode: [] for mode in MODES}
    for r in range(rounds):
        # Alternate which goes first, so a machine getting busier favours neither.
        for mode in MODES if r % 2 == 0 else MODES[::-1]:
            env = {"INFERPOOL_ACCESS_LOG": "true" if mode == "on" else "false"}
            with LocalStack(extra_env=env, flower=False) as stack:
                runs[mode].append(asyncio.run(_runs(stack, seconds, concurrency)))
    summary: dict[str, Any] = {}
    for path in PATHS:
        row: dict[str, Any] = {}
        for mode in MODES:
            got = [run[path] for run in runs[mode]]
            row[mode] = {
                "rps": statistics.median(g["rps"] for g in got),
                "cpu_us_per_call_total": statistics.median(g["cpu_us_per_call_total"] for g in got),
                "api_us_per_call": statistics.median(g["cpu_us_per_call"].get("api", 0.0) for g in got),
                "honcho_us_per_call": statistics.median(g["cpu_us_per_call"].get("honcho", 0.0) for g in got),
            }
        summary[path] = row
    meta = {"concurrency": concurrency, "seconds": seconds, "rounds": rounds}
    return {**meta, "summary": summary, "runs": runs}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=4.0, help="length of each closed-loop run")
    parser.add_argument("--rounds", type=int, default=1, help="stacks per mode, alternating")
    parser.add_argument("--concurrency", type=int, default=64, help="calls in flight")
    args = parser.parse_args()
    data = measure(args.seconds, args.rounds, args.concurrency)
    print(f"{'path':>5} {'log':>4} {'rps':>7} {'CPU us/call':>12} {'api':>7} {'honcho':>7}")
    for path, row in data["summary"].items():
        for mode, r in row.items():
            print(
                f"{path:>5} {mode:>4} {r['rps']:>7.0f} {r['cpu_us_per_call_total']:>12.1f} "
                f"{r['api_us_per_call']:>7.1f} {r['honcho_us_per_call']:>7.1f}"
            )
    print(f"wrote {results.write('access_log', data)}")


if __name__ == "__main__":
    main()
