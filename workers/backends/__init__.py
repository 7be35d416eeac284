"""The model backends, chosen per model by `platform` in its config.json. Each gives the
runner (workers/runtime.py) one or more forms of the model behind the same call; the
batcher never learns which backend runs. A backend's module (and its runtime: torch's
compilers, onnxruntime) is imported only when a model names it."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from inferpool.workers.backends.base import LoadOptions, ModelLoadError, Variant

if TYPE_CHECKING:
    import torch

    from inferpool.repository import ModelConfig

MODULES = {
    "torchscript": "workers.backends.torchscript",
    "torch_export": "workers.backends.torch_export",
    "onnxruntime": "workers.backends.onnxrt",
}

__all__ = ["MODULES", "LoadOptions", "ModelLoadError", "Variant", "load_variants"]


def load_variants(
    cfg: ModelConfig, device: torch.device, options: LoadOptions, fp32: bool = False
) -> list[Variant]:
    """The forms of `cfg`'s model on `device` (at its precision; at fp32 when `fp32`, for
    the reference a reduced precision is compared with). ModelLoadError when it cannot."""
    module = importlib.import_module(MODULES[cfg.platform])
    variants: list[Variant] = module.load(cfg, device, options, fp32)
    return variants
