"""What a careless or hostile client can make the front do to its status codes, logs and
metrics, and what settings reveal, against real grpc.aio servers and a real Redis
over TLS: undecodable bytes, methods this server does not implement, client text in
error messages, KServe scheduling parameters, streaming calls through the status
interceptor, certificate checks of a rediss:// broker, and credentials in errors.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from kombu.exceptions import OperationalError

from inferpool.api import metrics, status
from inferpool.broker import make_celery
from inferpool.settings import Settings
from inferpool.triton import grpc_service_pb2 as pb
from inferpool.triton import grpc_service_pb2_grpc as pb_grpc
from inferpool.v1 import jobs_pb2, jobs_pb2_grpc
from tests.servers import (
    ApiThread,
    MemcachedServer,
    RedisServer,
    SecureRedisServer,
    TlsFiles,
    stack_settings,
    wait_until,
)

pytestmark = pytest.mark.timeout(120)

CLASSIFY = "/inferpool.v1.InferenceService/Classify"

SUBMIT_STREAM = "/inferpool.v1.JobService/SubmitJobStream"

STREAM_INFER = "/inference.GRPCInferenceService/ModelStreamInfer"

GARBAGE = b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff"  # a field with an invalid varint tag


def _same(data: bytes) -> bytes:
    return data


@pytest.fixture(scope="module")
def api(logdir: Path, memcached_server: MemcachedServer) -> Iterator[ApiThread]:
    """An API of this module's own, on a Redis no worker consumes (nothing here needs a
    computed answer, and a miss must wait for its deadline), whose log rate limit
    outlasts the module, so "one line per window" does not depend on how fast the
    machine sends the calls."""
    redis_server = RedisServer(logdir)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(status, "LOG_INTERVAL_S", 3600.0)
        server = ApiThread(stack_settings(redis_server, memcached_server))
    yield server
    server.stop()
    redis_server.stop()


@pytest.fixture(scope="module")
def channel(api: ApiThread) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(api.target) as ch:
        yield ch


def rpc_error(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def requests_total(rpc: str, code: str) -> float:
    return metrics.REGISTRY.get_sample_value("inferpool_requests_total", {"rpc": rpc, "code": code}) or 0.0


def no_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    noisy = [r for r in caplog.records if r.exc_info or r.name.startswith("grpc")]
    assert not noisy, [r.getMessage() for r in noisy]


def test_undecodable_unary_request_is_invalid_argument_with_one_log_line(
    channel: grpc.Channel, caplog: pytest.LogCaptureFixture
) -> None:
    classify = channel.unary_unary(CLASSIFY, request_serializer=_same, response_deserializer=_same)
    before = requests_total("Classify", "INVALID_ARGUMENT")
    with caplog.at_level(logging.WARNING):
        for _ in range(5):
            error = rpc_error(lambda: classify(GARBAGE, timeout=10))
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert error.details() == "the request message could not be decoded (10 bytes)"
    lines = [r for r in caplog.records if "undecodable" in r.getMessage()]
    assert len(lines) == 1, [r.getMessage() for r in lines]
    assert CLASSIFY in lines[0].getMessage() and "10-byte" in lines[0].getMessage()
    no_tracebacks(caplog)
    wait_until(lambda: requests_total("Classify", "INVALID_ARGUMENT") == before + 5, 10, "5 counted calls")


def test_undecodable_message_in_an_upload_is_invalid_argument(
    channel: grpc.Channel, caplog: pytest.LogCaptureFixture
) -> None:
    upload = channel.stream_unary(SUBMIT_STREAM, request_serializer=_same, response_deserializer=_same)
    before = requests_total("SubmitJobStream", "INVALID_ARGUMENT")
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            error = rpc_error(lambda: upload(iter([GARBAGE]), timeout=10))
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "could not be decoded" in (error.details() or "")
    assert len([r for r in caplog.records if "undecodable" in r.getMessage()]) == 1
    no_tracebacks(caplog)
    wait_until(
        lambda: requests_total("SubmitJobStream", "INVALID_ARGUMENT") == before + 3, 10, "3 counted uploads"
    )


def test_unimplemented_method_is_clean_and_logged_once(
    channel: grpc.Channel, caplog: pytest.LogCaptureFixture
) -> None:
    stream_infer = channel.stream_stream(STREAM_INFER, request_serializer=_same, response_deserializer=_same)
    with caplog.at_level(logging.WARNING):
        for _ in range(4):
            error = rpc_error(lambda: list(stream_infer(iter([b""]), timeout=10)))
            assert error.code() == grpc.StatusCode.UNIMPLEMENTED
            assert error.details() == "ModelStreamInfer is not implemented here"
    lines = [r for r in caplog.records if "unimplemented" in r.getMessage()]
    assert len(lines) == 1 and STREAM_INFER in lines[0].getMessage()
    no_tracebacks(caplog)


def test_authentication_comes_before_decoding(logdir: Path, memcached_server: MemcachedServer) -> None:
    """With auth on, undecodable bytes without a token are refused as unauthenticated
    (the peer learns nothing about the method), and with one are INVALID_ARGUMENT."""
    token = "hygiene-0123456789abcdef"
    redis_server = RedisServer(logdir)
    server = ApiThread(stack_settings(redis_server, memcached_server, auth_tokens=f"ops:{token}"))
    try:
        with grpc.insecure_channel(server.target) as ch:
            classify = ch.unary_unary(CLASSIFY, request_serializer=_same, response_deserializer=_same)
            error = rpc_error(lambda: classify(GARBAGE, timeout=10))
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED
            error = rpc_error(
                lambda: classify(GARBAGE, timeout=10, metadata=[("authorization", f"Bearer {token}")])
            )
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        server.stop()
        redis_server.stop()


def test_streams_end_with_their_connection_age(logdir: Path, memcached_server: MemcachedServer) -> None:
    """An unauthenticated health Watch (it needs no token) cannot hold a connection
    forever: past max_connection_age plus its grace the server cuts it."""
    redis_server = RedisServer(logdir)
    settings = stack_settings(
        redis_server, memcached_server, max_connection_age_s=0.5, max_connection_age_grace_s=0.5
    )
    server = ApiThread(settings)
    try:
        with grpc.insecure_channel(server.target) as ch:
            watch = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(), timeout=60)
            first = next(watch)
            assert first.status == health_pb2.HealthCheckResponse.SERVING
            t0 = time.monotonic()
            with pytest.raises(grpc.RpcError) as info:
                for _ in watch:
                    pass
            # Cut by the server, long before the client's own 60 s deadline.
            assert info.value.code() != grpc.StatusCode.DEADLINE_EXCEEDED
            assert time.monotonic() - t0 < 30
    finally:
        server.stop()
        redis_server.stop()


def test_watch_job_errors_are_mapped_and_counted(channel: grpc.Channel) -> None:
    jobs = jobs_pb2_grpc.JobServiceStub(channel)
    before = requests_total("WatchJob", "NOT_FOUND")
    error = rpc_error(lambda: list(jobs.WatchJob(jobs_pb2.WatchJobRequest(job_id="0" * 32), timeout=10)))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    wait_until(lambda: requests_total("WatchJob", "NOT_FOUND") == before + 1, 10, "WatchJob counted")


def test_huge_client_text_is_never_echoed(channel: grpc.Channel) -> None:
    jobs = jobs_pb2_grpc.JobServiceStub(channel)
    huge = "f" * 100_000
    for call in (
        lambda: jobs.GetJob(jobs_pb2.GetJobRequest(job_id=huge), timeout=10),
        lambda: jobs.CancelJob(jobs_pb2.CancelJobRequest(job_id=huge), timeout=10),
        lambda: list(jobs.WatchJob(jobs_pb2.WatchJobRequest(job_id=huge), timeout=10)),
    ):
        error = rpc_error(call)
        # Not RESOURCE_EXHAUSTED: the answer fits its trailer.
        assert error.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT)
        assert len(error.details() or "") <= status.MAX_DETAILS_CHARS


def _infer_request(**parameters: pb.InferParameter) -> pb.ModelInferRequest:
    image = np.random.default_rng().random((1, 1, 28, 28), dtype=np.float32)
    spec = pb.ModelInferRequest.InferInputTensor(name="image", datatype="FP32", shape=list(image.shape))
    request = pb.ModelInferRequest(model_name="digits", inputs=[spec], raw_input_contents=[image.tobytes()])
    for name, value in parameters.items():
        request.parameters[name].CopyFrom(value)
    return request


@pytest.mark.parametrize(
    ("name", "value", "expect"),
    [
        ("timeout", pb.InferParameter(int64_param=-1), "parameter 'timeout' must be 0..86400000000, got -1"),
        ("timeout", pb.InferParameter(uint64_param=2**64 - 1), "parameter 'timeout' must be 0.."),
        ("timeout", pb.InferParameter(string_param="1s"), "parameter 'timeout' must be an int64 or uint64"),
        ("priority", pb.InferParameter(int64_param=-3), "parameter 'priority' must be 0.."),
        ("priority", pb.InferParameter(double_param=1.5), "parameter 'priority' must be an int64 or uint64"),
    ],
)
def test_kserve_scheduling_parameters_are_range_checked(
    channel: grpc.Channel, name: str, value: pb.InferParameter, expect: str
) -> None:
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    error = rpc_error(lambda: stub.ModelInfer(_infer_request(**{name: value}), timeout=30))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (error.details() or "").startswith(expect), error.details()


def test_kserve_timeout_parameter_bounds_the_wait(channel: grpc.Channel) -> None:
    """No worker here: the miss waits for its deadline, which is the parameter's 200 ms
    and not the call's 60 s (the server's own DEADLINE_EXCEEDED says so)."""
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    request = _infer_request(
        timeout=pb.InferParameter(int64_param=200_000), priority=pb.InferParameter(uint64_param=1)
    )
    error = rpc_error(lambda: stub.ModelInfer(request, timeout=60))
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert error.details() == "no result before the deadline"


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory, logdir: Path) -> Iterator[SecureRedisServer]:
    server = SecureRedisServer(
        logdir, password="hygiene-redis-pass", tls=TlsFiles(tmp_path_factory.mktemp("tls"))
    )
    yield server
    server.stop()


def _connects(url: str) -> bool:
    """Whether the Celery app both sides build reaches the broker, publishing and consuming."""
    app = make_celery(Settings.from_env({}, redis_url=url))
    try:
        for connection in (app.connection_for_write(), app.connection_for_read()):
            with connection:
                connection.ensure_connection(max_retries=1, timeout=5)
        return True
    except OperationalError as exc:
        assert "CERTIFICATE_VERIFY_FAILED" in str(exc), exc
        return False
    finally:
        app.close()


def test_bare_rediss_url_verifies_the_certificate(tls_redis: SecureRedisServer) -> None:
    assert tls_redis.tls is not None
    base = f"rediss://:{tls_redis.password}@127.0.0.1:{tls_redis.port}/0"
    # The test CA is in no trust store: a bare URL must not connect, as redis-py would not.
    assert not _connects(base)
    # Verified against the named CA, with or without naming ssl_cert_reqs.
    assert _connects(f"{base}?ssl_cert_reqs=required&ssl_ca_certs={tls_redis.tls.ca}")
    assert _connects(f"{base}?ssl_ca_certs={tls_redis.tls.ca}")
    # Still possible, but only by saying so.
    assert _connects(f"{base}?ssl_cert_reqs=none")


def test_a_giant_kserve_shape_is_refused_by_its_rank(channel: grpc.Channel) -> None:
    """2M claimed dimensions through KServe: refused on the rank alone, neither copied
    nor echoed back."""
    request = _infer_request()
    del request.inputs[0].shape[:]
    request.inputs[0].shape.extend([1] * 2_000_000)
    error = rpc_error(lambda: pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == "input 'image' takes shape [-1, 1, 28, 28], got 2000000 dimensions"
