"""KServe v2 / Open Inference Protocol (Triton's superset) through the real stack.

The external client is the unmodified tritonclient, run in a subprocess
(tests/kserve_client.py says why); requests tritonclient cannot send (typed
`contents`, malformed inputs) go through inferpool's own generated stub.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from inferpool.triton import grpc_service_pb2 as pb
from inferpool.triton import grpc_service_pb2_grpc as pb_grpc
from tests.servers import ApiThread

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[2]
CLIENT = ROOT / "tests" / "kserve_client.py"
HELDOUT = ROOT / "models" / "digits" / "heldout.npz"


def triton(api: ApiThread, scenario: str, *args: object) -> Any:
    done = subprocess.run(
        [sys.executable, str(CLIENT), api.target, scenario, *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def stub(api: ApiThread) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(api.target) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def request(images: np.ndarray, raw: bool = True, **fields: Any) -> pb.ModelInferRequest:
    spec = pb.ModelInferRequest.InferInputTensor(name="image", datatype="FP32", shape=list(images.shape))
    req = pb.ModelInferRequest(model_name="digits", inputs=[spec], **fields)
    if raw:
        req.raw_input_contents.append(images.astype("<f4").tobytes())
    else:
        req.inputs[0].contents.fp32_contents.extend(images.ravel().tolist())
    return req


def probabilities(response: pb.ModelInferResponse) -> np.ndarray:
    (out,) = response.outputs
    assert out.name == "probabilities" and out.datatype == "FP32"
    return np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(tuple(out.shape))


def test_server_and_model_metadata(api: ApiThread) -> None:
    got = triton(api, "server")
    assert got["live"] and got["ready"]
    assert got["model_ready"] and got["model_v1_ready"]
    assert not got["unknown_ready"]
    assert got["server_metadata"]["name"] == "inferpool"
    assert "classification" in got["server_metadata"]["extensions"]
    meta = got["model_metadata"]
    assert meta["name"] == "digits" and meta["versions"] == ["1"]
    assert meta["platform"] == "pytorch_libtorch"
    # MessageToJson writes int64 as strings.
    assert meta["inputs"] == [{"name": "image", "datatype": "FP32", "shape": ["-1", "1", "28", "28"]}]
    assert meta["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": ["-1", "10"]}]


def test_heldout_digits_accuracy_in_batches(api: ApiThread, heldout: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = heldout
    got = triton(api, "heldout", HELDOUT, 8)
    assert got["datatypes"] == ["FP32"]
    assert got["shapes"][0] == [8, 10]
    assert sum(shape[0] for shape in got["shapes"]) == len(x)
    assert np.allclose(got["row_sums"], 1.0, atol=1e-4)
    accuracy = float((np.array(got["predicted"]) == y).mean())
    assert accuracy >= 0.95, accuracy


def test_classification_output(
    api: ApiThread, stub: pb_grpc.GRPCInferenceServiceStub, heldout: tuple[np.ndarray, np.ndarray]
) -> None:
    got = triton(api, "classify", HELDOUT, 3)
    assert got["datatype"] == "BYTES" and got["shape"] == [2, 3]
    probs = probabilities(stub.ModelInfer(request(heldout[0][:2]), timeout=30))
    for row, strings in zip(probs, got["strings"], strict=True):
        best = np.argsort(-row, kind="stable")[:3]
        # Triton's format: "score:index:label", best first.
        assert strings == [f"{row[i]:f}:{i}:{i}" for i in best]


def test_repeat_is_served_from_cache(api: ApiThread) -> None:
    before = api.call(lambda: api.server.plane.counters.hits)
    got = triton(api, "repeat", 7007)
    # Four rows: all computed the first time, all cache hits the second.
    assert got == {"hits": [0, 4], "same": True}
    assert api.call(lambda: api.server.plane.counters.hits) - before == 4


def test_unknown_model_and_version_are_not_found(api: ApiThread) -> None:
    got = triton(api, "errors")
    not_found = (
        "infer_unknown_model",
        "metadata_unknown_model",
        "infer_unknown_version",
        "config_unknown_model",
        "statistics_unknown_model",
    )
    for name in not_found:
        assert got[name] is not None, f"{name} succeeded"
        assert got[name]["status"] == "StatusCode.NOT_FOUND", got[name]
    assert "nope" in got["infer_unknown_model"]["message"]
    # Triton-only RPCs beyond ModelConfig and ModelStatistics are not served.
    assert got["repository_index"]["status"] == "StatusCode.UNIMPLEMENTED", got["repository_index"]


def test_model_config_and_statistics(api: ApiThread) -> None:
    got = triton(api, "config", 8008)
    config = got["config"]["config"]
    assert config == got["config_v1"]["config"]
    assert config["name"] == "digits" and config["platform"] == "pytorch_libtorch"
    assert config["backend"] == "pytorch" and config["max_batch_size"] == 64
    # Dims without the batch dimension, as Triton reports them when max_batch_size > 0.
    assert config["input"] == [{"name": "image", "data_type": "TYPE_FP32", "dims": ["1", "28", "28"]}]
    assert config["output"] == [{"name": "probabilities", "data_type": "TYPE_FP32", "dims": ["10"]}]
    assert config["dynamic_batching"] == {"max_queue_delay_microseconds": "2000"}
    assert config["response_cache"] == {"enable": True}
    assert config["version_policy"] == {"all": {}}

    def stats(answer: dict[str, Any]) -> dict[str, Any]:
        (model,) = answer["model_stats"]
        assert model["name"] == "digits" and model["version"] == "1"
        return model

    before, after = stats(got["before"]), stats(got["after"])
    assert got["all"]["model_stats"][0]["name"] == "digits"

    def delta(*path: str) -> int:
        def value(s: dict[str, Any]) -> int:
            for key in path:
                s = s.get(key, {})
            return int(s or 0)  # MessageToJson leaves out zeros and writes uint64 as strings

        return value(after) - value(before)

    # Two requests of the same four rows: computed once, then all from the cache.
    assert delta("inference_stats", "success", "count") == 2
    assert delta("inference_stats", "success", "ns") > 0
    assert delta("inference_stats", "cache_miss", "count") == 4
    assert delta("inference_stats", "cache_hit", "count") == 4
    assert delta("inference_count") == 4
    assert delta("inference_stats", "compute_infer", "count") == 4
    assert delta("inference_stats", "compute_infer", "ns") > 0
    assert 1 <= delta("execution_count") <= 4
    assert int(after["last_inference"]) > 0


def test_statistics_filters_and_rejects(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    every = stub.ModelStatistics(pb.ModelStatisticsRequest(), timeout=10).model_stats
    assert [(s.name, s.version) for s in every] == [
        ("digits", "1"),
        ("digits_export", "1"),
        ("digits_onnx", "1"),
    ]
    one = stub.ModelStatistics(pb.ModelStatisticsRequest(name="digits", version="1"), timeout=10)
    assert [(s.name, s.version) for s in one.model_stats] == [("digits", "1")]
    for bad, code in (
        (pb.ModelStatisticsRequest(name="digits", version="2"), grpc.StatusCode.NOT_FOUND),
        (pb.ModelStatisticsRequest(version="1"), grpc.StatusCode.INVALID_ARGUMENT),
    ):
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelStatistics(bad, timeout=10)
        assert info.value.code() == code, info.value.details()


def test_typed_contents_answer_like_raw(
    stub: pb_grpc.GRPCInferenceServiceStub, heldout: tuple[np.ndarray, np.ndarray]
) -> None:
    images = heldout[0][8:11]
    typed = stub.ModelInfer(request(images, raw=False, id="typed-1"), timeout=30)
    raw = stub.ModelInfer(request(images, model_version="1"), timeout=30)
    assert typed.id == "typed-1" and typed.model_name == "digits" and typed.model_version == "1"
    assert np.array_equal(probabilities(typed), probabilities(raw))
    assert probabilities(typed).shape == (3, 10)


def _nan_in_second_row(r: pb.ModelInferRequest) -> None:
    # Caught per row by DataPlane.infer: one bad row fails the whole request.
    images = np.zeros((2, 1, 28, 28), np.float32)
    images[1, 0, 3, 3] = np.nan
    r.raw_input_contents[0] = images.tobytes()


def _string_classification(r: pb.ModelInferRequest) -> None:
    r.outputs.add(name="probabilities").parameters["classification"].string_param = "3"


# name: (how the request is spoilt, what the error detail says)
MALFORMED: dict[str, tuple[Callable[[pb.ModelInferRequest], object], str]] = {
    "datatype": (lambda r: setattr(r.inputs[0], "datatype", "FP64"), "takes FP32"),
    "input name": (lambda r: setattr(r.inputs[0], "name", "pixels"), "has input 'image'"),
    "shape": (lambda r: r.inputs[0].shape.__setitem__(2, 27), "takes shape"),
    "byte count": (lambda r: r.raw_input_contents.__setitem__(0, b"\0" * 12), "needs"),
    "version": (lambda r: setattr(r, "model_version", "latest"), "positive integer"),
    "output name": (lambda r: r.outputs.add(name="logits"), "has output 'probabilities'"),
    "classification": (_string_classification, "classification"),
    "nan row": (_nan_in_second_row, "NaN"),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_requests_are_invalid_argument(stub: pb_grpc.GRPCInferenceServiceStub, case: str) -> None:
    spoil, needle = MALFORMED[case]
    req = request(np.zeros((2, 1, 28, 28), np.float32))
    spoil(req)
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(req, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert needle in (info.value.details() or "")


def test_batch_larger_than_max_batch_size_is_refused(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request(np.zeros((65, 1, 28, 28), np.float32)), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "batch size must be 1..64" in (info.value.details() or "")
