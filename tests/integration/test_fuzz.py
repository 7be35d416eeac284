"""Property-based fuzzing of Classify against the real server.

Each example is a request with exactly one thing wrong (the rest valid, top_k and
request_id arbitrary), so the expected status and the words its message must
contain are known. Every call must get that precise status (never INTERNAL or
UNKNOWN) with a message saying what was wrong; afterwards the server is still
SERVING and nothing reached the queue: the model queue is empty and the API's
publisher sent no message.

Several thousand examples in all (INFERPOOL_FUZZ_EXAMPLES per test, default 800),
bounded by the per-test timeout below; no example database, so CI stays read-only.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from inferpool.client import Client
from inferpool.v1 import inference_pb2, tensor_pb2
from tests.servers import ApiThread

pytestmark = pytest.mark.timeout(120)

EXAMPLES = int(os.environ.get("INFERPOOL_FUZZ_EXAMPLES", "800"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,  # a real server: latency varies; the pytest timeout bounds the whole test
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

MODEL = "digits"
SHAPE = [1, 1, 28, 28]
FLOAT32 = tensor_pb2.DataType.DATA_TYPE_FLOAT32
NBYTES = math.prod(SHAPE) * 4
INT64_MAX = 2**63 - 1
UINT32_MAX = 2**32 - 1

# What an example expects back: the status, and words its message must contain.
Case = tuple[inference_pb2.ClassifyRequest, grpc.StatusCode, tuple[str, ...]]


def request(**fields: object) -> inference_pb2.ClassifyRequest:
    base: dict[str, object] = {
        "model": MODEL,
        "input": tensor_pb2.Tensor(dtype=FLOAT32, shape=SHAPE, data=bytes(NBYTES)),
    }
    base.update(fields)
    return inference_pb2.ClassifyRequest(**base)  # type: ignore[arg-type]


top_ks = st.one_of(st.sampled_from([0, 1, 10, 11, 2**31, UINT32_MAX]), st.integers(0, UINT32_MAX))
request_ids = st.text(max_size=300)
dims = st.one_of(
    st.sampled_from([0, 1, -1, 28, 784, INT64_MAX, -(2**63), 2**32]),
    st.integers(-(2**63), INT64_MAX),
)
# Wrong rank, zero, negative and huge dimensions, the empty shape, and long shapes.
# Hypothesis rarely draws long lists, so very long shapes are drawn by their length:
# they must not make the error message too large to deliver.
shapes = st.one_of(
    st.lists(dims, max_size=8),
    st.lists(st.integers(-2, 2), min_size=9, max_size=50),
    st.integers(9, 500_000).map(lambda n: [1] * n),
).filter(lambda s: s != SHAPE)


@st.composite
def bad_dtype(draw: st.DrawFn) -> Case:
    known = [v for v in tensor_pb2.DataType.values() if v != FLOAT32]
    dtype = draw(st.one_of(st.sampled_from(known), st.integers(9, 2**31 - 1), st.integers(-(2**31), -1)))
    size = draw(st.sampled_from([0, NBYTES, NBYTES // 2, NBYTES * 2, 1]))
    shape = draw(st.one_of(st.just(SHAPE), shapes))
    tensor = tensor_pb2.Tensor(dtype=dtype, shape=shape, data=bytes(size))  # type: ignore[arg-type]
    return request(input=tensor), grpc.StatusCode.INVALID_ARGUMENT, ("takes float32", "got")


@st.composite
def bad_shape(draw: st.DrawFn) -> Case:
    shape = draw(shapes)
    size = draw(st.sampled_from([0, NBYTES, 7]))
    tensor = tensor_pb2.Tensor(dtype=FLOAT32, shape=shape, data=bytes(size))
    return request(input=tensor), grpc.StatusCode.INVALID_ARGUMENT, ("takes shape", "got")


@st.composite
def bad_length(draw: st.DrawFn) -> Case:
    size = draw(st.integers(0, 3 * NBYTES).filter(lambda n: n != NBYTES))
    tensor = tensor_pb2.Tensor(dtype=FLOAT32, shape=SHAPE, data=bytes(size))
    return request(input=tensor), grpc.StatusCode.INVALID_ARGUMENT, (f"data is {size} bytes", str(NBYTES))


@st.composite
def not_finite(draw: st.DrawFn) -> Case:
    x = np.zeros(SHAPE, dtype=np.float32).ravel()
    positions = draw(st.lists(st.integers(0, x.size - 1), min_size=1, max_size=20))
    values = draw(st.lists(st.sampled_from([np.nan, np.inf, -np.inf]), min_size=len(positions)))
    x[positions] = values[: len(positions)]
    tensor = tensor_pb2.Tensor(dtype=FLOAT32, shape=SHAPE, data=x.tobytes())
    return request(input=tensor), grpc.StatusCode.INVALID_ARGUMENT, ("NaN or infinite",)


@st.composite
def bad_model(draw: st.DrawFn) -> Case:
    kind = draw(st.sampled_from(["empty", "malformed", "overlong", "unknown", "version", "negative"]))
    if kind == "empty":
        return request(model=""), grpc.StatusCode.INVALID_ARGUMENT, ("model is required",)
    if kind == "malformed":
        name = draw(st.text(min_size=1, max_size=80).filter(lambda s: not s.isascii() or not s.isalnum()))
        if name[0].isalnum() and name.isascii() and all(c.isalnum() or c in "_.-" for c in name):
            name = "/" + name  # make sure it is malformed
        return request(model=name), grpc.StatusCode.INVALID_ARGUMENT, ("model name must be",)
    if kind == "overlong":
        name = "m" * draw(st.integers(65, 100_000))
        return request(model=name), grpc.StatusCode.INVALID_ARGUMENT, ("model name must be",)
    if kind == "unknown":
        name = draw(st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z").filter(lambda s: s != MODEL))
        return request(model=name), grpc.StatusCode.NOT_FOUND, ("is not in the repository",)
    if kind == "version":
        version = draw(st.integers(2, INT64_MAX))
        return request(version=version), grpc.StatusCode.NOT_FOUND, (f"has no version {version}",)
    version = draw(st.integers(-(2**63), -1))
    return request(version=version), grpc.StatusCode.INVALID_ARGUMENT, ("version must be >= 0",)


def no_input() -> Case:
    req = request()
    req.ClearField("input")
    return req, grpc.StatusCode.INVALID_ARGUMENT, ("input is required",)


@pytest.fixture(scope="module")
def quiet_queue(api: ApiThread, client: Client) -> Callable[[], tuple[int, int]]:
    """Reads (items the API published, misses it counted). Not the queue's length: the
    session worker drains it, so that would read 0 whatever was published."""

    def read() -> tuple[int, int]:
        return api.call(lambda: (api.server.publisher.items, api.server.plane.counters.misses))

    return read


def check(client: Client, case: Case, top_k: int, request_id: str) -> None:
    req, code, words = case
    req.top_k = top_k
    req.request_id = request_id
    with pytest.raises(grpc.RpcError) as info:
        client.stub.Classify(req, timeout=10)
    err = info.value
    assert err.code() == code, (err.code(), err.details(), req.model[:80], list(req.input.shape)[:10])
    details = err.details() or ""
    for word in words:
        assert word in details, (word, details[:300])
    # The message names the problem, and stays short whatever the input's size.
    assert 0 < len(details) <= 1024, len(details)


def run_fuzz(strategy: st.SearchStrategy[Case], client: Client, quiet: Callable[[], tuple[int, int]]) -> None:
    before = quiet()

    @FUZZ
    @given(case=strategy, top_k=top_ks, request_id=request_ids)
    def one(case: Case, top_k: int, request_id: str) -> None:
        check(client, case, top_k, request_id)
        assert quiet() == before, "a malformed request was published (or counted as a miss)"

    one()
    assert client.health() == "SERVING"
    assert client.health("inferpool.v1.InferenceService") == "SERVING"


def test_fuzz_dtype(client: Client, quiet_queue: Callable[[], tuple[int, int]]) -> None:
    run_fuzz(bad_dtype(), client, quiet_queue)


def test_fuzz_shape(client: Client, quiet_queue: Callable[[], tuple[int, int]]) -> None:
    run_fuzz(bad_shape(), client, quiet_queue)


def test_fuzz_byte_length(client: Client, quiet_queue: Callable[[], tuple[int, int]]) -> None:
    run_fuzz(bad_length(), client, quiet_queue)


def test_fuzz_nan_inf(client: Client, quiet_queue: Callable[[], tuple[int, int]]) -> None:
    run_fuzz(not_finite(), client, quiet_queue)


def test_fuzz_model_and_version(client: Client, quiet_queue: Callable[[], tuple[int, int]]) -> None:
    run_fuzz(st.one_of(bad_model(), st.builds(no_input)), client, quiet_queue)


def test_fuzz_over_the_size_limit(
    api: ApiThread, client: Client, quiet_queue: Callable[[], tuple[int, int]]
) -> None:
    """Messages over INFERPOOL_MAX_MESSAGE_BYTES are refused by grpc itself, before
    any of our code runs: RESOURCE_EXHAUSTED, and the server carries on."""
    limit = api.server.settings.max_message_bytes
    before = quiet_queue()

    @settings(FUZZ, max_examples=min(EXAMPLES, 12))
    @given(
        extra=st.integers(1, 2 * 1024 * 1024),
        where=st.sampled_from(["data", "model", "request_id", "shape"]),
    )
    def one(extra: int, where: str) -> None:
        size = limit + extra
        if where == "data":
            req = request(input=tensor_pb2.Tensor(dtype=FLOAT32, shape=SHAPE, data=bytes(size)))
        elif where == "shape":  # varints of 1 byte each, plus the field overhead
            req = request(input=tensor_pb2.Tensor(dtype=FLOAT32, shape=[1] * size))
        else:
            req = request(**{where: "x" * size})
        with pytest.raises(grpc.RpcError) as info:
            client.stub.Classify(req, timeout=10)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, info.value.details()
        assert "larger than max" in (info.value.details() or ""), info.value.details()
        assert quiet_queue() == before

    one()
    assert client.health() == "SERVING"


def test_absurd_top_k_on_a_valid_input_is_capped(
    client: Client, heldout: tuple[np.ndarray, np.ndarray]
) -> None:
    """The one well-formed case: top_k beyond the classes answers all ten, best first."""
    r = client.classify(heldout[0][:1], MODEL, top_k=UINT32_MAX)
    assert len(r.classes) == 10
    assert [c.score for c in r.classes] == sorted((c.score for c in r.classes), reverse=True)
