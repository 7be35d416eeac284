"""Overload with short deadlines: are excess calls refused, fast, instead of lapsing?

Starts the stack on loopback (or targets `--target`), measures capacity (closed loop at
64 in flight with a long deadline), then sweeps closed loops of `--inflight` callers
(64/128/256/512 by default) whose calls carry a `--deadline-ms` deadline (100 ms). Each
run's load comes from bench/loadgen.py in generator processes of their own process group
(bench/generators.py), which report their own CPU and event-loop lag: a run where the
generators lagged more than `--max-generator-lag-ms` at p99 measured the generator, not
the server, and is discarded and tried again (at most `--tries` times; the table marks a run that never got
under the bound).

Per run the table gives, from the API's /metrics (server side): calls answered OK, calls
accepted that lapsed (DEADLINE_EXCEEDED, or CANCELLED when the client's deadline fired
first) as a share of the calls accepted, and refusals (RESOURCE_EXHAUSTED, whether the
handler refused or the server's concurrent-RPC bound did before it); from the generator:
calls offered per second as a multiple of capacity, goodput (OK/s) as a share of
capacity, and the refusals' p99 latency as the client saw it.

    python -m bench.overload [--inflight 64,128,256,512] [--deadline-ms 100] [--seconds 5]
                             [--tries 3] [--model digits|resnet28|resnet64] [--pin]

A rejected caller retries after `--backoff-ms` (default 0: at once), so a closed loop
of N callers offers far more than capacity once refusals come back in microseconds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from bench import procs, results, scrape
from bench.generators import Generators
from bench.heavy import make_repository
from bench.loadgen import SHAPES, Load, Run
from bench.proxies import ProxyProcess
from bench.stack import LocalStack


def pin(pid: int, cpus: set[int]) -> None:
    """Every thread of `pid` onto `cpus` (threads it starts later inherit it)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.sched_setaffinity(int(tid), cpus)


def _pct(ms: np.ndarray, q: float) -> float | None:
    return float(np.percentile(ms, q)) if len(ms) else None


def report(run: Run, processes: int) -> dict[str, Any]:
    """What the table and the results file keep of a generator run."""
    codes = {code: n for code, n in {"OK": run.ok, **run.errors}.items() if n}
    lag = run.lag_p99_ms
    return {
        "calls": sum(codes.values()),
        "wall_s": run.elapsed_s,
        "codes": codes,
        "generators": processes,
        "ok_p50_ms": _pct(run.lat_ms, 50),
        "ok_p99_ms": _pct(run.lat_ms, 99),
        "refused_p50_ms": _pct(run.refused_ms, 50),
        "refused_p99_ms": _pct(run.refused_ms, 99),
        "refused_by_rpc_limit": run.refused_by_rpc_limit,
        "generator_cpu": run.cpu_s / run.elapsed_s if run.elapsed_s else 0.0,
        "generator_lag_p99_ms": lag if np.isfinite(lag) else 0.0,
    }


# --- Server side: the API's own counts, from /metrics.


def server_counts(metrics_url: str | None) -> Counter[str]:
    """Classify calls the API's handler answered, by status code, and those refused
    before it (`shed_<reason>`), cumulative."""
    counts: Counter[str] = Counter()
    if metrics_url:
        for (name, labels), value in scrape.scrape(metrics_url).items():
            label = dict(labels)
            if name == "inferpool_requests_total" and label.get("rpc") == "Classify":
                counts[label["code"]] = int(value)
            elif name == "inferpool_shed_total":
                counts[f"shed_{label['reason']}"] = int(value)
    return counts


def server_refusal_p99_ms(before: scrape.Samples, after: scrape.Samples) -> float | None:
    """The API's own p99 of its refusals (RESOURCE_EXHAUSTED) of Classify calls: the upper
    bound of the latency bucket that holds it, from arrival at the server to the answer."""
    by_code = scrape.buckets(
        scrape.delta(before, after), "inferpool_request_duration_seconds", "code", rpc="Classify"
    )
    refused = by_code.get("RESOURCE_EXHAUSTED")
    if not refused or not max(refused.values()):
        return None
    (p99,) = scrape.quantile_bounds(refused, (0.99,))
    return None if p99 is None else p99 * 1000


def measure_run(
    args: argparse.Namespace,
    target: str,
    metrics_url: str | None,
    inflight: int,
    deadline_ms: float,
    seed: int,
) -> dict[str, Any]:
    """A closed loop of `inflight` callers (fresh inputs) from generator processes of
    their own, tried again while the generators lag past the bound."""
    load = Load(
        target,
        model=args.model,
        workload="miss",
        concurrency=inflight,
        seconds=args.seconds,
        timeout_s=deadline_ms / 1000,
        backoff_s=args.backoff_ms / 1000,
    )
    processes = max(1, -(-inflight // args.callers_per_generator))
    with Generators(processes) as generators:
        if args.generator_cpus:
            for pid in generators.pids:
                pin(pid, args.generator_cpus)
        for attempt in range(1, args.tries + 1):
            before_samples = scrape.scrape(metrics_url) if metrics_url else {}
            before = server_counts(metrics_url)
            gen = report(generators.run(load, seed_base=seed), processes)
            after = server_counts(metrics_url)
            server = {code: after[code] - before[code] for code in after if after[code] - before[code]}
            gen["server"] = server
            gen["server_refused_p99_ms"] = (
                server_refusal_p99_ms(before_samples, scrape.scrape(metrics_url)) if metrics_url else None
            )
            gen["attempt"] = attempt
            lag = gen["generator_lag_p99_ms"]
            gen["valid"] = lag <= args.max_generator_lag_ms
            if gen["valid"]:
                break
            print(f"  {inflight} in flight: generator lag p99 {lag:.1f} ms, discarded (try {attempt})")
    return gen


def row(capacity: float, inflight: int, run: dict[str, Any]) -> dict[str, Any]:
    server, codes, wall = run["server"], run["codes"], run["wall_s"]
    shed = sum(n for code, n in server.items() if code.startswith("shed_"))
    refused_by_handler = server.get("RESOURCE_EXHAUSTED", 0)
    lapsed = server.get("DEADLINE_EXCEEDED", 0) + server.get("CANCELLED", 0)
    # Every call the handler ran and did not refuse was let in: it had its chance.
    accepted = sum(server.values()) - shed - refused_by_handler
    return {
        "inflight": inflight,
        "offered_rps": run["calls"] / wall,
        "offered_x_capacity": run["calls"] / wall / capacity,
        "goodput_rps": codes.get("OK", 0) / wall,
        "goodput_share": codes.get("OK", 0) / wall / capacity,
        "server_ok": server.get("OK", 0),
        "server_lapsed": lapsed,
        "lapsed_share": lapsed / accepted if accepted else 0.0,
        "refused_by_handler": refused_by_handler,
        "shed": shed,
        "refused_by_rpc_limit": run["refused_by_rpc_limit"],
        "refused_p99_ms": run["refused_p99_ms"],
        "server_refused_p99_ms": run["server_refused_p99_ms"],
        "client_deadline_exceeded": codes.get("DEADLINE_EXCEEDED", 0),
        "generator_lag_p99_ms": run["generator_lag_p99_ms"],
        "generator_cpu": run["generator_cpu"],
        "valid": run["valid"],
        "server": server,
        "codes": codes,
    }


def sweep(args: argparse.Namespace, target: str, metrics_url: str | None) -> dict[str, Any]:
    # Warm-up, then capacity: enough callers to keep the pool busy, deadlines it never meets.
    measure_run(args, target, metrics_url, 16, 5000, 1)
    cap = measure_run(args, target, metrics_url, 64, 5000, 2)
    capacity = cap["codes"].get("OK", 0) / cap["wall_s"]
    rows = [
        row(capacity, n, measure_run(args, target, metrics_url, n, args.deadline_ms, 10 + i))
        for i, n in enumerate(args.inflight)
    ]
    return {"capacity_rps": capacity, "capacity_run": cap, "rows": rows}


def print_table(result: dict[str, Any], args: argparse.Namespace) -> None:
    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f}"

    print(
        f"\n{args.model}: capacity {result['capacity_rps']:,.0f} req/s (closed loop, 64 in flight); "
        f"{args.deadline_ms:.0f} ms deadlines, {args.seconds:.0f} s per run"
    )
    head = (
        f"{'inflight':>8}{'offered/s':>10}{'x cap':>7}{'OK/s':>7}{'of cap':>8}{'srv OK':>8}"
        f"{'lapsed':>8}{'of acc':>8}{'refused':>9}{'(limit)':>9}{'ref p99':>9}{'gen lag':>9}{'gen cpu':>9}"
    )
    print(head)
    for r in result["rows"]:
        print(
            f"{r['inflight']:>8}{r['offered_rps']:>10,.0f}{r['offered_x_capacity']:>7.1f}"
            f"{r['goodput_rps']:>7,.0f}{r['goodput_share']:>8.0%}{r['server_ok']:>8}{r['server_lapsed']:>8}"
            f"{r['lapsed_share']:>8.1%}{r['refused_by_handler'] + r['shed'] + r['refused_by_rpc_limit']:>9}"
            f"{r['refused_by_rpc_limit']:>9}{ms(r['refused_p99_ms']):>9}{ms(r['server_refused_p99_ms']):>9}"
            f"{ms(r['generator_lag_p99_ms']):>9}"
            f"{r['generator_cpu']:>9.0%}{'' if r['valid'] else '  (generator lagged)'}"
        )
    print(
        "lapsed: accepted calls answered DEADLINE_EXCEEDED or CANCELLED (server side); of acc: their "
        "share of accepted calls; refused: RESOURCE_EXHAUSTED at the door or by the handler, (limit): of "
        "those, by the concurrent-RPC bound; ref p99: refusals' latency at the client (ms); srv ref: the "
        "API's own p99 of its refusals (upper bound of its histogram bucket, ms);\n"
        "gen lag: the worst generator process's loop lag p99 (ms); gen cpu: the generators' CPU"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=sorted(SHAPES), default="digits", help="the model to overload")
    parser.add_argument(
        "--inflight",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[64, 128, 256, 512],
        help="comma-separated callers in flight, one run each",
    )
    parser.add_argument("--deadline-ms", type=float, default=100.0)
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each run")
    parser.add_argument("--backoff-ms", type=float, default=0.0, help="a refused caller's pause")
    parser.add_argument(
        "--callers-per-generator", type=int, default=512, help="callers per generator process at most"
    )
    parser.add_argument("--tries", type=int, default=3, help="runs per point at most (generator lag)")
    parser.add_argument("--max-generator-lag-ms", type=float, default=20.0)
    parser.add_argument("--target", help="host:port of a running API; default starts a stack")
    parser.add_argument("--metrics", help="the running API's /metrics URL (with --target)")
    parser.add_argument(
        "--pin",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="the worker alone on the last CPU, everything else on the others",
    )
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        help="NAME=VALUE for the stack (INFERPOOL_* settings); repeatable",
    )
    parser.add_argument(
        "--proxy-limit",
        type=int,
        default=0,
        help="call the API through HAProxy, refusing inference calls past this many in flight",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON path (default bench/results/overload/<date>-<commit>-<setup>.json)",
    )
    args = parser.parse_args()
    args.generator_cpus = None
    if args.target:
        result = sweep(args, args.target, args.metrics)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            repository = make_repository(Path(tmp), models=(args.model,)) if args.model != "digits" else None
            # One torch thread for the worker's one core: more would only contend.
            env = {"INFERPOOL_TORCH_THREADS": "1"} if args.pin else {}
            env.update(item.split("=", 1) for item in args.env)
            with LocalStack(flower=False, model_repository=repository, extra_env=env) as stack:
                if args.pin:
                    pids = procs.find(stack.pid)
                    cpus = sorted(os.sched_getaffinity(0))
                    worker_cpus, rest = set(cpus[-1:]), set(cpus[:-1])
                    for pid in [os.getpid(), *procs.tree(stack.pid)]:
                        pin(pid, worker_cpus if pid == pids["worker"] else rest)
                    args.generator_cpus = rest
                    print(f"pinned: worker on CPU {sorted(worker_cpus)}, the rest on {sorted(rest)}")
                with contextlib.ExitStack() as proxied:
                    target = stack.target
                    if args.proxy_limit:
                        proxy = ProxyProcess("haproxy", [stack.target], inflight_limit=args.proxy_limit)
                        proxied.callback(proxy.stop)
                        if args.generator_cpus:
                            pin(proxy.popen.pid, args.generator_cpus)
                        target = proxy.target
                    result = sweep(args, target, stack.metrics_urls.get("api"))
    print_table(result, args)
    info = results.meta(
        {
            "loadavg": os.getloadavg(),
            **{k: v for k, v in vars(args).items() if k not in ("out", "generator_cpus")},
        }
    )
    setup = ("pinned" if args.pin else "shared") + (f"-proxy{args.proxy_limit}" if args.proxy_limit else "")
    out = args.out or results.default_path("overload", info).with_suffix(f".{setup}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": info, **result}, indent=2, default=str))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
