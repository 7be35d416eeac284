"""Drives a running inferpool with the unmodified tritonclient, one scenario per run.

Run as a script (`python tests/kserve_client.py TARGET SCENARIO [ARGS...]`), never
imported by the test process: tritonclient's service_pb2 and inferpool's KServe
stubs both define the `inference.*` messages, and protobuf's default descriptor
pool refuses a second definition of a symbol in one process. Prints one JSON object.
"""

from __future__ import annotations

import json
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

MODEL = "digits"
INPUT = "image"
OUTPUT = "probabilities"


def infer(
    client: triton.InferenceServerClient, images: np.ndarray, class_count: int = 0, model: str = MODEL
) -> triton.InferResult:
    data = triton.InferInput(INPUT, list(images.shape), "FP32")
    data.set_data_from_numpy(images.astype(np.float32))
    outputs = [triton.InferRequestedOutput(OUTPUT, class_count=class_count)]
    return client.infer(model, [data], outputs=outputs, client_timeout=30)


def cache_hits(result: triton.InferResult) -> int:
    response = result.get_response()
    return int(response.parameters["inferpool_cache_hits"].int64_param)


def server(client: triton.InferenceServerClient) -> dict[str, Any]:
    return {
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "model_ready": client.is_model_ready(MODEL),
        "model_v1_ready": client.is_model_ready(MODEL, "1"),
        "unknown_ready": client.is_model_ready("no-such-model"),
        "server_metadata": client.get_server_metadata(as_json=True),
        "model_metadata": client.get_model_metadata(MODEL, as_json=True),
    }


def heldout(client: triton.InferenceServerClient, path: str, batch: int) -> dict[str, Any]:
    x = np.load(path)["x"]
    batches = [x[i : i + batch] for i in range(0, len(x), batch)]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda images: infer(client, images), batches))
    probs = np.concatenate([r.as_numpy(OUTPUT) for r in results])
    return {
        "shapes": [list(r.as_numpy(OUTPUT).shape) for r in results],
        "datatypes": sorted({r.get_output(OUTPUT).datatype for r in results}),
        "predicted": probs.argmax(axis=1).tolist(),
        "row_sums": probs.sum(axis=1).tolist(),
    }


def classify(client: triton.InferenceServerClient, path: str, k: int) -> dict[str, Any]:
    x = np.load(path)["x"][:2]
    result = infer(client, x, class_count=k)
    top = result.as_numpy(OUTPUT)
    return {
        "shape": list(top.shape),
        "datatype": result.get_output(OUTPUT).datatype,
        "strings": [[cell.decode() for cell in row] for row in top],
    }


def repeat(client: triton.InferenceServerClient, seed: int) -> dict[str, Any]:
    # Fresh random images: no earlier test can have cached them.
    images = np.random.default_rng(seed).random((4, 1, 28, 28), dtype=np.float32)
    first, second = infer(client, images), infer(client, images)
    return {
        "hits": [cache_hits(first), cache_hits(second)],
        "same": bool(np.array_equal(first.as_numpy(OUTPUT), second.as_numpy(OUTPUT))),
    }


def config(client: triton.InferenceServerClient, seed: int) -> dict[str, Any]:
    """Triton's ModelConfig and ModelStatistics, the statistics around one request of four
    fresh rows sent twice (four computed, then four cache hits)."""
    images = np.random.default_rng(seed).random((4, 1, 28, 28), dtype=np.float32)
    before = client.get_inference_statistics(MODEL, as_json=True)
    infer(client, images)
    infer(client, images)
    return {
        "config": client.get_model_config(MODEL, as_json=True),
        "config_v1": client.get_model_config(MODEL, "1", as_json=True),
        "before": before,
        "after": client.get_inference_statistics(MODEL, as_json=True),
        "all": client.get_inference_statistics(as_json=True),
    }


def errors(client: triton.InferenceServerClient) -> dict[str, Any]:
    caught: dict[str, Any] = {}
    calls = {
        "infer_unknown_model": lambda: infer(client, np.zeros((1, 1, 28, 28), np.float32), model="nope"),
        "metadata_unknown_model": lambda: client.get_model_metadata("nope"),
        "infer_unknown_version": lambda: client.infer(
            MODEL, [_zeros_input()], model_version="99", client_timeout=30
        ),
        "config_unknown_model": lambda: client.get_model_config("nope"),
        "statistics_unknown_model": lambda: client.get_inference_statistics("nope"),
        "repository_index": lambda: client.get_model_repository_index(),
    }
    for name, call in calls.items():
        try:
            call()
            caught[name] = None
        except InferenceServerException as exc:
            caught[name] = {"status": exc.status(), "message": exc.message()}
    return caught


def _zeros_input() -> triton.InferInput:
    data = triton.InferInput(INPUT, [1, 1, 28, 28], "FP32")
    data.set_data_from_numpy(np.zeros((1, 1, 28, 28), np.float32))
    return data


def main(argv: list[str]) -> None:
    target, scenario, *args = argv
    with triton.InferenceServerClient(target) as client:
        if scenario == "server":
            out = server(client)
        elif scenario == "heldout":
            out = heldout(client, args[0], int(args[1]))
        elif scenario == "classify":
            out = classify(client, args[0], int(args[1]))
        elif scenario == "repeat":
            out = repeat(client, int(args[0]))
        elif scenario == "config":
            out = config(client, int(args[0]))
        elif scenario == "errors":
            out = errors(client)
        else:
            raise SystemExit(f"unknown scenario {scenario!r}")
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main(sys.argv[1:])
