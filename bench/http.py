"""HTTP beside gRPC: KServe v2 REST infer (Triton's binary data extension) and gRPC
Classify at the same concurrency levels, on one stack in one run; then gRPC alone on a
stack with the HTTP server off, to show serving HTTP does not slow gRPC.

    python -m bench.http [--seconds 10] [--concurrency 1,64] [--workload miss]

Both clients are closed loops from this process's event loop (gRPC: bench/loadgen.py;
HTTP: aiohttp, one body per input built as tritonclient.http builds it). Raw JSON goes to
bench/results/http/.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from bench import results
from bench.loadgen import Load, Run, inputs
from bench.loadgen import run as run_grpc
from bench.stack import LocalStack


def binary_body(x: np.ndarray) -> tuple[bytes, int]:
    """Triton's binary tensor request: the JSON head, then the tensor's bytes."""
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "image",
                    "datatype": "FP32",
                    "shape": list(x.shape),
                    "parameters": {"binary_data_size": x.nbytes},
                }
            ],
            "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}],
        }
    ).encode()
    return head + x.astype("<f4").tobytes(), len(head)


async def drive_http(load: Load) -> Run:
    import aiohttp

    run = Run()
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    source = inputs(load)
    url = f"http://{load.target}/v2/models/{load.model}/infer"
    connector = aiohttp.TCPConnector(limit=load.concurrency)
    timeout = aiohttp.ClientTimeout(total=load.timeout_s)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        cpu0, t_start = time.process_time(), time.perf_counter()
        t_stop = t_start + load.seconds

        async def caller() -> None:
            while time.perf_counter() < t_stop:
                body, head = binary_body(next(source))
                run.sent += 1
                t0 = time.perf_counter()
                try:
                    async with session.post(
                        url,
                        data=body,
                        headers={
                            "Inference-Header-Content-Length": str(head),
                            "Content-Type": "application/octet-stream",
                            "Inferpool-Timeout-Ms": str(int(load.timeout_s * 1000)),
                        },
                    ) as response:
                        data = await response.read()
                        if response.status != 200:
                            errors[str(response.status)] += 1
                            continue
                        length = int(response.headers["Inference-Header-Content-Length"])
                        answer = json.loads(data[:length])
                        run.cached += int(answer["parameters"].get("inferpool_cache_hits", 0))
                except (aiohttp.ClientError, TimeoutError) as exc:
                    errors[type(exc).__name__] += 1
                    continue
                latencies.append(time.perf_counter() - t0)

        await asyncio.gather(*(caller() for _ in range(load.concurrency)))
        run.elapsed_s = time.perf_counter() - t_start
        run.cpu_s = time.process_time() - cpu0
    run.ok, run.errors = len(latencies), dict(errors)
    run.lat_ms = np.asarray(latencies, dtype=np.float64) * 1000
    return run


def line(label: str, c: int, r: Run) -> str:
    errors = sum(r.errors.values())
    return f"| {label} | {c} | {r.rps:,.0f} | {r.p50_ms:.2f} | {r.p99_ms:.2f} | {r.cached} | {errors} |"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=10.0, help="per measured run (default 10)")
    parser.add_argument("--concurrency", default="1,64", help="comma-separated levels (default 1,64)")
    parser.add_argument("--workload", default="miss", help="miss, hit, mix or zipf (bench/loadgen.py)")
    parser.add_argument("--flower", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--out", type=Path, help="default bench/results/http/<date>-<commit>.json")
    args = parser.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]
    rows: list[dict[str, Any]] = []
    table: list[str] = []
    info = results.meta({"workload": args.workload, "seconds": args.seconds})

    def record(front: str, http_on: bool, c: int, r: Run) -> None:
        rows.append({"front": front, "http_server": http_on, "concurrency": c, **r.summary()})
        label = f"{front} (HTTP server {'on' if http_on else 'off'})"
        table.append(line(label, c, r))
        print(table[-1], flush=True)

    seed = int(time.time())
    with LocalStack(flower=args.flower) as stack:
        for c in levels:
            seed += 1000
            load = Load(
                stack.http_target, workload=args.workload, concurrency=c, seconds=args.seconds, seed=seed
            )
            record("http", True, c, asyncio.run(drive_http(load)))
            seed += 1000
            grpc_load = Load(
                stack.target, workload=args.workload, concurrency=c, seconds=args.seconds, seed=seed
            )
            record("grpc", True, c, run_grpc(grpc_load))
    with LocalStack(flower=args.flower, extra_env={"HTTP_PORT": "0"}) as stack:
        for c in levels:
            seed += 1000
            grpc_load = Load(
                stack.target, workload=args.workload, concurrency=c, seconds=args.seconds, seed=seed
            )
            record("grpc", False, c, run_grpc(grpc_load))

    on = {r["concurrency"]: r["rps"] for r in rows if r["front"] == "grpc" and r["http_server"]}
    off = {r["concurrency"]: r["rps"] for r in rows if r["front"] == "grpc" and not r["http_server"]}
    ratios = {c: on[c] / off[c] for c in levels if off.get(c)}
    print("\n| front | concurrency | req/s | p50 ms | p99 ms | cached | errors |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(table))
    for c, ratio in ratios.items():
        print(f"gRPC c={c}: with the HTTP server on, {ratio:.1%} of the throughput with it off")
    path = results.write("http", {"runs": rows, "grpc_on_over_off": ratios}, args.out, info)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
