"""Job requests whose claims outweigh their bytes, and numeric fields and ids out of
range: each is one clear error that costs only the bytes received and leaves no job."""

from __future__ import annotations

import time

import grpc
import numpy as np
import pytest
import redis

from inferpool.client import Client
from inferpool.jobs import state_name
from inferpool.v1 import jobs_pb2, tensor_pb2
from tests.integration.uploads import job_keys, message

pytestmark = pytest.mark.timeout(120)


def test_a_shape_its_bytes_do_not_fill_is_one_error_and_stalls_nothing(
    client: Client, redis_client: redis.Redis
) -> None:
    """20 bytes claiming a million rows: refused as one error at once, nothing written,
    and the API's other calls are not held up meanwhile."""
    hostile = jobs_pb2.SubmitJobRequest(
        model="digits",
        inputs=[
            tensor_pb2.Tensor(dtype=tensor_pb2.DATA_TYPE_FLOAT32, shape=[1_000_000, 1, 28, 28], data=b"")
        ],
    )
    keys, memory = job_keys(redis_client), redis_client.info("memory")["used_memory"]
    calls = [client.jobs.SubmitJob.future(hostile, timeout=30) for _ in range(8)]
    latencies: list[float] = []
    while not all(c.done() for c in calls) or not latencies:
        t0 = time.perf_counter()
        assert client.health(timeout_s=10) == "SERVING"
        latencies.append(time.perf_counter() - t0)
    for c in calls:
        error = c.exception(timeout=30)
        assert error is not None and error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error.details().startswith("inputs: ") and "needs 3136000000 bytes" in error.details()
    # The old server wrote a failed result per claimed row (~138 MB) and held its loop 4 s.
    assert job_keys(redis_client) <= keys
    assert redis_client.info("memory")["used_memory"] - memory < 1 << 20
    assert max(latencies) < 0.25, latencies


def test_inputs_per_message_are_bounded_and_bad_ones_fail_one_item_each(
    client: Client, redis_client: redis.Redis
) -> None:
    """Inputs of ~10 bytes that each fail: at most 1024 per message, each one failed
    item (never one per claimed row); more is refused at once, leaving no job."""
    empty = tensor_pb2.Tensor(dtype=tensor_pb2.DATA_TYPE_FLOAT32, shape=[1, 1, 28, 28], data=b"")
    keys = job_keys(redis_client)
    flood = jobs_pb2.SubmitJobRequest(model="digits", inputs=[empty] * 60_000)
    call = client.jobs.SubmitJob.future(flood, timeout=60)
    latencies: list[float] = []
    while not call.done() or not latencies:
        t0 = time.perf_counter()
        assert client.health(timeout_s=10) == "SERVING"
        latencies.append(time.perf_counter() - t0)
    error = call.exception(timeout=60)
    assert error is not None and error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith("inputs: a message carries at most 1024 inputs, got 60000")
    assert job_keys(redis_client) <= keys
    # The old server took ~2 s for it, holding health checks up to ~1.7 s.
    assert max(latencies) < 0.25, latencies

    job = client.jobs.SubmitJob(
        jobs_pb2.SubmitJobRequest(model="digits", inputs=[empty] * 1024), timeout=30
    ).job
    assert state_name(job.state) == "FAILED"
    assert (job.counts.total, job.counts.failed) == (1024, 1024)
    results = list(client.job(job.job_id).results())
    assert [r.index for r in results] == list(range(1024))
    assert all(not r.ok and "data is 0 bytes" in r.error for r in results)


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"timeout_s": 1e10}, "timeout_s"),
        ({"timeout_s": 1e308}, "timeout_s"),
        ({"timeout_s": -1.0}, "timeout_s"),
        ({"timeout_s": float("nan")}, "timeout_s"),
        ({"version": -1}, "version"),
        ({"top_k": 1_000_000}, "top_k"),
        ({"total_items": -5, "last": True}, "total_items"),
    ],
)
def test_submit_fields_out_of_range_are_refused_and_leave_no_job(
    client: Client, redis_client: redis.Redis, fields: dict[str, object], field: str
) -> None:
    keys = job_keys(redis_client)
    request = message(np.zeros((2, 1, 28, 28), np.float32), first=True, **fields)
    for call in (
        lambda: client.jobs.SubmitJob(request, timeout=10),
        lambda: client.jobs.SubmitJobStream(iter([request]), timeout=10),
    ):
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details().startswith(field + " ")
    assert job_keys(redis_client) <= keys


def test_job_ids_and_paging_fields_are_checked_and_never_echoed_whole(client: Client) -> None:
    long_id = "a" * 100_000
    for job_id in (long_id, "nope", "0" * 31, "A" * 32, "0" * 32 + "\n"):
        for call in (
            lambda i=job_id: client.jobs.GetJob(jobs_pb2.GetJobRequest(job_id=i), timeout=10),
            lambda i=job_id: list(client.jobs.WatchJob(jobs_pb2.WatchJobRequest(job_id=i), timeout=10)),
            lambda i=job_id: client.jobs.CancelJob(jobs_pb2.CancelJobRequest(job_id=i), timeout=10),
        ):
            with pytest.raises(grpc.RpcError) as info:
                call()
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()[:200]
            assert info.value.details().startswith("job_id must be 32 lowercase hex digits")
            assert len(info.value.details()) < 120
    job = client.submit(np.zeros((1, 1, 28, 28), np.float32), "digits")
    for fields, field in (
        ({"offset": -1}, "offset"),
        ({"offset": 2**62}, "offset"),
        ({"limit": -1}, "limit"),
        ({"limit": 5000}, "limit"),
    ):
        with pytest.raises(grpc.RpcError) as info:
            client.jobs.GetJob(jobs_pb2.GetJobRequest(job_id=job.id, **fields), timeout=10)  # type: ignore[arg-type]
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details().startswith(field + " ")
    # In range, an unknown id is NOT_FOUND, and says which id.
    with pytest.raises(grpc.RpcError) as info:
        client.jobs.GetJob(jobs_pb2.GetJobRequest(job_id="0" * 32), timeout=10)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND and "0" * 32 in info.value.details()
