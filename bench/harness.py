"""The benchmark harness: inferpool as users run it, next to its baselines, in one run.

    python -m bench.harness [--quick] [--seconds S] [--repeats N] [--concurrency 1,8,64,256]
                            [--systems LIST] [--generators N] [--target HOST:PORT]

One command makes a temporary model repository (digits, plus `resnet64`, a ResNet-style
net on 3x64x64 with seeded random weights: bench/heavy.py), starts each system on
loopback in turn and drives it from the load generator (bench/loadgen.py: its own
processes in a process group of their own, whose CPU and event-loop lag every run
reports):

- closed loop at each concurrency, workloads `miss` (a new input per request: the
  replies' cached count must be 0 or the cell fails), `hit` (a warmed set of 256) and
  `zipf` (4,096 inputs drawn Zipf(1.1), a fresh pool per run), and open loop at fixed
  rates (fractions of the system's own miss throughput at 64 in flight);
- bulk jobs (bench/bulk.py's run_job) against b1: digits, and the heavier model.

Systems (same model files, same machine, same run):
  inferpool          the stack as `make up` runs it (bench/stack.py: the Procfile under
                     honcho, Flower on, task events on once Flower has reached the worker)
  inferpool-noflower the same stack without Flower (so without task events)
  b1 raw             the model alone at its best batch size: the compute limit
  b2 threads         a sync grpc server running the model per request in 10 threads
  b3 floor           a bare grpc.aio server returning a fixed response: the RPC floor
  b4 naive           the stack (Flower on) with one Celery message per miss
                     (INFERPOOL_MAX_ENVELOPE_ITEMS=1; inferpool_envelope_items confirms it)
  b5 batcher         grpc.aio and an in-process dynamic batcher (64 items / 2 ms)

Every run reads the CPU time of each process of the server's tree (/proc) before and
after: CPU per request per process (API, worker, Redis, Memcached, Flower). Each figure
is reported as min / median / max of `--repeats` runs. Writes the JSON (with date,
commit and machine) under bench/results/harness/ and a plot next to it.
`--target` measures a running stack instead (no CPU figures for it; b4 and the heavy
model need a local stack and are skipped). `--baseline-ref REF` measures only the quick
headline cells (miss@64, hit@64, miss@1), for this working tree and for git ref REF side
by side in one run, and prints one table with their ratios (bench/compare.py).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench import procs, results
from bench.baselines import baseline_server
from bench.cells import Cell, cpu_record, spread
from bench.generators import Generators
from bench.heavy import HEAVY_MODEL, make_repository
from bench.loadgen import HOT_ITEMS, SHAPES, Load
from bench.modeltime import best
from bench.report import plot, print_report, targets
from bench.scrape import delta, histogram_mean, scrape
from bench.stack import ROOT, LocalStack

SYSTEMS = ("b1", "b2", "b3", "b5", "inferpool", "inferpool-noflower", "b4")
NAMES = {
    "b2": "b2 threads",
    "b3": "b3 floor",
    "b4": "b4 naive",
    "b5": "b5 batcher",
    "inferpool": "inferpool",
    "inferpool-noflower": "inferpool, no Flower",
}
NAIVE_ENV = {"INFERPOOL_MAX_INFLIGHT_ENVELOPES": "1000000", "INFERPOOL_MAX_ENVELOPE_ITEMS": "1"}


class Bench:
    def __init__(self, args: argparse.Namespace, gens: Generators) -> None:
        self.args = args
        self.gens = gens
        self.cells: list[Cell] = []
        self.extra: dict[str, Any] = {}

    def log(self, text: str) -> None:
        print(text, flush=True)

    def measure(
        self,
        system: str,
        server: Callable[[], list[int]],
        target: str,
        model: str,
        workload: str,
        concurrency: int = 0,
        rate: float = 0.0,
    ) -> Cell:
        """`repeats` runs of one cell; `server()` lists the server tree's pids now."""
        cell = Cell(system, model, workload, "closed" if concurrency else "open", concurrency or round(rate))
        load = Load(target, model, workload, concurrency, rate, self.args.seconds)
        seed_base = zlib.crc32(f"{system}/{model}/{workload}".encode()) % 997
        for _ in range(self.args.repeats):
            pids = server()
            machine, before, t0 = procs.machine_cpu(), procs.cpu_by_label(pids), time.perf_counter()
            run = self.gens.run(load, seed_base)
            cpu = procs.delta(before, procs.cpu_by_label(pids)) if pids else {}
            used = procs.delta(machine, procs.machine_cpu())
            cell.add(run.summary() | cpu_record(cpu, run.ok, time.perf_counter() - t0, used, run.cpu_s))
        self.cells.append(cell)
        s = cell.summary()
        cpu_total = s["server_cpu_ms_per_request"].get("total", {}).get("median", float("nan"))
        rps = s["rps"]
        self.log(
            f"  {system:<21}{model:<9}{workload:<5}{cell.mode:<7}{cell.load:>5}"
            f" {rps['median']:>7,.0f} req/s [{rps['min']:,.0f}-{rps['max']:,.0f}]"
            f"  p50 {s['p50_ms']['median']:>6.2f}  p99 {s['p99_ms']['median']:>7.2f} ms"
            f"  cpu {cpu_total:.2f} ms/req  gen lag p99 {s['gen_lag_p99_ms']['median']:.1f} ms"
            + (f"  {'; '.join(s['problems'])}" if s["problems"] else "")
        )
        return cell

    def sweep(
        self, system: str, server: Callable[[], list[int]], target: str, model: str, workload: str
    ) -> None:
        for c in self.args.concurrency if model == "digits" else self.args.heavy_concurrency:
            self.measure(system, server, target, model, workload, concurrency=c)

    def open_loop(self, system: str, server: Callable[[], list[int]], target: str, model: str) -> None:
        """Open-loop points at fractions of this system's own miss capacity at 64 (or
        the highest concurrency measured), so each curve spans its own range."""
        closed = [
            c
            for c in self.cells
            if (c.system, c.model, c.workload, c.mode) == (system, model, "miss", "closed")
        ]
        if not closed or not self.args.open_fractions:
            return
        capacity = next((c for c in closed if c.load == 64), closed[-1]).median("rps")
        for fraction in self.args.open_fractions:
            self.measure(system, server, target, model, "miss", rate=max(1.0, capacity * fraction))

    def warm(self, target: str, model: str, hits: bool = False) -> None:
        """Some misses, so JITs and pools have seen traffic before anything is measured;
        with `hits`, first every input of the hit set once, so each is in the cache."""
        if hits:
            # Each generator process walks the set from its own offset: HOT_ITEMS each.
            n = self.gens.count
            self.gens.run(Load(target, model, "hit", concurrency=8, seconds=60, max_requests=HOT_ITEMS * n))
        self.gens.run(Load(target, model, "miss", concurrency=8, seconds=1.0), seed_base=1)


def raw_model(repository: Path, model: str, seconds: float) -> dict[str, float]:
    """b1 in a process of its own (torch's thread settings are per process)."""
    cmd = [sys.executable, "-m", "bench.baselines", "raw", "--repository", str(repository)]
    cmd += ["--model", model, "--seconds", str(seconds)]
    out = subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True, timeout=600).stdout
    rates: dict[str, float] = json.loads(out.strip().splitlines()[-1])
    return rates


@contextmanager
def local_stack(bench: Bench, system: str, repo: Path) -> Iterator[LocalStack]:
    flower = system != "inferpool-noflower"
    env = NAIVE_ENV if system == "b4" else {}
    with LocalStack(extra_env=env, flower=flower, model_repository=repo) as stack:
        if flower and not stack.task_events_on:
            bench.log("  WARNING: Flower had not turned the worker's task events on; measuring anyway")
        bench.extra.setdefault("task_events_on", {})[NAMES[system]] = stack.task_events_on
        yield stack


def stack_phase(
    bench: Bench, system: str, target: str, pids: Callable[[], list[int]], metrics: str | None
) -> None:
    """A stack (inferpool with or without Flower, or b4) on its workloads."""
    args, name = bench.args, NAMES.get(system, system)
    bench.warm(target, "digits", hits=True)
    before = scrape(metrics) if metrics else None
    bench.sweep(name, pids, target, "digits", "miss")
    if before is not None and metrics:
        mean = histogram_mean(delta(before, scrape(metrics)), "inferpool_envelope_items", model="digits")
        bench.extra.setdefault("envelope_items_mean", {})[name] = mean
        bench.log(f"  {name}: {mean:.2f} misses per queue message (inferpool_envelope_items mean)")
    if system == "b4" or (system == "inferpool-noflower" and args.quick):
        return
    bench.sweep(name, pids, target, "digits", "hit")
    if system == "inferpool" and not args.quick:
        bench.sweep(name, pids, target, "digits", "zipf")
        bench.open_loop(name, pids, target, "digits")
    if args.heavy and system == "inferpool":
        bench.warm(target, HEAVY_MODEL)
        bench.sweep(name, pids, target, HEAVY_MODEL, "miss")


def bulk_phase(bench: Bench, target: str, pids: Callable[[], list[int]] | None = None) -> None:
    """Bulk jobs of digits, and with the heavy model of it too (a tenth as many items);
    with `pids`, each job's CPU µs per item per process of the stack."""
    from bench.bulk import run_job
    from inferpool.client import Client

    items = bench.args.bulk_items
    runs = [("bulk", "digits", items)]
    if bench.args.heavy:
        runs.append(("bulk_heavy", HEAVY_MODEL, max(500, items // 10)))
    with Client(target) as client:
        for key, model, n in runs:
            run_job(client, min(n, 2000), 1, model, SHAPES[model])  # warm-up: the first chunks
            jobs = [
                run_job(client, n, 100 + r, model, SHAPES[model], pids) for r in range(bench.args.repeats)
            ]
            b: dict[str, Any] = {"model": model, "items": n, "jobs": jobs}
            for k in ("items_per_s", "compute_items_per_s", "after_upload_items_per_s"):
                b[k] = sorted(j[k] for j in jobs)[len(jobs) // 2]
            names = sorted({name for j in jobs for name in j["server_cpu_us_per_item"]})
            b["server_cpu_us_per_item"] = {
                name: spread([j["server_cpu_us_per_item"].get(name, 0.0) for j in jobs]) for name in names
            }
            bench.extra[key] = b
            bench.log(
                f"  {model} bulk job of {n}: {b['items_per_s']:,.0f} items/s upload to SUCCEEDED, "
                f"{b['compute_items_per_s']:,.0f} over its compute phase, "
                f"{b['after_upload_items_per_s']:,.0f} after its upload"
            )


def run_systems(bench: Bench, repo: Path) -> None:
    args, models = bench.args, ["digits", HEAVY_MODEL] if bench.args.heavy else ["digits"]
    if "b1" in args.systems:
        bench.log(f"b1 raw: the model alone, by batch size ({', '.join(models)})")
        for model in models:
            bench.extra.setdefault("raw", {})[model] = best(
                raw_model(repo, model, 0.2 if args.quick else 0.5)
            )
    for key, kind, workload in (
        ("b3", "fixed", "hit"),
        ("b2", "threadpool", "miss"),
        ("b5", "batcher", "miss"),
    ):
        if key not in args.systems:
            continue
        bench.log(f"{NAMES[key]}: bench.baselines {kind}")
        with baseline_server(kind, repo) as server:
            target, pids = server.target, (lambda p=server.proc.pid: [p])
            bench.warm(target, "digits", hits=workload == "hit")
            bench.sweep(NAMES[key], pids, target, "digits", workload)
            if key == "b2" and not args.quick:
                bench.open_loop(NAMES[key], pids, target, "digits")
            if key in ("b2", "b5") and args.heavy:
                bench.warm(target, HEAVY_MODEL)
                bench.sweep(NAMES[key], pids, target, HEAVY_MODEL, "miss")
    if args.target:
        bench.log(f"inferpool at {args.target} (no server CPU: its processes are not here)")
        stack_phase(bench, "inferpool", args.target, lambda: [], None)
        if args.bulk_items:
            bulk_phase(bench, args.target)
        return
    for system in ("inferpool", "inferpool-noflower", "b4"):
        if system not in args.systems:
            continue
        bench.log(f"{NAMES[system]}: the Procfile stack on loopback")
        with local_stack(bench, system, repo) as stack:
            pids = lambda s=stack: procs.tree(s.pid)  # noqa: E731
            stack_phase(bench, system, stack.target, pids, stack.metrics_urls["api"])
            if system == "inferpool" and args.bulk_items:
                bulk_phase(bench, stack.target, pids)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="every system at 1,8,64 (2 s x 3), miss and hit only, no heavy model: ~5 min on 2 cores",
    )
    parser.add_argument("--seconds", type=float, help="length of each run (default 5; quick 2)")
    parser.add_argument("--repeats", type=int, help="runs per cell: min/median/max (default 5; quick 3)")
    parser.add_argument("--concurrency", help="closed-loop sweep (default 1,8,64,256; quick 1,8,64)")
    parser.add_argument("--systems", help=f"comma-separated subset of {','.join(SYSTEMS)} (default all)")
    parser.add_argument("--generators", type=int, default=1, help="load-generator processes (default 1)")
    parser.add_argument(
        "--bulk-items", type=int, help="items per bulk job, 0 = none (default 20000; quick 5000)"
    )
    parser.add_argument("--target", help="host:port of a running API; default starts a local stack")
    parser.add_argument(
        "--baseline-ref",
        help="git ref to compare this working tree with: miss@64, hit@64, miss@1 of both, one table "
        "(quick's run length and repeats unless given)",
    )
    parser.add_argument("--no-heavy", action="store_true", help=f"leave out {HEAVY_MODEL} (quick: always)")
    parser.add_argument(
        "--out", type=Path, help="JSON path (default bench/results/harness/<date>-<commit>.json)"
    )
    args = parser.parse_args(argv)
    if args.baseline_ref and args.target:
        parser.error("--baseline-ref starts both stacks itself: it takes no --target")
    quick = args.quick or bool(args.baseline_ref)
    args.seconds = args.seconds or (2.0 if quick else 5.0)
    args.repeats = args.repeats or (3 if quick else 5)
    args.concurrency = [
        int(c) for c in (args.concurrency or ("1,8,64" if args.quick else "1,8,64,256")).split(",")
    ]
    args.heavy_concurrency = [c for c in args.concurrency if c <= 64] or args.concurrency
    args.bulk_items = (5000 if args.quick else 20000) if args.bulk_items is None else args.bulk_items
    args.open_fractions = [0.25, 0.5, 0.75]
    args.systems = args.systems.split(",") if args.systems else list(SYSTEMS)
    unknown = set(args.systems) - set(SYSTEMS)
    if unknown:
        parser.error(f"unknown systems {sorted(unknown)}; choose from {', '.join(SYSTEMS)}")
    args.heavy = not (args.no_heavy or args.quick or args.target)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    info = results.meta({"generators": args.generators, "seconds": args.seconds, "repeats": args.repeats})
    t_begin = time.perf_counter()
    if args.baseline_ref:
        from bench.compare import compare

        with Generators(args.generators) as gens:
            bench = Bench(args, gens)
            rows = compare(bench, args.baseline_ref)
        info["wall_s"] = time.perf_counter() - t_begin
        data = {"baseline_ref": args.baseline_ref, "rows": rows, "cells": [c.summary() for c in bench.cells]}
        path = results.write("compare", data, args.out, info)
        print(f"\nwrote {path} ({info['wall_s']:.0f}s)")
        return
    with Generators(args.generators) as gens:
        bench = Bench(args, gens)
        with tempfile.TemporaryDirectory(prefix="inferpool-bench-") as tmp:
            repo = make_repository(Path(tmp)) if args.heavy else ROOT / "models"
            run_systems(bench, repo)
    target_rows = targets(bench.cells, bench.extra)
    print_report(bench.cells, bench.extra, target_rows, args)
    info["wall_s"] = time.perf_counter() - t_begin
    data = {"cells": [c.summary() for c in bench.cells], "targets": target_rows, **bench.extra}
    path = results.write("harness", data, args.out, info)
    png = path.with_suffix(".png")
    plot(bench.cells, args.repeats, png)
    print(f"\nwrote {path} and {png} ({info['wall_s']:.0f}s)")


if __name__ == "__main__":
    main()
