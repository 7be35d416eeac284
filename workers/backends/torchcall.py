"""Calling a torch module on numpy batches, shared by the torch backends: CPU or CUDA
(page-locked staging and non-blocking copies), the model's precision, channels_last."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from inferpool.repository import ModelConfig
from inferpool.tensor import dtype_name
from inferpool.workers.backends.base import ModelLoadError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def precision_dtype(cfg: ModelConfig, device: torch.device) -> torch.dtype:
    """The dtype the weights and inputs run in, or ModelLoadError when this device lacks it."""
    if cfg.precision == "bf16" and device.type == "cpu" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        raise ModelLoadError(cfg, "precision bf16: this CPU has no bf16 instructions (use fp32)")
    if cfg.precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ModelLoadError(cfg, "precision bf16: this GPU does not support bf16 (use fp16 or fp32)")
    return DTYPES[cfg.precision]


class TorchCall:
    """`run(batch)` for one torch callable taking [N, *input_shape] in `dtype` on `device`."""

    def __init__(
        self,
        cfg: ModelConfig,
        device: torch.device,
        module: Callable[[torch.Tensor], Any],
        dtype: torch.dtype = torch.float32,
        channels_last: bool = False,
    ) -> None:
        self.cfg = cfg
        self.device = device
        self.module = module
        self.dtype = dtype
        self.channels_last = channels_last
        self._staging: torch.Tensor | None = None
        if device.type == "cuda":
            # Page-locked staging lets the host-to-device copy run asynchronously.
            in_dtype = getattr(torch, dtype_name(cfg.input_dtype))
            self._staging = torch.empty(
                (cfg.max_batch_size, *cfg.input_shape), dtype=in_dtype, pin_memory=True
            )

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            x = torch.from_numpy(batch)
            if self._staging is not None and len(batch) <= len(self._staging):
                staged = self._staging[: len(batch)]
                staged.copy_(x)
                x = staged.to(self.device, non_blocking=True)
            elif self.device.type != "cpu":
                x = x.to(self.device)
            if x.is_floating_point() and x.dtype != self.dtype:
                x = x.to(self.dtype)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            out = self.module(x)
            if isinstance(out, (tuple, list)):
                out = out[0]
            out = out.float()
            if self.cfg.output_kind == "logits":
                out = torch.softmax(out, dim=1)
            result: np.ndarray = out.cpu().numpy()
            return result
