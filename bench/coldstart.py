"""Cold start per backend: from `python -m inferpool.workers.main` to the first answered request.

For each backend (the digits model as torchscript, torch_export, torch_export with its
AOTInductor build, onnxruntime) a worker serving only that model is started `--repeats`
times against a running Redis, Memcached and API, with one Classify already waiting
for it (the API queued it just before the worker started). Measured, median of the
repeats:

- start -> ready file (models loaded and warmed up, consumer running) and start ->
  first answer, without the compiled-form cache (a fresh empty folder each start) and
  with it (a folder a previous start filled);
- scale from zero: `--queued` Classify calls queued while no worker runs (KEDA's
  minReplicaCount 0 with an activation threshold), then one worker starts: start ->
  first answer and -> last answer.

    python -m bench.coldstart [--repeats 5] [--backends torchscript,onnxruntime] [--queued 32]

Writes bench/results/coldstart/<date>-<commit>.json and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from bench import results
from bench.stack import ROOT, free_port, wait_port
from inferpool.client import Client

# Backend -> (source model folder, extra config): each runs as its own model name.
BACKENDS: dict[str, tuple[str, dict[str, Any]]] = {
    "torchscript": ("digits", {}),
    "torch_export": ("digits_export", {}),
    "torch_export_aoti": ("digits_export", {"backend_options": {"aot_inductor": True}}),
    "onnxruntime": ("digits_onnx", {}),
}
SECRET = "inferpool-bench-coldstart"


def model_name(backend: str) -> str:
    return f"cold_{backend}"


def make_repository(root: Path, backends: list[str]) -> Path:
    for backend in backends:
        source, extra = BACKENDS[backend]
        folder = root / model_name(backend) / "1"
        shutil.copytree(ROOT / "models" / source / "1", folder)
        config = json.loads((folder / "config.json").read_text())
        config.update(name=model_name(backend), **extra)
        (folder / "config.json").write_text(json.dumps(config))
    return root


class Servers:
    """Redis, Memcached and the API on free loopback ports, for the whole run."""

    def __init__(self, repository: Path, logdir: Path) -> None:
        self.redis_port, self.memcached_port, self.grpc_port = free_port(), free_port(), free_port()
        self.env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "INFERPOOL_REDIS_URL": f"redis://127.0.0.1:{self.redis_port}/0",
            "INFERPOOL_MEMCACHED": f"127.0.0.1:{self.memcached_port}",
            "INFERPOOL_CACHE_KEY_SECRET": SECRET,
            "INFERPOOL_MODEL_REPOSITORY": str(repository),
            "INFERPOOL_GRPC_PORT": str(self.grpc_port),
        }
        user = ["--user=nobody"] if os.geteuid() == 0 else []
        self.procs = [
            self._start(
                ["redis-server", "--bind", "127.0.0.1", "--port", str(self.redis_port), "--save", ""], logdir
            ),
            self._start(
                ["memcached", "--listen=127.0.0.1", f"--port={self.memcached_port}", "--udp-port=0", *user],
                logdir,
            ),
        ]
        wait_port(self.redis_port, 10, self.procs[0])
        wait_port(self.memcached_port, 10, self.procs[1])
        self.procs.append(self._start([sys.executable, "-m", "inferpool.api"], logdir))
        wait_port(self.grpc_port, 60, self.procs[2])
        self.target = f"127.0.0.1:{self.grpc_port}"

    def _start(self, args: list[str], logdir: Path) -> subprocess.Popen[bytes]:
        log = (logdir / f"{Path(args[0]).name}-{len(getattr(self, 'procs', []))}.log").open("wb")
        return subprocess.Popen(args, env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def start_worker(
    servers: Servers, repository: Path, cache_dir: Path, ready: Path, log: Path
) -> subprocess.Popen[bytes]:
    env = {
        **servers.env,
        "INFERPOOL_MODEL_REPOSITORY": str(repository),
        "INFERPOOL_COMPILED_CACHE_DIR": str(cache_dir),
        "INFERPOOL_READY_FILE": str(ready),
    }
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "inferpool.workers.main",
            f"--hostname=cold-{os.getpid()}-{time.monotonic_ns()}@localhost",
        ],
        env=env,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )


def stop_worker(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def one_start(
    servers: Servers,
    client: Client,
    backend: str,
    repository: Path,
    cache_dir: Path,
    logdir: Path,
    queued: int,
    timeout_s: float,
) -> dict[str, float]:
    """Queues `queued` Classify calls (unique inputs), starts a worker, and times from the
    start to the ready file, the first answer and the last."""
    model = model_name(backend)
    ready = logdir / f"ready-{backend}"
    ready.unlink(missing_ok=True)
    rng = np.random.default_rng(time.monotonic_ns())
    futures = [
        client.classify_future(rng.random((1, 1, 28, 28), dtype=np.float32), model, timeout_s=timeout_s)
        for _ in range(queued)
    ]
    time.sleep(0.2)  # the API publishes them before the worker exists (no ordering: a bound)
    t0 = time.perf_counter()
    proc = start_worker(servers, repository, cache_dir, ready, logdir / f"worker-{backend}.log")
    answered: list[float] = []
    ready_s = float("nan")
    try:
        with ThreadPoolExecutor(len(futures)) as pool:
            done = pool.map(lambda f: (f.result(), time.perf_counter() - t0)[1], futures)
            deadline = time.monotonic() + timeout_s
            while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.01)
            ready_s = time.perf_counter() - t0 if ready.exists() else float("nan")
            answered = sorted(done)
    finally:
        stop_worker(proc)
    return {"ready_s": ready_s, "first_answer_s": answered[0], "last_answer_s": answered[-1]}


def measure(args: argparse.Namespace, servers: Servers, work: Path, backend: str) -> dict[str, Any]:
    repository = make_repository(work / f"repo-{backend}", [backend])
    row: dict[str, Any] = {}
    with Client(servers.target) as client:
        client.wait_ready(30)
        cold = []
        for i in range(args.repeats):
            cold.append(
                one_start(
                    servers,
                    client,
                    backend,
                    repository,
                    work / f"empty-{backend}-{i}",
                    work,
                    1,
                    args.timeout_s,
                )
            )
        warm_cache = work / f"cache-{backend}"
        one_start(servers, client, backend, repository, warm_cache, work, 1, args.timeout_s)  # fills it
        cached = [
            one_start(servers, client, backend, repository, warm_cache, work, 1, args.timeout_s)
            for _ in range(args.repeats)
        ]
        queued = [
            one_start(servers, client, backend, repository, warm_cache, work, args.queued, args.timeout_s)
            for _ in range(max(1, args.repeats // 2))
        ]
    for name, runs in (("no_cache", cold), ("cache", cached), ("scale_from_zero", queued)):
        row[name] = {key: statistics.median(r[key] for r in runs) for key in runs[0]} | {"runs": runs}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5, help="starts per backend and case (median)")
    parser.add_argument(
        "--backends", default=",".join(BACKENDS), help=f"comma-separated, of {list(BACKENDS)}"
    )
    parser.add_argument("--queued", type=int, default=32, help="calls waiting when a worker starts from zero")
    parser.add_argument("--timeout-s", type=float, default=180.0, help="bound on one start's first answer")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    backends = [b for b in args.backends.split(",") if b]
    unknown = set(backends) - set(BACKENDS)
    if unknown:
        parser.error(f"unknown backends {sorted(unknown)}")
    table: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="inferpool-coldstart-") as tmp:
        work = Path(tmp)
        servers = Servers(make_repository(work / "api-repo", backends), work)
        try:
            for backend in backends:
                table[backend] = measure(args, servers, work, backend)
                medians = {
                    k: {m: round(v, 3) for m, v in r.items() if m != "runs"}
                    for k, r in table[backend].items()
                }
                print(f"{backend}: {json.dumps(medians)}")
        finally:
            servers.stop()
    print(
        "\nbackend             no cache: ready / first     cache: ready / first     from zero: first / last"
    )
    for backend, row in table.items():
        nc, c, z = row["no_cache"], row["cache"], row["scale_from_zero"]
        print(
            f"{backend:18s}  {nc['ready_s']:8.2f} / {nc['first_answer_s']:6.2f} s   "
            f"{c['ready_s']:8.2f} / {c['first_answer_s']:6.2f} s   "
            f"{z['first_answer_s']:8.2f} / {z['last_answer_s']:6.2f} s"
        )
    data = {"repeats": args.repeats, "queued": args.queued, "backends": table}
    print(f"\nwrote {results.write('coldstart', data, args.out)}")


if __name__ == "__main__":
    main()
