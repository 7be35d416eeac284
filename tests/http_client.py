"""Drives a running inferpool's HTTP port with the unmodified tritonclient.http, one
scenario per run (`python tests/http_client.py HOST:PORT SCENARIO [ARGS...]`); prints
one JSON object. A subprocess, as tests/kserve_client.py is, and because tritonclient.http
runs on gevent, which the test process's threads must not share.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import numpy as np
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

MODEL = "digits"
INPUT = "image"
OUTPUT = "probabilities"


def infer(
    client: triton.InferenceServerClient,
    images: np.ndarray,
    binary: bool = True,
    class_count: int = 0,
    model: str = MODEL,
    later: bool = False,
    **kwargs: Any,
) -> Any:
    data = triton.InferInput(INPUT, list(images.shape), "FP32")
    data.set_data_from_numpy(images.astype(np.float32), binary_data=binary)
    outputs = [triton.InferRequestedOutput(OUTPUT, binary_data=binary, class_count=class_count)]
    # Concurrency the client's own way (greenlets): it is not safe across threads.
    call = client.async_infer if later else client.infer
    return call(model, [data], outputs=outputs, **kwargs)


def caught(call: Any) -> dict[str, Any] | None:
    try:
        call()
    except InferenceServerException as exc:
        return {"status": exc.status(), "message": exc.message()}
    return None


def server(client: triton.InferenceServerClient) -> dict[str, Any]:
    return {
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "model_ready": client.is_model_ready(MODEL),
        "model_v1_ready": client.is_model_ready(MODEL, "1"),
        "unknown_ready": client.is_model_ready("no-such-model"),
        "server_metadata": client.get_server_metadata(),
        "model_metadata": client.get_model_metadata(MODEL),
        "model_config": client.get_model_config(MODEL),
        "statistics": client.get_inference_statistics(MODEL),
    }


def heldout(client: triton.InferenceServerClient, path: str, batch: int, binary: str) -> dict[str, Any]:
    x = np.load(path)["x"]
    batches = [x[i : i + batch] for i in range(0, len(x), batch)]
    pending = [infer(client, images, binary=binary == "binary", later=True) for images in batches]
    results = [p.get_result() for p in pending]
    probs = np.concatenate([r.as_numpy(OUTPUT) for r in results])
    return {
        "shapes": [list(r.as_numpy(OUTPUT).shape) for r in results],
        "binary": sorted({"binary_data_size" in r.get_output(OUTPUT).get("parameters", {}) for r in results}),
        "predicted": probs.argmax(axis=1).tolist(),
        "row_sums": probs.sum(axis=1).tolist(),
    }


def repeat(client: triton.InferenceServerClient, seed: int) -> dict[str, Any]:
    images = np.random.default_rng(seed).random((4, 1, 28, 28), dtype=np.float32)
    first, second = infer(client, images), infer(client, images, binary=False)
    top = infer(client, images[:2], class_count=3)
    return {
        "hits": [
            first.get_response()["parameters"]["inferpool_cache_hits"],
            second.get_response()["parameters"]["inferpool_cache_hits"],
        ],
        "same": bool(np.allclose(first.as_numpy(OUTPUT), second.as_numpy(OUTPUT), atol=1e-6)),
        "top": [[c.decode() for c in row] for row in top.as_numpy(OUTPUT)],
        "probs": first.as_numpy(OUTPUT)[:2].tolist(),
    }


def errors(client: triton.InferenceServerClient) -> dict[str, Any]:
    zeros = np.zeros((1, 1, 28, 28), np.float32)
    return {
        "unknown_model": caught(lambda: infer(client, zeros, model="nope")),
        "unknown_version": caught(lambda: client.infer(MODEL, [_input(zeros)], model_version="99")),
        "metadata_unknown": caught(lambda: client.get_model_metadata("nope")),
        "bad_shape": caught(lambda: infer(client, np.zeros((1, 1, 28, 27), np.float32))),
        "bad_shape_json": caught(lambda: infer(client, np.zeros((2, 28, 28), np.float32), binary=False)),
        "too_many_rows": caught(lambda: infer(client, np.zeros((65, 1, 28, 28), np.float32))),
    }


def overload(client: triton.InferenceServerClient, n: int, timeout_us: int, seed: int) -> dict[str, Any]:
    """n fresh rows at once, each bounded by Triton's `timeout` parameter."""
    rng = np.random.default_rng(seed)
    images = [rng.random((1, 1, 28, 28), dtype=np.float32) for _ in range(n)]
    pending = [infer(client, im, later=True, timeout=timeout_us) for im in images]
    got = [caught(p.get_result) for p in pending]
    return {"errors": got}


def _input(images: np.ndarray) -> triton.InferInput:
    data = triton.InferInput(INPUT, list(images.shape), "FP32")
    data.set_data_from_numpy(images)
    return data


def main(argv: list[str]) -> None:
    target, scenario, *args = argv
    with triton.InferenceServerClient(target, concurrency=64, network_timeout=60) as client:
        if scenario == "server":
            out = server(client)
        elif scenario == "heldout":
            out = heldout(client, args[0], int(args[1]), args[2])
        elif scenario == "repeat":
            out = repeat(client, int(args[0]))
        elif scenario == "errors":
            out = errors(client)
        elif scenario == "overload":
            out = overload(client, int(args[0]), int(args[1]), int(args[2]))
        else:
            raise SystemExit(f"unknown scenario {scenario!r}")
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main(sys.argv[1:])
