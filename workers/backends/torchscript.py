"""platform torchscript: a `torch.jit` archive (model.pt), compiled two ways.

Frozen (weights inlined as constants, so the JIT folds and fuses them; channels_last
for image models), and that plus torch.jit.optimize_for_inference (oneDNN layouts,
conv-bn folding). Neither wins everywhere: on a 2-core CPU the second ran the digits
CNN 1.6-2x faster at batches of 32-64 and 2x slower at batch 1, so the runner times
both per batch size at warm-up."""

from __future__ import annotations

import logging

import torch

from inferpool.repository import ModelConfig
from inferpool.workers.backends.base import LoadOptions, ModelLoadError, Variant, require_file
from inferpool.workers.backends.torchcall import TorchCall, precision_dtype

log = logging.getLogger(__name__)


def load(cfg: ModelConfig, device: torch.device, options: LoadOptions, fp32: bool = False) -> list[Variant]:
    path = require_file(cfg)
    dtype = torch.float32 if fp32 else precision_dtype(cfg, device)

    def load_module() -> torch.jit.ScriptModule:
        try:
            module = torch.jit.load(str(path), map_location=device).eval()
        except Exception as exc:
            raise ModelLoadError(
                cfg, f"not a TorchScript archive torch can load ({type(exc).__name__})"
            ) from exc
        return module.to(dtype) if dtype != torch.float32 else module

    channels_last = cfg.channels_last and len(cfg.input_shape) == 3
    first = load_module()
    # Weights and inputs both NHWC, so convolutions need no layout conversion.
    shaped = first.to(memory_format=torch.channels_last) if channels_last else first  # type: ignore[call-overload]
    variants = [Variant("frozen", TorchCall(cfg, device, torch.jit.freeze(shaped), dtype, channels_last))]
    if fp32 and cfg.precision != "fp32":
        return variants  # the reference a reduced precision is checked against
    try:
        # From a second load: .to(memory_format=...) changed the first in place.
        optimized = torch.jit.optimize_for_inference(torch.jit.freeze(load_module()))
        variants.append(Variant("optimized", TorchCall(cfg, device, optimized, dtype)))
    except Exception as exc:  # a model it cannot take runs frozen only
        log.warning("optimize_for_inference failed for %s v%d: %r", cfg.name, cfg.version, exc)
    return variants
