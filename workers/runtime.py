"""Loads a TorchScript model from the repository and runs batches on CUDA or CPU."""

from __future__ import annotations

import logging
import os
import time

import numpy as np
import torch

from inferpool.repository import ModelConfig
from inferpool.tensor import dtype_name

log = logging.getLogger(__name__)


def pick_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, e.g. a container's cpuset)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def configure_threads(torch_threads: int) -> int:
    """Sizes torch's intra-op pool and returns the size. 0 = one fewer than the usable
    cores (at least 1): a worker's own threads (Celery's consumer, the bulk consumer, the
    results writers) need a core, and when they preempt one of the model's threads
    mid-batch the others wait for it. Measured on 2 cores with the whole stack: bulk jobs
    1.1-1.4x faster with 1 thread than with 2, Classify unchanged. Inter-op parallelism
    buys nothing for one batch at a time and oversubscribes small machines."""
    n = torch_threads or max(1, usable_cores() - 1)
    torch.set_num_threads(n)
    return n


class ModelRunner:
    """One model version on one device. Not thread-safe: its batcher thread owns it."""

    def __init__(self, cfg: ModelConfig, device: torch.device) -> None:
        self.cfg = cfg
        self.device = device
        module = torch.jit.load(str(cfg.model_file), map_location=device).eval()
        self._channels_last = cfg.channels_last and len(cfg.input_shape) == 3
        if self._channels_last:
            # Weights and inputs both NHWC, so convolutions need no layout conversion.
            module = module.to(memory_format=torch.channels_last)
        # Freezing inlines weights as constants so the JIT can fold and fuse them.
        # (optimize_for_inference was measured 2x slower at batch 1 on CPU: not used.)
        self.module = torch.jit.freeze(module)
        self._dtype = getattr(torch, dtype_name(cfg.input_dtype))
        self._staging: torch.Tensor | None = None
        if device.type == "cuda":
            # Page-locked staging lets the host-to-device copy run asynchronously.
            self._staging = torch.empty(
                (cfg.max_batch_size, *cfg.input_shape), dtype=self._dtype, pin_memory=True
            )

    def warm_up(self) -> float:
        """Runs the sizes the batcher will use so the JIT's profiling runs happen before
        traffic does. Returns the seconds it took."""
        t0 = time.perf_counter()
        sizes = sorted({1, max(1, self.cfg.max_batch_size // 2), self.cfg.max_batch_size})
        for _ in range(3):
            for n in sizes:
                self.run(np.zeros((n, *self.cfg.input_shape), dtype=self._np_dtype()))
        return time.perf_counter() - t0

    def _np_dtype(self) -> np.dtype:
        return np.dtype(dtype_name(self.cfg.input_dtype))

    def run(self, batch: np.ndarray) -> np.ndarray:
        """[N, *input_shape] -> [N, classes] float32 probabilities."""
        with torch.inference_mode():
            x = torch.from_numpy(batch)
            if self._staging is not None:
                staged = self._staging[: len(batch)]
                staged.copy_(x)
                x = staged.to(self.device, non_blocking=True)
            if self._channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            out = self.module(x)
            if self.cfg.output_kind == "logits":
                out = torch.softmax(out.float(), dim=1)
            result: np.ndarray = out.float().cpu().numpy()
            return result
