"""The `inferpool` CLI as a user runs it (a subprocess against the session stack), and
the asyncio client's job calls."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import pty
import queue
import re
import select
import struct
import subprocess
import sys
import termios
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis

from inferpool import tensor
from inferpool.cli import EXIT_BROKEN_PIPE
from inferpool.client import AsyncClient, Client, JobTimeout
from inferpool.names import job_idempotency_key
from inferpool.v1 import jobs_pb2
from tests.servers import ApiThread


def argv(api: ApiThread, *args: str) -> list[str]:
    return [sys.executable, "-m", "inferpool.cli", "--target", api.target, *args]


def cli(api: ApiThread, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv(api, *args),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_submit_wait_and_write_results(
    api: ApiThread, heldout: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    x, y = heldout
    np.save(tmp_path / "digits.npy", x)
    out = tmp_path / "results.jsonl"
    run = cli(
        api, "submit", str(tmp_path / "digits.npy"), "--model", "digits", "--top-k", "3", "--out", str(out)
    )
    assert run.returncode == 0, run.stderr
    job_id = run.stdout.strip()
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(len(x)))
    assert all(r["ok"] and len(r["classes"]) == 3 for r in rows)
    accuracy = np.mean([r["classes"][0]["index"] == label for r, label in zip(rows, y, strict=True)])
    assert accuracy >= 0.95

    run = cli(api, "job", job_id, "--out", str(tmp_path / "probs.npy"))
    assert run.returncode == 0, run.stderr
    status = json.loads(run.stdout)
    assert status["state"] == "SUCCEEDED" and status["counts"]["done"] == len(x)
    probs = np.load(tmp_path / "probs.npy")
    assert probs.shape == (len(x), 10)
    assert (probs.argmax(axis=1) == [r["classes"][0]["index"] for r in rows]).all()

    run = cli(api, "watch", job_id)
    assert run.returncode == 0 and json.loads(run.stdout)["state"] == "SUCCEEDED"


def test_classify_file_and_errors(
    api: ApiThread, heldout: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    x, y = heldout
    np.save(tmp_path / "some.npy", x[:20])
    run = cli(api, "classify", str(tmp_path / "some.npy"), "--model", "digits")
    assert run.returncode == 0, run.stderr
    rows = [json.loads(line) for line in run.stdout.splitlines()]
    assert [r["index"] for r in rows] == list(range(20))
    assert sum(r["classes"][0]["index"] == label for r, label in zip(rows, y[:20], strict=True)) >= 19

    run = cli(api, "job", "0" * 32)
    assert run.returncode == 2 and "NOT_FOUND" in run.stderr
    run = cli(api, "cancel", "x" * 5000)
    assert run.returncode == 2 and "INVALID_ARGUMENT: job_id must be 32 lowercase hex digits" in run.stderr
    assert len(run.stderr) < 200  # the id is not echoed whole


def test_submit_wait_prints_counts_as_numbers(
    api: ApiThread, heldout: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    x, _ = heldout
    np.save(tmp_path / "some.npy", x[:30])
    run = cli(api, "submit", str(tmp_path / "some.npy"), "--model", "digits", "--wait")
    assert run.returncode == 0, run.stderr
    status = json.loads(run.stderr.splitlines()[-1])
    assert status["job_id"] == run.stdout.strip()
    # Numbers, not the proto3 JSON mapping's strings for 64-bit integers.
    assert status["counts"] == {"total": 30, "done": 30, "failed": 0, "cached": status["counts"]["cached"]}
    assert isinstance(status["counts"]["cached"], int) and isinstance(status["version"], int)


def test_a_wait_that_times_out_says_so_without_a_traceback(
    api: ApiThread, heldout: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    x, _ = heldout
    np.save(tmp_path / "some.npy", x[:5])
    # A zero wait has always passed when the watch starts, however fast the job is.
    run = cli(api, "submit", str(tmp_path / "some.npy"), "--model", "digits", "--wait", "--timeout-s", "0")
    assert run.returncode == 1, run.stderr
    assert len(run.stdout.strip()) == 32  # the job id, for a later `inferpool watch`
    assert run.stderr.strip() == "inferpool: no status of the job came within 0 s", run.stderr


def test_a_reader_that_stops_early_ends_the_cli_quietly(
    api: ApiThread, heldout: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    """`inferpool classify ... | head -1`. The pipe holds one page and the output is far
    larger, so the CLI is still writing when the reader goes, however fast either side is."""
    x, _ = heldout
    np.save(tmp_path / "all.npy", x)  # top 10 classes: ~500 bytes a line, ~180 KB in all
    read_fd, write_fd = os.pipe()
    fcntl.fcntl(write_fd, fcntl.F_SETPIPE_SZ, 4096)
    proc = subprocess.Popen(
        argv(api, "classify", str(tmp_path / "all.npy"), "--model", "digits", "--top-k", "10"),
        stdout=write_fd,
        stderr=subprocess.PIPE,
        text=True,
    )
    os.close(write_fd)
    try:
        first = b""
        while not first.endswith(b"\n"):
            # Byte by byte, so that nothing past the first line leaves the pipe.
            ready, _, _ = select.select([read_fd], [], [], 60)
            chunk = os.read(read_fd, 1) if ready else b""
            assert chunk, f"no complete first line: {first!r}"
            first += chunk
    finally:
        os.close(read_fd)
    _, stderr = proc.communicate(timeout=60)
    assert json.loads(first)["index"] == 0
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr, stderr
    assert proc.returncode == EXIT_BROKEN_PIPE


def _renders(text: str) -> list[str]:
    """The lines a progress bar drew on a terminal (each redraw starts with a CR)."""
    return [part for part in re.split(r"[\r\n]+", text) if part.strip()]


def _watch_the_open_job(
    api: ApiThread,
    client: Client,
    redis_client: redis.Redis,
    key: str,
    chunk: int,
    outbox: queue.Queue[jobs_pb2.SubmitJobRequest | None],
) -> tuple[str, list[str]]:
    """Waits for the open upload's first chunk to finish, runs `inferpool watch` on a
    terminal until its bar shows the job RUNNING, then ends the upload; returns the
    watch's stdout and the RUNNING renders."""
    deadline = time.monotonic() + 60
    job_id = None
    while job_id is None or client.job(job_id).status().counts.done < chunk:
        assert time.monotonic() < deadline, "the first chunk did not finish"
        raw = redis_client.get(job_idempotency_key("", key))
        job_id = raw.decode() if isinstance(raw, bytes) else None
        time.sleep(0.05)  # polling the job's state, not ordering

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 200, 0, 0))
    watch = subprocess.Popen(
        argv(api, "watch", job_id, "--timeout-s", "60"), stdout=subprocess.PIPE, stderr=follower, text=True
    )
    os.close(follower)
    screen = ""
    try:
        while not any("state=RUNNING" in r for r in _renders(screen)):
            ready, _, _ = select.select([leader], [], [], 60)
            assert ready, f"no progress bar drawn: {screen!r}"
            screen += os.read(leader, 4096).decode(errors="replace")
        outbox.put(jobs_pb2.SubmitJobRequest(last=True, total_items=chunk))
        outbox.put(None)
        out, _ = watch.communicate(timeout=60)
        assert watch.returncode == 0, out
    finally:
        watch.kill()
        os.close(leader)
    return out, [r for r in _renders(screen) if "state=RUNNING" in r]


def test_watch_joining_a_running_job_counts_its_rate_from_the_join(
    api: ApiThread, redis_client: redis.Redis
) -> None:
    """A job whose upload is still open holds at its first chunk's items (done, the rest
    not sent), so the watch joins a RUNNING job that makes no progress until the test
    sends the last message: any rate shown before then other than none is invented."""
    chunk = 256  # the stack's bulk_chunk_items: a whole chunk leaves before the upload ends
    # Inputs no other test sent: a cached one would leave the chunk short of whole, and
    # a short chunk waits for the upload to end.
    x = np.random.default_rng().random((chunk, 1, 28, 28), dtype=np.float32)
    key = f"watch-join-{uuid.uuid4().hex}"
    outbox: queue.Queue[jobs_pb2.SubmitJobRequest | None] = queue.Queue()

    def requests() -> Iterator[jobs_pb2.SubmitJobRequest]:
        while (message := outbox.get(timeout=60)) is not None:
            yield message

    outbox.put(jobs_pb2.SubmitJobRequest(model="digits", idempotency_key=key, inputs=[tensor.to_proto(x)]))
    with Client(api.target) as client:
        upload = client.jobs.SubmitJobStream.future(requests(), timeout=120)
        try:
            out, running = _watch_the_open_job(api, client, redis_client, key, chunk, outbox)
            assert upload.result(timeout=60).created
        finally:
            outbox.put(None)  # ends the upload if the test stopped before its last message
            upload.cancel()
    assert json.loads(out)["state"] == "SUCCEEDED"
    # Counted from the join: 256 items shown, none of them finished during this watch.
    assert running and all(f"{chunk}item" in r for r in running), running
    assert all("?item/s" in r for r in running), running


def test_async_client_job_calls(api: ApiThread, heldout: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = heldout

    async def run() -> tuple[
        list[jobs_pb2.Job], jobs_pb2.Job, jobs_pb2.Job, list[jobs_pb2.JobResult], jobs_pb2.Job
    ]:
        async with AsyncClient(api.target) as client:
            job = await client.submit(x[:300], "digits", top_k=2)
            updates: list[jobs_pb2.Job] = []
            final = await job.wait(timeout_s=60, on_update=updates.append)
            status = await client.job(job.id).status()
            results = [r async for r in client.job(job.id).results(page_size=128)]
            cancelled = await job.cancel()  # the job has ended: cancelling changes nothing
            with pytest.raises(JobTimeout):  # no time at all to wait: said at once
                await client.job(job.id).wait(timeout_s=0)
            return updates, final, status, results, cancelled

    updates, final, status, results, cancelled = asyncio.run(run())
    assert final.state == jobs_pb2.JOB_STATE_SUCCEEDED and final.counts.done == 300
    assert updates[-1] == final
    assert status.job_id == final.job_id and status.counts == final.counts
    assert [r.index for r in results] == list(range(300))
    assert all(r.ok and len(r.classes) == 2 for r in results)
    assert np.mean([r.classes[0].index == label for r, label in zip(results, y[:300], strict=True)]) >= 0.95
    assert cancelled.state == jobs_pb2.JOB_STATE_SUCCEEDED
