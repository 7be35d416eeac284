"""`inferpool`: classify files and run bulk jobs from the shell.

    inferpool classify images.npy --model digits          # one Classify per item, JSON Lines out
    inferpool submit images.npy --model digits --wait --out results.jsonl
    inferpool job JOB_ID [--out results.npy]              # status, or results to a file
    inferpool watch JOB_ID                                # progress bar until the job ends
    inferpool cancel JOB_ID

Inputs are .npy arrays shaped [N, *model input shape] (a single image: N = 1).
Results go to JSON Lines (.jsonl: one object per item, in index order) or to .npy
(.npy: float32 probabilities [N, classes]; rows of failed items are NaN).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TextIO

import grpc
import numpy as np
from google.protobuf import descriptor
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message
from tqdm import tqdm

from inferpool.client import Client, Job, JobTimeout
from inferpool.jobs import TERMINAL, state_name
from inferpool.v1 import jobs_pb2


def _load(path: str) -> np.ndarray:
    array = np.load(path, allow_pickle=False)
    if array.ndim < 2:
        raise SystemExit(f"{path}: expected [N, *input shape], got shape {list(array.shape)}")
    return np.ascontiguousarray(array)


def _classes(classes: Iterable[Any]) -> list[dict[str, Any]]:
    return [{"index": c.index, "label": c.label, "score": round(c.score, 6)} for c in classes]


_INT64 = {
    descriptor.FieldDescriptor.TYPE_INT64,
    descriptor.FieldDescriptor.TYPE_UINT64,
    descriptor.FieldDescriptor.TYPE_SINT64,
    descriptor.FieldDescriptor.TYPE_FIXED64,
    descriptor.FieldDescriptor.TYPE_SFIXED64,
}


def _int64_as_numbers(message: Message, out: dict[str, Any]) -> dict[str, Any]:
    """Turns the 64-bit integers of MessageToDict's output back into numbers: the proto3
    JSON mapping writes them as strings (for JavaScript's sake), which a shell user piping
    to `jq '.counts.total > 0'` does not expect."""
    for field in message.DESCRIPTOR.fields:
        value = out.get(field.name)
        if value is None:
            continue
        repeated = field.is_repeated
        if field.type in _INT64:
            out[field.name] = [int(v) for v in value] if repeated else int(value)
        elif field.message_type is not None and not field.message_type.GetOptions().map_entry:
            items = getattr(message, field.name)
            for sub, sub_out in zip(items, value, strict=True) if repeated else [(items, value)]:
                if isinstance(sub_out, dict):  # well-known types (Timestamp) are strings
                    _int64_as_numbers(sub, sub_out)
    return out


def _status(job: jobs_pb2.Job) -> dict[str, Any]:
    out = MessageToDict(job, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    _int64_as_numbers(job, out)
    out["state"] = state_name(job.state)
    out.pop("results", None)
    out.pop("next_offset", None)
    return out


def _write_results(job: Job, total: int, out: Path) -> int:
    """Writes every result to `out` (.jsonl or .npy); returns how many items failed."""
    as_npy = out.suffix == ".npy"
    failed = 0
    probs: np.ndarray | None = None
    with tqdm(total=total, desc="results", unit="item", disable=None) as bar:
        sink: TextIO | None = None if as_npy else out.open("w")
        try:
            for r in job.results(include_scores=as_npy):
                failed += not r.ok
                if as_npy:
                    if probs is None:
                        probs = np.full((total, len(r.scores) or 1), np.nan, dtype=np.float32)
                    if r.ok:
                        probs[r.index] = r.scores
                else:
                    assert sink is not None
                    row = {"index": r.index, "ok": r.ok, "cached": r.cached, "classes": _classes(r.classes)}
                    if not r.ok:
                        row["error"] = r.error
                    sink.write(json.dumps(row) + "\n")
                bar.update(1)
        finally:
            if sink is not None:
                sink.close()
    if as_npy:
        np.save(out, probs if probs is not None else np.zeros((0, 0), dtype=np.float32))
    return failed


def _follow(job: Job, timeout_s: float | None) -> jobs_pb2.Job:
    """Shows a progress bar while the job runs; returns its final status."""
    bar: tqdm | None = None

    def update(status: jobs_pb2.Job) -> None:
        nonlocal bar
        if bar is None:
            # Made at the first status and started from its count: a bar from 0 would count
            # the items finished before this watch joined as done in the first instant
            # (a job joined at 27k items showed 2M items/s). The rate is this watch's own.
            bar = tqdm(
                desc=f"job {job.id[:8]}",
                unit="item",
                disable=None,
                initial=status.counts.done + status.counts.failed,
            )
        bar.total = status.counts.total or None
        bar.n = status.counts.done + status.counts.failed
        bar.set_postfix(
            state=state_name(status.state), cached=status.counts.cached, failed=status.counts.failed
        )
        bar.refresh()

    try:
        return job.wait(timeout_s=timeout_s, on_update=update)
    finally:
        if bar is not None:
            bar.close()


def cmd_classify(client: Client, args: argparse.Namespace) -> int:
    x = _load(args.file)
    out = open(args.out, "w") if args.out else sys.stdout  # noqa: SIM115 (stdout must stay open)
    failed = 0

    def one(i: int) -> dict[str, Any]:
        try:
            r = client.classify(
                x[i : i + 1], args.model, version=args.version, top_k=args.top_k, timeout_s=args.timeout_s
            )
        except grpc.RpcError as exc:
            return {"index": i, "ok": False, "error": f"{exc.code().name}: {exc.details()}"}
        return {"index": i, "ok": True, "cached": r.cached, "classes": _classes(r.classes)}

    pool = ThreadPoolExecutor(args.concurrency)
    try:
        with tqdm(total=len(x), unit="item", disable=None) as bar:
            # map() keeps index order while `concurrency` calls are in flight.
            for row in pool.map(one, range(len(x))):
                failed += not row["ok"]
                out.write(json.dumps(row) + "\n")
                bar.update(1)
    finally:
        # When the output fails (a reader that went away: `| head`), the calls not started
        # yet are dropped rather than run for nobody.
        pool.shutdown(cancel_futures=True)
        if out is not sys.stdout:
            out.close()
    return 1 if failed else 0


def cmd_submit(client: Client, args: argparse.Namespace) -> int:
    x = _load(args.file)
    with tqdm(total=len(x), desc="upload", unit="item", disable=None) as bar:
        job = client.submit(
            x,
            args.model,
            version=args.version,
            top_k=args.top_k,
            idempotency_key=args.idempotency_key,
            job_timeout_s=args.job_timeout_s,
            on_sent=bar.update,
        )
    print(job.id)
    if not (args.wait or args.out):
        return 0
    final = _follow(job, args.timeout_s)
    print(json.dumps(_status(final)), file=sys.stderr)
    if args.out:
        _write_results(job, final.counts.total, Path(args.out))
    return 0 if state_name(final.state) == "SUCCEEDED" else 1


def cmd_job(client: Client, args: argparse.Namespace) -> int:
    job = client.job(args.job_id)
    status = job.status()
    print(json.dumps(_status(status)))
    if args.out:
        _write_results(job, status.counts.total, Path(args.out))
    return 0


def cmd_watch(client: Client, args: argparse.Namespace) -> int:
    final = _follow(client.job(args.job_id), args.timeout_s)
    print(json.dumps(_status(final)))
    return 0 if state_name(final.state) in TERMINAL else 1


def cmd_cancel(client: Client, args: argparse.Namespace) -> int:
    print(json.dumps(_status(client.job(args.job_id).cancel())))
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="inferpool", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument(
        "--target",
        default=os.environ.get("INFERPOOL_TARGET", "127.0.0.1:50051"),
        help=(
            "API address; dns:///host:port or ipv4:a:port,b:port spreads calls over every replica "
            "(env INFERPOOL_TARGET)"
        ),
    )
    # The token's default comes from the environment so it stays out of shell history and `ps`.
    p.add_argument(
        "--token",
        default=os.environ.get("INFERPOOL_TOKEN") or None,
        help="bearer token sent with every call (env INFERPOOL_TOKEN)",
    )
    p.add_argument(
        "--tls-ca",
        default=os.environ.get("INFERPOOL_TLS_CA") or None,
        help="PEM CA file that verifies the API's certificate; turns TLS on (env INFERPOOL_TLS_CA)",
    )
    sub = p.add_subparsers(dest="command", required=True)

    def model_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("file", help=".npy array [N, *input shape]")
        sp.add_argument("--model", required=True)
        sp.add_argument("--version", type=int, default=0, help="0 = latest")
        sp.add_argument("--top-k", type=int, default=1)

    sp = sub.add_parser("classify", help="one Classify call per item; JSON Lines to stdout or --out")
    model_args(sp)
    sp.add_argument("--out", help="write JSON Lines here instead of stdout")
    sp.add_argument("--concurrency", type=int, default=16)
    sp.add_argument("--timeout-s", type=float, default=10.0, help="deadline of each call")
    sp.set_defaults(run=cmd_classify)

    sp = sub.add_parser("submit", help="upload a bulk job; prints its id")
    model_args(sp)
    sp.add_argument("--idempotency-key", default="", help="a retry with the same key returns the same job")
    sp.add_argument(
        "--job-timeout-s", type=float, default=0.0, help="bound on the job's run time (0: server TTL)"
    )
    sp.add_argument("--wait", action="store_true", help="follow the job until it ends")
    sp.add_argument("--out", help="wait, then write the results (.jsonl or .npy)")
    sp.add_argument("--timeout-s", type=float, default=None, help="how long --wait waits")
    sp.set_defaults(run=cmd_submit)

    sp = sub.add_parser("job", help="print a job's status; --out writes its results")
    sp.add_argument("job_id")
    sp.add_argument("--out", help="write the results (.jsonl or .npy)")
    sp.set_defaults(run=cmd_job)

    sp = sub.add_parser("watch", help="progress bar until the job ends")
    sp.add_argument("job_id")
    sp.add_argument("--timeout-s", type=float, default=None)
    sp.set_defaults(run=cmd_watch)

    sp = sub.add_parser("cancel", help="stop a job's remaining items")
    sp.add_argument("job_id")
    sp.set_defaults(run=cmd_cancel)
    return p


# A command whose reader went away exits as one killed by SIGPIPE does in a shell (128 + 13).
EXIT_BROKEN_PIPE = 141


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    roots = Path(args.tls_ca).read_bytes() if args.tls_ca else None
    try:
        with Client(args.target, token=args.token, root_certificates=roots) as client:
            try:
                code = args.run(client, args)
            except grpc.RpcError as exc:
                print(f"inferpool: {exc.code().name}: {exc.details()}", file=sys.stderr)
                code = 2
            except JobTimeout as exc:  # --timeout-s passed: the job goes on, the command ends
                print(f"inferpool: {exc}", file=sys.stderr)
                code = 1
        # Flushed here, so that a reader gone by now is seen here too, not at exit.
        sys.stdout.flush()
    except BrokenPipeError:
        # `inferpool classify ... | head -1`: stop quietly, as Unix tools do. Python
        # flushes stdout again at exit; pointed at devnull, that flush cannot fail too.
        # (Not SIG_DFL for SIGPIPE: a write to a closed socket would then kill the process.)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        code = EXIT_BROKEN_PIPE
    sys.exit(code)


if __name__ == "__main__":
    main()
