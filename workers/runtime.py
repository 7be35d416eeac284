"""Loads a TorchScript model from the repository and runs batches on CUDA or CPU; a batch
the model fails on is run again row by row (`RowFallback`)."""

from __future__ import annotations

import bisect
import logging
import os
import time
from typing import TYPE_CHECKING

import numpy as np
import torch

from inferpool.repository import ModelConfig
from inferpool.tensor import dtype_name
from workers import metrics

if TYPE_CHECKING:
    from workers.results import Rows

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


# About how long warm_up times one variant at one batch size.
TUNE_S_PER_SIZE = 0.05


class _Variant:
    """One compiled form of the model, and whether it takes channels_last inputs."""

    def __init__(self, name: str, module: torch.jit.ScriptModule, channels_last: bool) -> None:
        self.name = name
        self.module = module
        self.channels_last = channels_last


class ModelRunner:
    """One model version on one device. Not thread-safe: its batcher thread owns it.

    The model is compiled two ways: frozen (weights inlined as constants, so the JIT
    folds and fuses them; channels_last for image models), and that plus
    torch.jit.optimize_for_inference (oneDNN layouts, conv-bn folding). Neither wins
    everywhere: on this CPU the second ran the digits CNN 1.6-2x faster at batches of
    32-64 and 2x slower at batch 1. So warm_up() times both at each batch size the
    batcher can use and run() takes, per size, the one that measured faster."""

    def __init__(self, cfg: ModelConfig, device: torch.device) -> None:
        self.cfg = cfg
        self.device = device
        module = torch.jit.load(str(cfg.model_file), map_location=device).eval()
        image = len(cfg.input_shape) == 3
        channels_last = cfg.channels_last and image
        # Weights and inputs both NHWC, so convolutions need no layout conversion.
        shaped = module.to(memory_format=torch.channels_last) if channels_last else module
        self.variants = [_Variant("frozen", torch.jit.freeze(shaped), channels_last)]
        try:
            # From a second load: .to(memory_format=...) changed the first in place.
            optimized = torch.jit.optimize_for_inference(
                torch.jit.freeze(torch.jit.load(str(cfg.model_file), map_location=device).eval())
            )
            self.variants.append(_Variant("optimized", optimized, False))
        except Exception as exc:  # a model it cannot take runs frozen only
            log.warning("optimize_for_inference failed for %s v%d: %r", cfg.name, cfg.version, exc)
        # Batch sizes (ascending) and the variant for batches up to each; until warm_up
        # has measured, the frozen one.
        self._sizes = [cfg.max_batch_size]
        self._chosen = [self.variants[0]]
        self._dtype = getattr(torch, dtype_name(cfg.input_dtype))
        self._staging: torch.Tensor | None = None
        if device.type == "cuda":
            # Page-locked staging lets the host-to-device copy run asynchronously.
            self._staging = torch.empty(
                (cfg.max_batch_size, *cfg.input_shape), dtype=self._dtype, pin_memory=True
            )

    def warm_up(self, repeats: int = 5) -> float:
        """Runs every variant at batch sizes 1, 2, 4, ... up to max_batch_size, so the
        JIT's profiling runs happen before traffic does, and chooses per size the
        variant with the lowest median time. Each is timed over up to `repeats` runs
        after two untimed ones, fewer when a run takes long (a model whose batch takes
        a second is timed once per size and variant). Returns the seconds it took."""
        t0 = time.perf_counter()
        self._drop_disagreeing()
        top = self.cfg.max_batch_size
        sizes = sorted({*(1 << i for i in range(top.bit_length()) if 1 << i <= top), top})
        chosen: list[_Variant] = []
        for n in sizes:
            x = np.zeros((n, *self.cfg.input_shape), dtype=self._np_dtype())
            times: dict[str, float] = {}
            for variant in self.variants:
                self._run(variant, x)
                t = time.perf_counter()
                self._run(variant, x)
                runs_wanted = max(1, min(repeats, int(TUNE_S_PER_SIZE / (time.perf_counter() - t + 1e-9))))
                runs = []
                for _ in range(runs_wanted):
                    t = time.perf_counter()
                    self._run(variant, x)
                    runs.append(time.perf_counter() - t)
                times[variant.name] = float(np.median(runs))
            chosen.append(min(self.variants, key=lambda v: times[v.name]))
        self._sizes, self._chosen = sizes, chosen
        log.info(
            "%s v%d: %s",
            self.cfg.name,
            self.cfg.version,
            ", ".join(f"batch {n} {v.name}" for n, v in zip(sizes, chosen, strict=True)),
        )
        return time.perf_counter() - t0

    def _drop_disagreeing(self) -> None:
        """A variant whose answers differ from the frozen model's on the same inputs by
        more than float rounding is not used (and said so in the log)."""
        shape = (min(8, self.cfg.max_batch_size), *self.cfg.input_shape)
        x = np.random.default_rng(0).random(shape).astype(self._np_dtype())
        reference = self._run(self.variants[0], x)
        for variant in self.variants[1:]:
            out = self._run(variant, x)
            if out.shape != reference.shape or not np.allclose(out, reference, rtol=1e-3, atol=1e-3):
                log.warning(
                    "%s v%d: the %s form answers differently from the frozen one; not used",
                    self.cfg.name,
                    self.cfg.version,
                    variant.name,
                )
                self.variants.remove(variant)

    def variant_for(self, n: int) -> str:
        return self._pick(n).name

    def _pick(self, n: int) -> _Variant:
        # The variant measured at the smallest size >= n (the largest beyond them).
        return self._chosen[min(bisect.bisect_left(self._sizes, n), len(self._sizes) - 1)]

    def _np_dtype(self) -> np.dtype:
        return np.dtype(dtype_name(self.cfg.input_dtype))

    def run(self, batch: np.ndarray) -> np.ndarray:
        """[N, *input_shape] -> [N, classes] float32 probabilities."""
        return self._run(self._pick(len(batch)), batch)

    def _run(self, variant: _Variant, batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            x = torch.from_numpy(batch)
            if self._staging is not None:
                staged = self._staging[: len(batch)]
                staged.copy_(x)
                x = staged.to(self.device, non_blocking=True)
            if variant.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            out = variant.module(x)
            if self.cfg.output_kind == "logits":
                out = torch.softmax(out.float(), dim=1)
            result: np.ndarray = out.float().cpu().numpy()
            return result


class RowFallback:
    """Runs a batch through the model; when the batch fails, runs each row alone, so one
    bad input fails only itself."""

    def __init__(self, cfg: ModelConfig, runner: ModelRunner) -> None:
        self.cfg = cfg
        self.runner = runner
        self._m_split = metrics.SPLIT_BATCHES.labels(cfg.name)

    def run(self, x: np.ndarray) -> Rows:
        """Class probabilities per input row; None for a row the model failed on."""
        try:
            return self.runner.run(x)
        except Exception:
            log.exception("model %s v%d failed on a batch of %d", self.cfg.name, self.cfg.version, len(x))
        if len(x) == 1:
            return [None]
        self._m_split.inc()
        rows: list[np.ndarray | None] = []
        for i in range(len(x)):
            try:
                rows.append(self.runner.run(x[i : i + 1])[0])
            except Exception as exc:
                log.warning("model %s v%d failed on one input: %r", self.cfg.name, self.cfg.version, exc)
                rows.append(None)
        return rows
