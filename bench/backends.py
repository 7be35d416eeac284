"""The backends side by side: the digits model as torchscript, torch_export and
onnxruntime (same weights), in one run.

- model alone (no RPC, no queue; this process, workers/runtime.py's ModelRunner): items/s
  per backend, per form the backend compiles (frozen / optimized, exported /
  aot_inductor, onnxruntime), per batch size and precision; the form the runner's
  warm-up picks for each size, and the fastest backend and form per batch size;
- the stack (`--stack`, CPU only): a worker serving the three models behind the API;
  per backend the miss@1 p50 latency (one caller) and miss@64 throughput (64 callers).

    python -m bench.backends [--seconds 1] [--batch-sizes 1,8,64] [--precisions fp32]
        [--device cpu|cuda] [--aoti] [--no-stack]

Writes bench/results/backends/<date>-<commit>.json (or --out) and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

# Not bench.stack's: the model-alone part runs where only torch and numpy are (a GPU box).
ROOT = Path(__file__).resolve().parent.parent

MODELS = {"torchscript": "digits", "torch_export": "digits_export", "onnxruntime": "digits_onnx"}


def variant_copies(
    models_dir: Path, root: Path, precision: str, max_batch: int, aoti: bool
) -> dict[str, Path]:
    """Copies of the three models at `precision`, taking batches up to `max_batch`."""
    folders = {}
    for backend, name in MODELS.items():
        folder = root / f"{name}_{precision}" / "1"
        shutil.copytree(models_dir / name / "1", folder)
        config = json.loads((folder / "config.json").read_text())
        config.update(name=folder.parent.name, precision=precision, max_batch_size=max(max_batch, 1))
        if aoti and backend == "torch_export":
            config["backend_options"] = {"aot_inductor": True}
        (folder / "config.json").write_text(json.dumps(config))
        folders[backend] = folder
    return folders


def rate(run: Any, x: np.ndarray, seconds: float, repeats: int) -> float:
    run(x)
    timings = []
    for _ in range(repeats):
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            run(x)
            n += len(x)
        timings.append(n / (time.perf_counter() - t0))
    return statistics.median(timings)


def model_alone(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from inferpool.repository import ModelConfig
    from inferpool.workers.backends import LoadOptions, ModelLoadError
    from inferpool.workers.runtime import ModelRunner, configure_threads, pick_device

    threads = configure_threads(args.torch_threads)
    device = pick_device(args.device)
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    table: dict[str, Any] = {}
    for precision in args.precisions.split(","):
        folders = variant_copies(args.models_dir, work / precision, precision, max(sizes), args.aoti)
        for backend, folder in folders.items():
            key = f"{backend}/{precision}"
            t0 = time.perf_counter()
            try:
                runner = ModelRunner(
                    ModelConfig.from_file(folder), device, LoadOptions(work / "cache", threads)
                )
                runner.warm_up()
            except Exception as exc:  # one backend failing leaves the others' figures
                if not isinstance(exc, ModelLoadError):
                    exc = RuntimeError(f"{type(exc).__name__}: {exc}")
                table[key] = {"error": str(exc)[:300]}
                print(f"{key}: {exc}")
                continue
            row: dict[str, Any] = {"load_and_warm_up_s": time.perf_counter() - t0, "forms": {}, "picked": {}}
            for n in sizes:
                x = np.random.default_rng(n).random((n, 1, 28, 28), dtype=np.float32)
                for variant in runner.variants:
                    row["forms"].setdefault(variant.name, {})[str(n)] = rate(
                        variant.run, x, args.seconds, args.repeats
                    )
                row["picked"][str(n)] = runner.variant_for(n)
            table[key] = row
            print(
                f"{key}: "
                + ", ".join(
                    f"{f} {json.dumps({b: round(v) for b, v in r.items()})}" for f, r in row["forms"].items()
                )
            )
    fastest = {}
    for n in sizes:
        best = max(
            (
                (key, form, by[str(n)])
                for key, row in table.items()
                for form, by in row.get("forms", {}).items()
            ),
            key=lambda t: t[2],
            default=None,
        )
        if best:
            fastest[str(n)] = {"backend": best[0], "form": best[1], "items_per_s": best[2]}
    return {"device": str(device), "threads": threads, "by_backend": table, "fastest": fastest}


def stack(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from bench import loadgen
    from bench.coldstart import Servers, start_worker, stop_worker
    from inferpool.client import Client
    from inferpool.repository import Repository

    repository = ROOT / "models"
    for name in MODELS.values():  # the load generator's input shapes, from the configs
        loadgen.SHAPES.setdefault(name, Repository.load(repository).resolve(name).input_shape)
    servers = Servers(repository, work)
    ready = work / "ready"
    proc = start_worker(servers, repository, work / "cache", ready, work / "worker.log")
    rows: dict[str, Any] = {}
    try:
        deadline = time.monotonic() + 180
        while not ready.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"the worker did not get ready: {(work / 'worker.log').read_text()[-2000:]}"
                )
            time.sleep(0.05)
        with Client(servers.target) as client:
            client.wait_ready(30)
        for seed, (backend, name) in enumerate(MODELS.items(), start=1):
            one = loadgen.run(
                loadgen.Load(servers.target, model=name, concurrency=1, seconds=args.seconds, seed=seed)
            )
            many = loadgen.run(
                loadgen.Load(
                    servers.target, model=name, concurrency=64, seconds=args.seconds, seed=100 + seed
                )
            )
            rows[backend] = {
                "miss1_p50_ms": one.p50_ms,
                "miss1_requests": one.ok,
                "miss64_rps": many.rps,
                "miss64_p50_ms": many.p50_ms,
                "errors": {**one.errors, **many.errors},
            }
            print(f"stack {backend}: miss@1 p50 {one.p50_ms:.2f} ms, miss@64 {many.rps:.0f}/s")
    finally:
        stop_worker(proc)
        servers.stop()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--seconds", type=float, default=1.0, help="per timing (model alone) and per stack phase"
    )
    parser.add_argument("--repeats", type=int, default=3, help="model-alone timings per cell (median)")
    parser.add_argument("--batch-sizes", default="1,8,64")
    parser.add_argument("--precisions", default="fp32", help="comma-separated of fp32,fp16,bf16")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--torch-threads", type=int, default=0, help="0 = the worker's rule")
    parser.add_argument("--aoti", action="store_true", help="also build torch_export's AOTInductor form")
    parser.add_argument("--stack", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--models-dir", type=Path, default=ROOT / "models", help="holding the three models")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    data: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}}
    with tempfile.TemporaryDirectory(prefix="inferpool-backends-") as tmp:
        data["model_alone"] = model_alone(args, Path(tmp))
        if args.stack:
            data["stack"] = stack(args, Path(tmp))
    alone = data["model_alone"]
    sizes = args.batch_sizes.split(",")
    print(f"\nmodel alone on {alone['device']}, items/s (form the runner picks per batch size):")
    print(f"{'backend/precision':24s}" + "".join(f"{'batch ' + n:>26s}" for n in sizes))
    for key, row in alone["by_backend"].items():
        if "error" in row:
            print(f"{key:24s}  {row['error'][:90]}")
            continue
        cells = [f"{row['forms'][row['picked'][n]][n]:>10.0f} ({row['picked'][n]})" for n in sizes]
        print(f"{key:24s}" + "".join(f"{c:>26s}" for c in cells))
    print(
        "fastest: "
        + ", ".join(
            f"batch {n}: {f['backend']} {f['form']} {f['items_per_s']:.0f}/s"
            for n, f in alone["fastest"].items()
        )
    )
    if "stack" in data:
        print(f"\n{'stack':24s}{'miss@1 p50 ms':>16s}{'miss@64 items/s':>18s}")
        for backend, row in data["stack"].items():
            print(f"{backend:24s}{row['miss1_p50_ms']:>16.2f}{row['miss64_rps']:>18.0f}")
    try:
        from bench import results
    except Exception:  # no gRPC stack where only the model runs: plain JSON
        out = args.out or ROOT / "bench" / "results" / "backends" / "backends.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"meta": machine_meta(), **data}, indent=2, default=str) + "\n")
        print(f"\nwrote {out}")
        return
    print(f"\nwrote {results.write('backends', data, args.out, results.meta(machine_meta()))}")


def machine_meta() -> dict[str, Any]:
    import platform

    import torch

    meta: dict[str, Any] = {"torch": torch.__version__, "python": platform.python_version()}
    if torch.cuda.is_available():
        meta["gpu"] = torch.cuda.get_device_name(0)
        meta["cuda"] = torch.version.cuda
    try:
        import onnxruntime

        meta["onnxruntime"] = onnxruntime.__version__
        meta["onnxruntime_providers"] = onnxruntime.get_available_providers()
    except ImportError:
        pass
    return meta


if __name__ == "__main__":
    main()
