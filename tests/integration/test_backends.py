"""Each backend's model through the real stack (Classify, a bulk job, KServe v2
ModelInfer), and a worker whose repository holds a model that cannot load."""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from inferpool.client import Client
from inferpool.triton import grpc_service_pb2 as pb
from inferpool.triton import grpc_service_pb2_grpc as pb_grpc
from tests.servers import ROOT, ApiThread, MemcachedServer, RedisServer, Worker, stack_settings, wait_until

pytestmark = pytest.mark.timeout(180)

EXPORTED = ["digits_export", "digits_onnx"]


def noisy(x: np.ndarray, seed: int) -> np.ndarray:
    # Unique inputs (noise far below a decision), so each is a miss the backend computes.
    noise = np.random.default_rng(seed).uniform(-1e-3, 1e-3, size=x.shape).astype(np.float32)
    return (x + noise).astype(np.float32)


@pytest.mark.parametrize("model", EXPORTED)
def test_classify_heldout_accuracy(
    client: Client, heldout: tuple[np.ndarray, np.ndarray], model: str
) -> None:
    x, y = heldout
    x = noisy(x, seed=31)
    futures = [client.classify_future(img[None], model, top_k=2, timeout_s=30) for img in x]
    responses = [f.result() for f in futures]
    assert {(r.model, r.version) for r in responses} == {(model, 1)}
    assert not any(r.cached for r in responses)
    accuracy = float((np.array([r.classes[0].index for r in responses]) == y).mean())
    assert accuracy >= 0.95, accuracy


@pytest.mark.parametrize("model", EXPORTED)
def test_bulk_job_heldout_accuracy(
    client: Client, heldout: tuple[np.ndarray, np.ndarray], model: str
) -> None:
    x, y = heldout
    job = client.submit(noisy(x, seed=32), model, top_k=1)
    final = job.wait(timeout_s=90)
    assert (final.counts.total, final.counts.done, final.counts.failed) == (len(x), len(x), 0)
    results = list(job.results())
    assert [r.index for r in results] == list(range(len(x)))
    accuracy = float((np.array([r.classes[0].index for r in results]) == y).mean())
    assert accuracy >= 0.95, accuracy


@pytest.mark.parametrize("model", EXPORTED)
def test_kserve_model_infer_heldout_accuracy(
    api: ApiThread, heldout: tuple[np.ndarray, np.ndarray], model: str
) -> None:
    x, y = heldout
    x = noisy(x, seed=33)
    predicted = []
    with grpc.insecure_channel(api.target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        meta = stub.ModelMetadata(pb.ModelMetadataRequest(name=model), timeout=10)
        assert meta.platform == {"digits_export": "torch_export", "digits_onnx": "onnxruntime_onnx"}[model]
        for i in range(0, len(x), 16):
            batch = x[i : i + 16]
            spec = pb.ModelInferRequest.InferInputTensor(
                name="image", datatype="FP32", shape=list(batch.shape)
            )
            req = pb.ModelInferRequest(model_name=model, inputs=[spec], raw_input_contents=[batch.tobytes()])
            response = stub.ModelInfer(req, timeout=30)
            (out,) = response.outputs
            probs = np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(tuple(out.shape))
            assert np.allclose(probs.sum(1), 1.0, atol=1e-4)
            predicted += probs.argmax(1).tolist()
    accuracy = float((np.array(predicted) == y).mean())
    assert accuracy >= 0.95, accuracy


@pytest.fixture
def half_broken(
    tmp_path: Path, fresh_redis: RedisServer, fresh_memcached: MemcachedServer, logdir: Path
) -> Iterator[tuple[Worker, ApiThread, Path]]:
    """A worker and API over a repository of two models: `good` (the ONNX digits) and
    `broken` (the exported digits, its file cut short)."""
    repo = tmp_path / "models"
    for name, source in (("good", "digits_onnx"), ("broken", "digits_export")):
        folder = repo / name / "1"
        shutil.copytree(ROOT / "models" / source / "1", folder)
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "name": name}))
    pt2 = repo / "broken" / "1" / "model.pt2"
    pt2.write_bytes(pt2.read_bytes()[:4096])
    ready = tmp_path / "ready"
    settings = dataclasses.replace(
        stack_settings(fresh_redis, fresh_memcached, ready_file=str(ready), compiled_cache_dir=""),
        model_repository=repo,
    )
    worker = Worker(settings, logdir)
    api = ApiThread(settings)
    try:
        yield worker, api, ready
    finally:
        api.stop()
        worker.stop()


def test_broken_model_fails_at_load_and_the_other_serves(
    half_broken: tuple[Worker, ApiThread, Path], heldout: tuple[np.ndarray, np.ndarray]
) -> None:
    worker, api, ready = half_broken
    wait_until(ready.exists, 30, "the ready file")
    log = worker.log.read_text()
    pt2 = worker.settings.model_repository / "broken" / "1" / "model.pt2"
    assert f"not serving: model broken v1 (torch_export): {pt2}: not a torch.export program" in log
    x, y = heldout
    with Client(api.target) as client:
        got = [client.classify(img[None], "good", timeout_s=30).classes[0].index for img in x[:40]]
        assert float((np.array(got) == y[:40]).mean()) >= 0.95
        with pytest.raises(grpc.RpcError) as err:
            client.classify(x[0][None], "broken", timeout_s=30)
    # Answered at once with the reason, not left to time out.
    assert err.value.code() == grpc.StatusCode.INTERNAL
    assert "does not serve broken v1" in (err.value.details() or "")
    worker.stop()
    assert not ready.exists()
