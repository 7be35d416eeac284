"""platform onnxruntime: an ONNX file (model.onnx) with a dynamic batch dimension, run by
ONNX Runtime: the CUDA execution provider when the device is CUDA and the installed
onnxruntime has it, the CPU one otherwise. Graph optimisation at its highest level; the
optimised graph is kept in the compiled-form cache, and a later start loads it with the
optimisation already done."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np

from inferpool.repository import ModelConfig
from inferpool.tensor import dtype_name
from inferpool.workers.backends.base import (
    LoadOptions,
    ModelLoadError,
    Variant,
    cache_key,
    require_file,
    softmax,
)

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# ONNX Runtime's names for the input dtypes a config declares.
ORT_TYPES = {
    "float32": "tensor(float)",
    "float16": "tensor(float16)",
    "float64": "tensor(double)",
    "int64": "tensor(int64)",
    "int32": "tensor(int32)",
    "uint8": "tensor(uint8)",
    "int8": "tensor(int8)",
    "bool": "tensor(bool)",
}


def _providers(ort: Any, device: torch.device) -> list[Any]:
    if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        return [("CUDAExecutionProvider", {"device_id": device.index or 0}), "CPUExecutionProvider"]
    if device.type == "cuda":
        log.warning(
            "onnxruntime has no CUDA execution provider here (install onnxruntime-gpu); running on CPU"
        )
    return ["CPUExecutionProvider"]


def _check_signature(cfg: ModelConfig, session: Any) -> None:
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise ModelLoadError(cfg, f"the model takes {len(inputs)} inputs, the config declares 1")
    shape = list(inputs[0].shape)
    want = list(cfg.input_shape)
    fixed = "[" + ", ".join(str(d) if isinstance(d, int) else "n" for d in shape) + "]"
    if len(shape) != len(want) + 1 or any(
        isinstance(d, int) and d != w for d, w in zip(shape[1:], want, strict=False)
    ):
        raise ModelLoadError(
            cfg, f"input shape {fixed} does not match the config's [n, {', '.join(map(str, want))}]"
        )
    if isinstance(shape[0], int) and shape[0] > 0:
        raise ModelLoadError(cfg, f"the batch dimension is fixed at {shape[0]}: export it dynamic")
    want_type = ORT_TYPES.get(dtype_name(cfg.input_dtype), "?")
    if inputs[0].type != want_type:
        raise ModelLoadError(
            cfg, f"input type {inputs[0].type} does not match the config's {dtype_name(cfg.input_dtype)}"
        )


def load(cfg: ModelConfig, device: torch.device, options: LoadOptions, fp32: bool = False) -> list[Variant]:
    import onnxruntime as ort  # only workers serving an ONNX model pay for the import

    if cfg.precision != "fp32" and not fp32:
        raise ModelLoadError(
            cfg,
            f"precision {cfg.precision}: onnxruntime runs the types in the file; export the model "
            "in that precision and declare fp32 (the file's own types)",
        )
    path = require_file(cfg)
    providers = _providers(ort, device)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = options.threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    source = path
    if options.cache_dir is not None:
        cached = options.cache_dir / cache_key(cfg, str(device), ort.__version__, "ort") / "model.onnx"
        if cached.is_file():
            source = cached
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        else:
            cached.parent.mkdir(parents=True, exist_ok=True)
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            opts.optimized_model_filepath = str(cached)
    else:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    try:
        session = ort.InferenceSession(str(source), sess_options=opts, providers=providers)
    except Exception as exc:
        if source != path:  # a damaged cache entry: the original file still loads
            log.warning("cached ONNX graph %s does not load (%r); optimising the original", source, exc)
            source.unlink(missing_ok=True)
            return load(cfg, device, LoadOptions(None, options.threads), fp32)
        raise ModelLoadError(
            cfg, f"not an ONNX model onnxruntime can load ({type(exc).__name__}: {str(exc)[:200]})"
        ) from exc
    _check_signature(cfg, session)
    name = session.get_inputs()[0].name
    logits = cfg.output_kind == "logits"

    def run(batch: np.ndarray) -> np.ndarray:
        out = np.asarray(session.run(None, {name: batch})[0])
        return softmax(out) if logits else out.astype(np.float32, copy=False)

    return [Variant("onnxruntime", run)]
