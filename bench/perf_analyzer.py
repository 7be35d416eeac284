"""Triton's perf_analyzer against a local stack, over the KServe v2 / Triton gRPC front
(or, with `--protocol http`, its REST front: `perf_analyzer -i http`).

`python -m bench.perf_analyzer` starts bench.stack.LocalStack (redis, memcached, a worker,
the API and Flower, as `make up` does; `--no-flower` leaves Flower out), then runs the
unmodified perf_analyzer once per path and concurrency level:

- hit:  `--input-data zero`: the same all-zero image every time, so after the first
        request every row is a cache hit. (perf_analyzer's default, `random`, fills FP32
        tensors with random bytes: some are NaN or Inf, which inferpool rejects.)
- miss: a JSON data file of distinct random images per level (perf_analyzer cycles through
        its steps), and count windows sized so that a run sends fewer requests than there
        are images: (nearly) every row is computed by the worker.

Each run is bounded (`--max-trials`, a subprocess timeout). The hit ratio of every run is
measured, not assumed: Triton ModelStatistics (cache_hit / cache_miss counts) before and
after. Prints a table, writes the JSON under bench/results/perf_analyzer/.

perf_analyzer ships as a binary in the tritonclient wheel (x86-64 Linux; `.venv/bin/`)
and links two libraries the wheel does not carry: libb64.so.0d (Debian/Ubuntu package
`libb64-0d`) and libcudart.so.12, loaded even without a GPU (PyPI
`nvidia-cuda-runtime-cu12`; found automatically when installed in this interpreter's
environment, else pass its lib directory with --lib-dir).
"""

from __future__ import annotations

import argparse
import base64
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench import results
from bench.stack import ROOT, LocalStack

MODEL = "digits"
INPUT = "image"
SHAPE = (1, 28, 28)  # one row, without the batch dimension (perf_analyzer adds -b)

MISSING_HELP = {
    "libb64.so.0d": "install the Debian/Ubuntu package libb64-0d (apt-get install libb64-0d)",
    "libcudart.so.12": (
        "pip install nvidia-cuda-runtime-cu12 (into this environment, where it is found "
        "automatically; or anywhere, then pass --lib-dir .../nvidia/cuda_runtime/lib). "
        "No GPU is needed: perf_analyzer only links it"
    ),
}


class Unavailable(RuntimeError):
    """perf_analyzer cannot run here; the message says how to fix it."""


def find_binary(explicit: str | None) -> Path:
    if explicit:
        path = Path(explicit)
    else:
        found = shutil.which(
            "perf_analyzer", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
        )
        if found is None:
            raise Unavailable(
                "perf_analyzer not found. It ships in the tritonclient wheel for x86-64 Linux "
                "(pip install 'tritonclient[grpc]', part of this project's dev extra: it lands "
                "next to python in the venv's bin/), or pass --perf-analyzer PATH."
            )
        path = Path(found)
    if not os.access(path, os.X_OK):
        raise Unavailable(f"{path} is not an executable file")
    return path


def cudart_dirs() -> list[Path]:
    """lib dirs of nvidia-cuda-runtime-cu12 installed in this interpreter's environment."""
    return [
        Path(entry) / "nvidia" / "cuda_runtime" / "lib"
        for entry in sys.path
        if entry and (Path(entry) / "nvidia" / "cuda_runtime" / "lib" / "libcudart.so.12").exists()
    ]


def library_env(binary: Path, lib_dirs: list[str]) -> dict[str, str]:
    """The environment perf_analyzer runs in; Unavailable when ldd still misses a library."""
    dirs = [*lib_dirs, *map(str, cudart_dirs())]
    env = dict(os.environ)
    if dirs:
        env["LD_LIBRARY_PATH"] = os.pathsep.join([*dirs, *filter(None, [env.get("LD_LIBRARY_PATH")])])
    if shutil.which("ldd") is None:
        return env  # cannot check ahead; a failing run reports the loader's error
    ldd = subprocess.run(["ldd", str(binary)], env=env, capture_output=True, text=True, timeout=30)
    missing = [line.split()[0] for line in ldd.stdout.splitlines() if "not found" in line]
    if missing:
        hints = "\n".join(f"  {lib}: {MISSING_HELP.get(lib, 'install it')}" for lib in missing)
        raise Unavailable(f"{binary} cannot load {', '.join(missing)}:\n{hints}")
    return env


def distinct_inputs(path: Path, count: int, seed: int) -> None:
    """A perf_analyzer JSON data file of `count` distinct random images (one per step)."""
    images = np.random.default_rng(seed).random((count, *SHAPE), dtype=np.float32).astype("<f4")
    steps = [{INPUT: {"b64": base64.b64encode(image.tobytes()).decode()}} for image in images]
    path.write_text(json.dumps({"data": steps}))


def model_stats(target: str, protocol: str = "grpc") -> dict[str, int]:
    """Cumulative cache hits / misses / successful requests for the model, via Triton's
    ModelStatistics. tritonclient is imported here only: it must not share a process with
    inferpool.triton (the same `inference.*` protobuf symbols), which this module never loads.
    Each front keeps its own statistics: ask the one perf_analyzer drives."""
    if protocol == "http":
        import tritonclient.http as triton_http

        with triton_http.InferenceServerClient(target) as http_client:
            (doc,) = http_client.get_inference_statistics(MODEL)["model_stats"]
        stats = doc.get("inference_stats", {})

        def n(name: str) -> int:  # protobuf's JSON: uint64 as strings, zeros left out
            return int(stats.get(name, {}).get("count", 0))

        return {"hits": n("cache_hit"), "misses": n("cache_miss"), "requests": n("success")}
    import tritonclient.grpc as triton

    with triton.InferenceServerClient(target) as client:
        (stats,) = client.get_inference_statistics(MODEL).model_stats
    infer = stats.inference_stats
    return {"hits": infer.cache_hit.count, "misses": infer.cache_miss.count, "requests": infer.success.count}


def _is_number(text: str | None) -> bool:
    try:
        float(text or "")
    except ValueError:
        return False
    return True


def parse_csv(path: Path) -> dict[str, Any]:
    with path.open() as fh:
        rows = [row for row in csv.DictReader(fh) if row.get("Concurrency", "").strip().isdigit()]
    if len(rows) != 1:
        raise RuntimeError(f"expected one result row in {path}, got {len(rows)}")
    row = rows[0]
    us = {key.strip(): float(value) for key, value in row.items() if key and _is_number(value)}
    return {
        "concurrency": int(row["Concurrency"]),
        "infer_per_s": us["Inferences/Second"],
        "p50_ms": us["p50 latency"] / 1000,
        "p90_ms": us["p90 latency"] / 1000,
        "p99_ms": us["p99 latency"] / 1000,
        "avg_ms": us["Avg latency"] / 1000,
    }


def run_one(
    binary: Path,
    env: dict[str, str],
    target: str,
    path: str,
    concurrency: int,
    args: argparse.Namespace,
    workdir: Path,
) -> dict[str, Any]:
    out = workdir / f"{path}-{concurrency}.csv"
    command = [
        str(binary),
        "-m",
        MODEL,
        "-u",
        target,
        "-i",
        args.protocol,
        "-b",
        "1",
        "--concurrency-range",
        f"{concurrency}:{concurrency}",
        "--max-trials",
        str(args.max_trials),
        "--stability-percentage",
        str(args.stability),
        "-f",
        str(out),
        "--verbose-csv",
    ]
    if path == "hit":
        command += ["--input-data", "zero", "--measurement-interval", str(args.interval_ms)]
    else:
        data = workdir / f"inputs-{concurrency}.json"
        distinct_inputs(data, args.distinct, seed=concurrency * 7919 + int(time.time()))
        # Every window holds >= this many requests; a run takes at most max_trials windows.
        per_window = max(50, args.distinct // (args.max_trials + 2))
        command += [
            "--input-data",
            str(data),
            "--measurement-mode",
            "count_windows",
            "--measurement-request-count",
            str(per_window),
        ]
    before = model_stats(target, args.protocol)
    t0 = time.monotonic()
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=args.run_timeout_s)
    wall_s = time.monotonic() - t0
    after = model_stats(target, args.protocol)
    if done.returncode != 0 or not out.exists():
        raise RuntimeError(f"perf_analyzer exited {done.returncode}:\n{(done.stdout + done.stderr)[-3000:]}")
    rows = after["hits"] + after["misses"] - before["hits"] - before["misses"]
    result = parse_csv(out)
    result.update(
        path=path,
        wall_s=round(wall_s, 1),
        rows=rows,
        hit_ratio=round((after["hits"] - before["hits"]) / rows, 4) if rows else None,
        command=" ".join(command[:1] + [a if a != target else "$TARGET" for a in command[1:]]),
    )
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--concurrency", default="1,4,16", help="comma-separated levels (default 1,4,16)")
    parser.add_argument("--paths", default="hit,miss", help="hit, miss or both (default hit,miss)")
    parser.add_argument("--interval-ms", type=int, default=2000, help="hit path time window (default 2000)")
    parser.add_argument("--distinct", type=int, default=4000, help="miss path: distinct images per level")
    parser.add_argument("--max-trials", type=int, default=6, help="windows per level at most (default 6)")
    parser.add_argument(
        "--stability",
        type=int,
        default=30,
        help="max/min %% of the last 3 windows counted as stable (default 30)",
    )
    parser.add_argument("--run-timeout-s", type=float, default=120, help="bound on one perf_analyzer run")
    parser.add_argument("--perf-analyzer", help="the binary (default: from the venv's bin/, then PATH)")
    parser.add_argument("--lib-dir", action="append", default=[], help="extra LD_LIBRARY_PATH directory")
    parser.add_argument("--flower", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--protocol", choices=("grpc", "http"), default="grpc", help="perf_analyzer -i")
    parser.add_argument("--out", type=Path, help="default bench/results/perf_analyzer/<date>-<commit>.json")
    args = parser.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]
    paths = [p.strip() for p in args.paths.split(",")]
    if any(p not in ("hit", "miss") for p in paths):
        parser.error("--paths takes hit and/or miss")

    try:
        binary = find_binary(args.perf_analyzer)
        env = library_env(binary, args.lib_dir)
    except Unavailable as exc:
        print(f"perf_analyzer is not available: {exc}", file=sys.stderr)
        return 2

    runs: list[dict[str, Any]] = []
    info = results.meta({"flower": args.flower, "protocol": args.protocol})
    with LocalStack(flower=args.flower) as stack, tempfile.TemporaryDirectory() as tmp:
        for path in paths:
            for concurrency in levels:
                result = run_one(
                    binary,
                    env,
                    stack.http_target if args.protocol == "http" else stack.target,
                    path,
                    concurrency,
                    args,
                    Path(tmp),
                )
                runs.append(result)
                print(
                    f"{path:4} c={concurrency:<3} {result['infer_per_s']:8.0f} infer/s  "
                    f"p50 {result['p50_ms']:.2f} ms  p99 {result['p99_ms']:.2f} ms  "
                    f"hits {result['hit_ratio']:.1%}  ({result['wall_s']} s)",
                    flush=True,
                )

    print("\n| path | concurrency | infer/s | p50 ms | p90 ms | p99 ms | rows from cache |")
    print("|---|---|---|---|---|---|---|")
    for r in runs:
        print(
            f"| {r['path']} | {r['concurrency']} | {r['infer_per_s']:,.0f} | {r['p50_ms']:.2f} | "
            f"{r['p90_ms']:.2f} | {r['p99_ms']:.2f} | {r['hit_ratio']:.1%} |"
        )
    data = {
        "tool": f"perf_analyzer ({binary})",
        "model": MODEL,
        "note": "one run per path and level against bench.stack.LocalStack on loopback",
        "results": runs,
    }
    out = results.write("perf_analyzer", data, args.out, info)
    print(f"\nwrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
