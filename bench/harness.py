"""Issue 6's benchmark harness: inferpool next to its baselines, in one run.

    python -m bench.harness [--quick] [--seconds S] [--repeats N] [--concurrency 1,8,64,256]
                            [--target HOST:PORT]

One command makes a temporary model repository (digits, plus `resnet64`, a ResNet-style
net on 3x64x64 with seeded random weights: bench/heavy.py), starts each system on
loopback in turn and drives it from separate load-generator processes (each with its
own grpc.aio loop; concurrency and rate are split across them):

- closed loop at each concurrency, workloads `miss` (unique inputs), `hit` (a warmed
  set of 256), `zipf` (repeats drawn Zipf(1.1) from 4,096 inputs, fresh per run, so
  it starts cold), and open loop at fixed rates (25/50/75% of the system's own miss
  throughput at 64 in flight; latency counted from the scheduled send time, so a slow
  server cannot hide queueing);
- bulk jobs (bench/bulk.py's run_job) against baseline 1: digits, and the heavier model.

Systems (same model files, same machine, same run):
  inferpool    the real stack (bench/stack.py LocalStack, Flower off)
  b1 raw       the model alone at its best batch size: the compute limit
  b2 threads   a direct grpc server running the model per request in a thread pool
  b3 floor     a bare grpc.aio server returning a fixed response: the RPC floor
  b4 naive     the real stack with front-side coalescing off: one Celery message per
               miss (INFERPOOL_MAX_ENVELOPE_ITEMS=1); the measured mean of
               inferpool_envelope_items confirms it

Every figure is the median of `--repeats` runs. Prints tables with ratios and a
PASS/MISS column per target, writes bench/results/harness.json and harness.png.
`--target` measures a running stack instead of starting one (baselines 1-3 still run
here on models/; b4 and the heavy model need a local stack and are skipped).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import zlib
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from bench.heavy import HEAVY_MODEL, HEAVY_SHAPE, make_repository
from bench.stack import ROOT, LocalStack, free_port, wait_port

RESULTS = ROOT / "bench" / "results"
SHAPES: dict[str, tuple[int, ...]] = {"digits": (1, 28, 28), HEAVY_MODEL: HEAVY_SHAPE}
HOT_ITEMS = 256
ZIPF_ITEMS = 4096
ZIPF_S = 1.1
GENERATORS = 2
TIMEOUT_S = 5.0
# Open-loop tasks a generator lets be outstanding: past it the server is hopelessly
# behind and further sends are counted as `shed` instead of piling up in memory.
MAX_OUTSTANDING = 4096
# Seconds between sending a run's commands and its start, for each generator's
# channel to connect first (connection set-up is not what is measured).
START_DELAY_S = 0.4


# --------------------------------------------------------------------------- generators


def _inputs(cmd: dict[str, Any]) -> Iterator[np.ndarray]:
    shape = (1, *SHAPES[cmd["model"]])
    rng = np.random.default_rng(cmd["seed"])
    if cmd["workload"] == "miss":
        while True:
            yield rng.random(shape, dtype=np.float32)
    if cmd["workload"] == "hit":
        # The same seed as the warm-up, so every input is in the cache.
        hot = np.random.default_rng(cmd["hot_seed"]).random((HOT_ITEMS, *shape), dtype=np.float32)
        i = int(rng.integers(HOT_ITEMS))
        while True:
            i += 1
            yield hot[i % HOT_ITEMS]
    # zipf: every generator of a run draws from the same pool (same pool_seed), with its
    # own stream of ranks.
    pool = np.random.default_rng(cmd["pool_seed"]).random((ZIPF_ITEMS, *shape), dtype=np.float32)
    weights = 1.0 / np.arange(1, ZIPF_ITEMS + 1) ** ZIPF_S
    while True:
        for index in rng.choice(ZIPF_ITEMS, size=4096, p=weights / weights.sum()):
            yield pool[index]


async def _drive(cmd: dict[str, Any]) -> dict[str, Any]:
    from inferpool import tensor
    from inferpool.v1 import inference_pb2, inference_pb2_grpc

    latencies: list[float] = []
    errors: Counter[str] = Counter()
    cached = shed = 0
    inputs = _inputs(cmd)

    def request() -> inference_pb2.ClassifyRequest:
        return inference_pb2.ClassifyRequest(model=cmd["model"], input=tensor.to_proto(next(inputs)))

    async with grpc.aio.insecure_channel(cmd["target"]) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        await asyncio.wait_for(channel.channel_ready(), 10)
        start = cmd["start_at"]
        stop = start + cmd["seconds"]
        await asyncio.sleep(max(0.0, start - time.time()))
        # perf_counter from here on; `start`/`stop` were wall clock to line up processes.
        t_start = time.perf_counter()
        t_stop = t_start + (stop - time.time())

        async def one(req: inference_pb2.ClassifyRequest, t0: float) -> None:
            nonlocal cached
            try:
                response = await stub.Classify(req, timeout=TIMEOUT_S)
            except grpc.aio.AioRpcError as exc:
                errors[exc.code().name] += 1
                return
            latencies.append(time.perf_counter() - t0)
            cached += response.cached

        if cmd["mode"] == "closed":

            async def caller() -> None:
                while time.perf_counter() < t_stop:
                    req = request()
                    await one(req, time.perf_counter())

            await asyncio.gather(*(caller() for _ in range(cmd["concurrency"])))
        else:
            interval = 1.0 / cmd["rate"]
            tasks: set[asyncio.Task[None]] = set()
            i = 0
            while True:
                scheduled = t_start + i * interval
                if scheduled >= t_stop:
                    break
                i += 1
                delay = scheduled - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                if len(tasks) >= MAX_OUTSTANDING:
                    shed += 1
                    continue
                # Latency from the scheduled time: a late send counts against the server.
                task = asyncio.create_task(one(request(), scheduled))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            if tasks:
                await asyncio.wait(tasks)
        elapsed = time.perf_counter() - t_start
    return {
        "lat_ms": np.asarray(latencies, dtype=np.float64) * 1000,
        "errors": dict(errors),
        "cached": cached,
        "shed": shed,
        "elapsed": elapsed,
    }


def _generator_main(conn: Connection) -> None:
    """One load-generator process: runs the commands it is sent until told to stop."""
    try:
        import uvloop

        run: Any = uvloop.run  # less client CPU per call: the generators share the cores
    except ImportError:
        run = asyncio.run
    while True:
        cmd = conn.recv()
        if cmd is None:
            return
        try:
            conn.send(run(_drive(cmd)))
        except Exception as exc:
            conn.send({"failure": repr(exc)})


class Generators:
    """`GENERATORS` load-generator processes (spawned: no grpc state crosses a fork)."""

    def __init__(self, count: int = GENERATORS) -> None:
        ctx = mp.get_context("spawn")
        self.conns: list[Connection] = []
        self.procs: list[Any] = []
        for _ in range(count):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_generator_main, args=(child,), daemon=True)
            proc.start()
            self.conns.append(parent)
            self.procs.append(proc)
        self.runs = 0

    def run(self, base: dict[str, Any], concurrency: int = 0, rate: float = 0.0) -> dict[str, Any]:
        """One measured run, `concurrency` callers (closed loop) or `rate` requests/s
        (open loop) split across the generators; the aggregate figures."""
        self.runs += 1
        n = len(self.conns)
        start_at = time.time() + START_DELAY_S
        active = []
        for g, conn in enumerate(self.conns):
            share_c = concurrency // n + (g < concurrency % n)
            if (concurrency and not share_c) or (rate and g > 0 and rate < 50):
                continue  # a lone caller, or a rate too low to split, stays on one process
            share_r = rate / n if rate >= 50 else rate
            cmd = dict(
                base,
                mode="closed" if concurrency else "open",
                concurrency=share_c,
                rate=share_r,
                start_at=start_at,
                # Unique per run and generator, so miss inputs never repeat.
                seed=(self.runs * 1000 + g) * 7919 + base.get("seed_base", 0),
                pool_seed=self.runs * 1000 + base.get("seed_base", 0),
            )
            conn.send(cmd)
            active.append(conn)
        parts = [conn.recv() for conn in active]
        failures = [p["failure"] for p in parts if "failure" in p]
        if failures:
            raise RuntimeError(f"load generator failed: {failures}")
        lat = np.concatenate([p["lat_ms"] for p in parts]) if parts else np.zeros(0)
        errors: Counter[str] = Counter()
        for p in parts:
            errors.update(p["errors"])
        ok = len(lat)
        return {
            "rps": sum(len(p["lat_ms"]) / p["elapsed"] for p in parts),
            "p50_ms": float(np.percentile(lat, 50)) if ok else float("nan"),
            "p99_ms": float(np.percentile(lat, 99)) if ok else float("nan"),
            "requests": ok,
            "errors": dict(errors),
            "cached_fraction": sum(p["cached"] for p in parts) / max(1, ok),
            "shed": sum(p["shed"] for p in parts),
        }

    def close(self) -> None:
        for conn in self.conns:
            conn.send(None)
        for proc in self.procs:
            proc.join(5)
            if proc.is_alive():
                proc.terminate()


# --------------------------------------------------------------------------- measuring


@dataclass
class Cell:
    system: str
    model: str
    workload: str
    mode: str  # closed | open
    load: float  # concurrency (closed) or offered req/s (open)
    runs: list[dict[str, Any]] = field(default_factory=list)

    def median(self, key: str) -> float:
        return float(statistics.median(r[key] for r in self.runs))

    def summary(self) -> dict[str, Any]:
        errors: Counter[str] = Counter()
        for r in self.runs:
            errors.update(r["errors"])
        return {
            "system": self.system,
            "model": self.model,
            "workload": self.workload,
            "mode": self.mode,
            "load": self.load,
            "rps": self.median("rps"),
            "p50_ms": self.median("p50_ms"),
            "p99_ms": self.median("p99_ms"),
            "cached_fraction": self.median("cached_fraction"),
            "errors": dict(errors),
            "shed": sum(r["shed"] for r in self.runs),
            "runs": self.runs,
        }


class Bench:
    def __init__(self, args: argparse.Namespace, gens: Generators) -> None:
        self.args = args
        self.gens = gens
        self.cells: list[Cell] = []
        self.extra: dict[str, Any] = {}

    def log(self, text: str) -> None:
        print(text, flush=True)

    def measure(
        self, system: str, target: str, model: str, workload: str, concurrency: int = 0, rate: float = 0.0
    ) -> Cell:
        mode = "closed" if concurrency else "open"
        cell = Cell(system, model, workload, mode, concurrency or round(rate))
        base = {
            "target": target,
            "model": model,
            "workload": workload,
            "seconds": self.args.seconds,
            "hot_seed": 12345,
            "seed_base": zlib.crc32(f"{system}/{model}/{workload}".encode()) % 997,
        }
        for _ in range(self.args.repeats):
            cell.runs.append(self.gens.run(base, concurrency=concurrency, rate=rate))
        self.cells.append(cell)
        s = cell.summary()
        err = sum(s["errors"].values())
        self.log(
            f"  {system:<11}{model:<9}{workload:<6}{mode:<7}{cell.load:>6}  {s['rps']:>8,.0f} req/s"
            f"  p50 {s['p50_ms']:>7.2f}  p99 {s['p99_ms']:>7.2f} ms  cached {s['cached_fraction']:>4.0%}"
            + (f"  errors {s['errors']}" if err else "")
            + (f"  shed {s['shed']}" if s["shed"] else "")
        )
        return cell

    def sweep(self, system: str, target: str, model: str, workload: str, concurrencies: list[int]) -> None:
        for c in concurrencies:
            self.measure(system, target, model, workload, concurrency=c)

    def open_loop(self, system: str, target: str, model: str) -> None:
        """Open-loop points at fractions of this system's own miss capacity at 64 (or
        the highest concurrency measured), so each curve spans its own range."""
        closed = [
            c
            for c in self.cells
            if (c.system, c.model, c.workload, c.mode) == (system, model, "miss", "closed")
        ]
        if not closed or not self.args.open_fractions:
            return
        ref = next((c for c in closed if c.load == 64), closed[-1])
        capacity = ref.median("rps")
        for fraction in self.args.open_fractions:
            self.measure(system, target, model, "miss", rate=max(1.0, capacity * fraction))

    def warm(self, target: str, model: str, hits: bool = False) -> None:
        """Runs some misses, so JITs and pools have seen traffic before anything is
        measured; with `hits`, first fills the cache with the hit set."""
        base = {"target": target, "model": model, "seconds": 1.0, "hot_seed": 12345, "seed_base": 1}
        if hits:
            self.gens.run(dict(base, workload="hit", seconds=2.0), concurrency=8)
        self.gens.run(dict(base, workload="miss"), concurrency=8)


def cell_of(cells: list[Cell], system: str, model: str, workload: str, load: float) -> Cell | None:
    for c in cells:
        if (c.system, c.model, c.workload, c.mode, c.load) == (system, model, workload, "closed", load):
            return c
    return None


@contextmanager
def baseline_server(kind: str, repository: Path) -> Iterator[str]:
    """A baseline server process of bench/baselines.py on a free port; yields its target."""
    port = free_port()
    cmd = [sys.executable, "-m", "bench.baselines", kind, "--port", str(port)]
    if kind == "threadpool":
        cmd += ["--repository", str(repository)]
    proc = subprocess.Popen(cmd, cwd=ROOT)
    try:
        wait_port(port, 120, proc)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def raw_model(repository: Path, model: str, seconds: float) -> dict[str, float]:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.baselines",
            "raw",
            "--repository",
            str(repository),
            "--model",
            model,
            "--seconds",
            str(seconds),
        ],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    rates: dict[str, float] = json.loads(out.strip().splitlines()[-1])
    return rates


def envelope_items(metrics_url: str, model: str = "digits") -> tuple[float, float]:
    """(sum, count) of the API's inferpool_envelope_items histogram for `model`."""
    text = urllib.request.urlopen(metrics_url, timeout=5).read().decode()
    values = {"sum": 0.0, "count": 0.0}
    for line in text.splitlines():
        for kind in values:
            if line.startswith(f"inferpool_envelope_items_{kind}{{") and f'model="{model}"' in line:
                values[kind] = float(line.rsplit(" ", 1)[1])
    return values["sum"], values["count"]


def stack_phase(bench: Bench, system: str, target: str, metrics_url: str | None, heavy: bool) -> None:
    """The inferpool stack (or b4, the same stack with coalescing off) on every workload."""
    args = bench.args
    bench.warm(target, "digits", hits=True)
    before = envelope_items(metrics_url) if metrics_url else None
    bench.sweep(system, target, "digits", "miss", args.concurrency)
    if before is not None and metrics_url:
        after = envelope_items(metrics_url)
        messages = after[1] - before[1]
        mean = (after[0] - before[0]) / messages if messages else float("nan")
        bench.extra.setdefault("envelope_items_mean", {})[system] = mean
        bench.log(f"  {system}: {mean:.2f} misses per queue message (inferpool_envelope_items mean)")
    if system == "b4 naive":
        return
    bench.sweep(system, target, "digits", "hit", args.concurrency)
    bench.sweep(system, target, "digits", "zipf", args.concurrency)
    bench.open_loop(system, target, "digits")
    if heavy:
        bench.warm(target, HEAVY_MODEL)
        bench.sweep(system, target, HEAVY_MODEL, "miss", args.heavy_concurrency)


def bulk_phase(bench: Bench, target: str, heavy: bool = False) -> None:
    """Bulk jobs of digits, and with `heavy` of the heavier model too (a tenth as many
    items): there the model, not the per-item cost of the path, sets the pace."""
    from bench.bulk import run_job
    from inferpool.client import Client

    runs = [("bulk", "digits", bench.args.bulk_items, SHAPES["digits"])]
    if heavy:
        runs.append(("bulk_heavy", HEAVY_MODEL, max(500, bench.args.bulk_items // 10), SHAPES[HEAVY_MODEL]))
    with Client(target) as client:
        for key, model, items, shape in runs:
            run_job(client, min(items, 2000), 1, model, shape)  # warm-up: the bulk path's first chunks
            jobs = [run_job(client, items, 100 + r, model, shape) for r in range(bench.args.repeats)]
            bench.extra[key] = {
                "model": model,
                "items": items,
                "jobs": jobs,
                "items_per_s": statistics.median(j["items_per_s"] for j in jobs),
                "compute_items_per_s": statistics.median(j["compute_items_per_s"] for j in jobs),
                "after_upload_items_per_s": statistics.median(j["after_upload_items_per_s"] for j in jobs),
            }
            b = bench.extra[key]
            bench.log(
                f"  {model} bulk job of {items}: {b['items_per_s']:,.0f} items/s upload to SUCCEEDED, "
                f"{b['compute_items_per_s']:,.0f} over its compute phase, "
                f"{b['after_upload_items_per_s']:,.0f} after its upload"
            )


# --------------------------------------------------------------------------- reporting


def targets(bench: Bench) -> list[dict[str, Any]]:
    """Issue 6's targets, as ratios within this run."""
    cells, rows = bench.cells, []

    def row(name: str, value: float | None, need: float, unit: str, higher: bool = True) -> None:
        ok = None if value is None or value != value else (value >= need if higher else value <= need)
        rows.append(
            {
                "target": name,
                "value": value,
                "need": f"{'>=' if higher else '<='} {need:g}{unit}",
                "unit": unit,
                "result": "n/a" if ok is None else ("PASS" if ok else "MISS"),
            }
        )

    miss64 = cell_of(cells, "inferpool", "digits", "miss", 64)
    b2 = cell_of(cells, "b2 threads", "digits", "miss", 64)
    b4 = cell_of(cells, "b4 naive", "digits", "miss", 64)
    hit64 = cell_of(cells, "inferpool", "digits", "hit", 64)
    b3 = cell_of(cells, "b3 floor", "digits", "hit", 64)
    miss1 = cell_of(cells, "inferpool", "digits", "miss", 1)

    def ratio(a: Cell | None, b: Cell | None) -> float | None:
        return a.median("rps") / b.median("rps") if a and b else None

    row("miss @64: throughput vs b2 threads", ratio(miss64, b2), 1.5, "x")
    row("miss @64: throughput vs b4 naive", ratio(miss64, b4), 6, "x")
    row("miss @64: p99", miss64.median("p99_ms") if miss64 else None, 30, " ms", higher=False)
    row("hit @64: throughput vs b3 floor", ratio(hit64, b3), 0.7, "x")
    row("miss @1: p50", miss1.median("p50_ms") if miss1 else None, 3, " ms", higher=False)
    bulk, raw = bench.extra.get("bulk"), bench.extra.get("raw", {}).get("digits")
    row(
        "bulk job: items/s vs b1 raw (best batch)",
        bulk["items_per_s"] / raw["best_items_per_s"] if bulk and raw else None,
        0.4,
        "x",
    )
    heavy = cell_of(cells, "inferpool", HEAVY_MODEL, "miss", 64)
    heavy_b2 = cell_of(cells, "b2 threads", HEAVY_MODEL, "miss", 64)
    if heavy and heavy_b2:
        row(
            f"{HEAVY_MODEL} miss @64: throughput vs b2 (no target; context)", ratio(heavy, heavy_b2), 1.5, "x"
        )
    bulk, raw = bench.extra.get("bulk_heavy"), bench.extra.get("raw", {}).get(HEAVY_MODEL)
    if bulk and raw:
        row(
            f"{HEAVY_MODEL} bulk job: items/s vs b1 raw (no target; context)",
            bulk["items_per_s"] / raw["best_items_per_s"],
            0.4,
            "x",
        )
    return rows


def print_report(bench: Bench, target_rows: list[dict[str, Any]]) -> None:
    cells = bench.cells
    print(
        f"\nClosed loop, median of {bench.args.repeats} runs of {bench.args.seconds:g}s (req/s, p50/p99 ms)"
    )
    head = f"{'model':<9}{'workload':<9}{'conc':>5}  " + "".join(
        f"{s:>26}" for s in ("inferpool", "b2 threads", "b3 floor", "b4 naive")
    )
    print(head + f"{'vs b2':>8}{'vs b3':>8}{'vs b4':>8}")
    keys = sorted(
        {(c.model, c.workload, c.load) for c in cells if c.mode == "closed"},
        key=lambda k: (k[0] != "digits", ["miss", "hit", "zipf"].index(k[1]), k[2]),
    )
    for model, workload, load in keys:
        line = f"{model:<9}{workload:<9}{load:>5}  "
        # Each baseline is compared on its own workload: b2 and b4 with misses (they
        # have no cache, or are measured only cold), b3 (answers anything alike) with hits.
        found = {
            "inferpool": cell_of(cells, "inferpool", model, workload, load),
            "b2 threads": cell_of(cells, "b2 threads", model, "miss", load) if workload == "miss" else None,
            "b3 floor": cell_of(cells, "b3 floor", model, "hit", load) if workload == "hit" else None,
            "b4 naive": cell_of(cells, "b4 naive", model, "miss", load) if workload == "miss" else None,
        }
        for c in found.values():
            line += (
                f"{c.median('rps'):>10,.0f} {c.median('p50_ms'):>6.2f}/{c.median('p99_ms'):<7.2f}"
                if c
                else f"{'-':>26}"
            )
        mine = found["inferpool"]
        for system in ("b2 threads", "b3 floor", "b4 naive"):
            other = found[system]
            line += f"{mine.median('rps') / other.median('rps'):>7.2f}x" if mine and other else f"{'':>8}"
        print(line)
    opens = [c for c in cells if c.mode == "open"]
    if opens:
        print("\nOpen loop (miss), offered req/s -> achieved req/s, p50/p99 ms")
        for c in opens:
            print(
                f"  {c.system:<11}{c.model:<9}{c.load:>7,.0f} -> {c.median('rps'):>7,.0f}"
                f"   {c.median('p50_ms'):>7.2f} / {c.median('p99_ms'):<8.2f}"
            )
    raw = bench.extra.get("raw", {})
    for model, r in raw.items():
        print(
            f"\nb1 raw {model}: best batch {r['best_batch']}: {r['best_items_per_s']:,.0f} items/s"
            + "  (by batch: "
            + ", ".join(f"{k}: {v:,.0f}" for k, v in r["by_batch"].items())
            + ")"
        )
    for key in ("bulk", "bulk_heavy"):
        if key in bench.extra:
            b = bench.extra[key]
            print(
                f"bulk job, {b['model']} x {b['items']}: {b['items_per_s']:,.0f} items/s "
                f"(compute phase {b['compute_items_per_s']:,.0f}, after the upload "
                f"{b['after_upload_items_per_s']:,.0f})"
            )
    for system, mean in bench.extra.get("envelope_items_mean", {}).items():
        print(
            f"{system}: {mean:.2f} misses per queue message (API inferpool_envelope_items mean, miss sweep)"
        )
    if "b4 naive" in bench.extra.get("envelope_items_mean", {}):
        mean = bench.extra["envelope_items_mean"]["b4 naive"]
        if mean > 1.05:
            print(
                f"  NOTE: b4 averaged {mean:.2f} misses per message, not 1:"
                " check INFERPOOL_MAX_ENVELOPE_ITEMS."
            )
    print("\nTargets (ratios within this run)")
    for t in target_rows:
        value = "-" if t["value"] is None else f"{t['value']:.2f}{t['unit']}"
        print(f"  {t['target']:<58}{value:>10}   need {t['need']:<10}{t['result']:>6}")


def plot(bench: Bench, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on a server
    import matplotlib.pyplot as plt

    models = [m for m in ("digits", HEAVY_MODEL) if any(c.model == m for c in bench.cells)]
    fig, axes = plt.subplots(1, len(models), figsize=(7 * len(models), 5), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        series: dict[tuple[str, str, str], list[Cell]] = {}
        for c in bench.cells:
            if c.model == model:
                series.setdefault((c.system, c.workload, c.mode), []).append(c)
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for n, ((system, workload, mode), cs) in enumerate(sorted(series.items())):
            # In load order: past saturation throughput may fall as concurrency rises,
            # and the curve should show that rather than fold back on itself.
            cs.sort(key=lambda c: c.load)
            x = [c.median("rps") for c in cs]
            label = f"{system} {workload}{' (open)' if mode == 'open' else ''}"
            color = colors[n % len(colors)]
            marker = "s" if mode == "open" else "o"
            ax.plot(x, [c.median("p50_ms") for c in cs], marker=marker, color=color, label=f"{label} p50")
            ax.plot(
                x, [c.median("p99_ms") for c in cs], marker=marker, color=color, linestyle="--", alpha=0.6
            )
            if mode == "closed":  # label each point with its concurrency
                for c, xi in zip(cs, x, strict=True):
                    ax.annotate(f"{c.load:g}", (xi, c.median("p50_ms")), fontsize=6, color=color)
        ax.set_xlabel("throughput (req/s)")
        ax.set_ylabel("latency (ms; solid p50, dashed p99)")
        ax.set_yscale("log")
        ax.set_title(f"{model}: latency vs throughput (median of {bench.args.repeats})")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="short check: concurrency 1,64, 1s runs")
    parser.add_argument("--seconds", type=float, help="length of each run (default 3; quick 1)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per figure; the median is reported")
    parser.add_argument("--concurrency", help="closed-loop sweep (default 1,8,64,256; quick 1,64)")
    parser.add_argument("--bulk-items", type=int, help="items of each measured bulk job (default 20000)")
    parser.add_argument("--target", help="host:port of a running API; default starts a local stack")
    parser.add_argument("--no-heavy", action="store_true", help=f"leave out {HEAVY_MODEL}")
    parser.add_argument("--out", type=Path, default=RESULTS / "harness.json")
    args = parser.parse_args()
    args.seconds = args.seconds or (1.0 if args.quick else 3.0)
    args.concurrency = [
        int(c) for c in (args.concurrency or ("1,64" if args.quick else "1,8,64,256")).split(",")
    ]
    args.heavy_concurrency = [c for c in args.concurrency if c <= 64] or args.concurrency
    args.bulk_items = args.bulk_items or (5000 if args.quick else 20000)
    args.open_fractions = [0.5] if args.quick else [0.25, 0.5, 0.75]
    heavy = not args.no_heavy and not args.target

    t_begin = time.perf_counter()
    gens = Generators()
    bench = Bench(args, gens)
    try:
        with tempfile.TemporaryDirectory(prefix="inferpool-bench-") as tmp:
            repo = make_repository(Path(tmp)) if heavy else ROOT / "models"
            models = ["digits", HEAVY_MODEL] if heavy else ["digits"]
            bench.log(f"b1 raw: the model alone, by batch size ({', '.join(models)})")
            for model in models:
                rates = raw_model(repo, model, 0.2 if args.quick else 0.5)
                best = max(rates, key=lambda k: rates[k])
                bench.extra.setdefault("raw", {})[model] = {
                    "by_batch": rates,
                    "best_batch": int(best),
                    "best_items_per_s": rates[best],
                }
            bench.log("b3 floor: bare grpc.aio server, fixed response")
            with baseline_server("fixed", repo) as target:
                bench.warm(target, "digits", hits=True)
                bench.sweep("b3 floor", target, "digits", "hit", args.concurrency)
            bench.log("b2 threads: grpc server, model per request in a thread pool")
            with baseline_server("threadpool", repo) as target:
                bench.warm(target, "digits")
                bench.sweep("b2 threads", target, "digits", "miss", args.concurrency)
                bench.open_loop("b2 threads", target, "digits")
                if heavy:
                    bench.warm(target, HEAVY_MODEL)
                    bench.sweep("b2 threads", target, HEAVY_MODEL, "miss", args.heavy_concurrency)
            if args.target:
                bench.log(f"inferpool at {args.target}")
                stack_phase(bench, "inferpool", args.target, None, heavy=False)
                bulk_phase(bench, args.target)
            else:
                bench.log("inferpool: the stack on loopback")
                with LocalStack(flower=False, model_repository=repo) as stack:
                    stack_phase(bench, "inferpool", stack.target, stack.metrics_urls["api"], heavy)
                    bulk_phase(bench, stack.target, heavy)
                bench.log(
                    "b4 naive: the same stack, one Celery message per miss (INFERPOOL_MAX_ENVELOPE_ITEMS=1)"
                )
                naive = {"INFERPOOL_MAX_INFLIGHT_ENVELOPES": "1000000", "INFERPOOL_MAX_ENVELOPE_ITEMS": "1"}
                with LocalStack(extra_env=naive, flower=False, model_repository=repo) as stack:
                    stack_phase(bench, "b4 naive", stack.target, stack.metrics_urls["api"], heavy=False)
    finally:
        gens.close()

    target_rows = targets(bench)
    print_report(bench, target_rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    png = args.out.with_suffix(".png")
    plot(bench, png)
    meta = {
        "command": " ".join(["python -m bench.harness", *sys.argv[1:]]),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "seconds": args.seconds,
        "repeats": args.repeats,
        "generators": GENERATORS,
        "wall_s": time.perf_counter() - t_begin,
        "note": "load generators share the machine's cores with the system under test",
    }
    result = {
        "meta": meta,
        "cells": [c.summary() for c in bench.cells],
        "targets": target_rows,
        **bench.extra,
    }
    args.out.write_text(json.dumps(result, indent=2, default=float))
    print(f"\nwrote {args.out} and {png} ({meta['wall_s']:.0f}s)")


if __name__ == "__main__":
    main()
