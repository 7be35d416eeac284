"""Loads a model from the repository through its backend and runs batches on CUDA or
CPU; a batch the model fails on is run again row by row (`RowFallback`)."""

from __future__ import annotations

import bisect
import logging
import os
import sys
import time
from typing import TYPE_CHECKING

import numpy as np

from inferpool.repository import ModelConfig
from inferpool.tensor import dtype_name
from inferpool.workers import metrics
from inferpool.workers.backends import LoadOptions, ModelLoadError, Variant, load_variants
from inferpool.workers.backends.base import PRECISION_ATOL

if TYPE_CHECKING:
    import torch

    from inferpool.workers.results import Rows

log = logging.getLogger(__name__)

# Importing torch is most of a worker's start when its models need none of it (ONNX
# Runtime only): this module, and so the batcher, imports it only when asked.
TORCH_PLATFORMS = frozenset({"torchscript", "torch_export"})


def needs_torch(configs: list[ModelConfig]) -> bool:
    return any(cfg.platform in TORCH_PLATFORMS for cfg in configs)


class Device:
    """A device named without torch ("cpu", "cuda", "cuda:N"), for workers whose models
    are all ONNX: the same `type` and `index` the backends read from a torch.device."""

    def __init__(self, name: str) -> None:
        self.type, _, index = name.partition(":")
        self.index = int(index) if index else None

    def __str__(self) -> str:
        return self.type if self.index is None else f"{self.type}:{self.index}"


def pick_device(setting: str, use_torch: bool = True) -> torch.device:
    if not use_torch:
        if setting == "auto":
            import onnxruntime

            cuda = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
            setting = "cuda" if cuda else "cpu"
        return Device(setting)  # type: ignore[return-value]  # duck-typed for the ONNX backend
    import torch

    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, e.g. a container's cpuset)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def configure_threads(torch_threads: int, use_torch: bool = True) -> int:
    """Sizes torch's intra-op pool and returns the size. 0 = one fewer than the usable
    cores (at least 1): a worker's own threads (Celery's consumer, the bulk consumer, the
    results writers) need a core, and when they preempt one of the model's threads
    mid-batch the others wait for it. Measured on 2 cores with the whole stack: bulk jobs
    1.1-1.4x faster with 1 thread than with 2, Classify unchanged. Inter-op parallelism
    buys nothing for one batch at a time and oversubscribes small machines."""
    n = torch_threads or max(1, usable_cores() - 1)
    if use_torch:
        import torch

        torch.set_num_threads(n)
    return n


def _default_threads() -> int:
    """torch's pool size when torch is loaded (configure_threads set it), else the rule's."""
    torch = sys.modules.get("torch")
    return int(torch.get_num_threads()) if torch is not None else configure_threads(0, use_torch=False)


# About how long warm_up times one variant at one batch size.
TUNE_S_PER_SIZE = 0.05


class ModelRunner:
    """One model version on one device, through its backend (workers/backends/, chosen by
    the config's `platform`). Not thread-safe: its batcher thread owns it.

    A backend may give several forms of the model (TorchScript frozen and
    optimize_for_inference; an exported program and its AOTInductor build); neither wins
    everywhere, so warm_up() times each at every batch size the batcher can use and
    run() takes, per size, the one that measured faster. The constructor checks the
    model against its config (output per input, class count, a reduced precision's
    agreement with fp32) and raises ModelLoadError naming the model, file and mismatch."""

    def __init__(self, cfg: ModelConfig, device: torch.device, options: LoadOptions | None = None) -> None:
        self.cfg = cfg
        self.device = device
        options = options or LoadOptions(threads=_default_threads())
        try:
            self.variants = load_variants(cfg, device, options)
            self._check_outputs()
            if cfg.precision != "fp32":
                self._check_precision(load_variants(cfg, device, options, fp32=True)[0])
        except ModelLoadError:
            raise
        except Exception as exc:  # whatever a backend raises on a model it cannot run
            raise ModelLoadError(cfg, f"{type(exc).__name__}: {str(exc)[:300]}") from exc
        # Batch sizes (ascending) and the variant for batches up to each; until warm_up
        # has measured, the first one.
        self._sizes = [cfg.max_batch_size]
        self._chosen = [self.variants[0]]

    def _sample(self, n: int) -> np.ndarray:
        return np.random.default_rng(0).random((n, *self.cfg.input_shape)).astype(self._np_dtype())

    def _check_outputs(self) -> None:
        """A batch of 1 and of 3 (at most max_batch_size) shaped as the config says must
        each give one row of class scores per input (as many as the config's labels)."""
        for n in sorted({1, min(3, self.cfg.max_batch_size)}):
            try:
                out = self.variants[0].run(self._sample(n))
            except Exception as exc:
                raise ModelLoadError(
                    self.cfg,
                    f"fails on input [{n}, {', '.join(map(str, self.cfg.input_shape))}] "
                    f"{dtype_name(self.cfg.input_dtype)} as the config declares "
                    f"({type(exc).__name__}: {str(exc)[:200]})",
                ) from exc
            if out.ndim != 2 or out.shape[0] != n:
                raise ModelLoadError(
                    self.cfg, f"output shape {list(out.shape)} for {n} inputs, expected [{n}, classes]"
                )
            if self.cfg.labels and out.shape[1] != len(self.cfg.labels):
                raise ModelLoadError(
                    self.cfg,
                    f"output size {out.shape[1]} does not match the config's {len(self.cfg.labels)} labels",
                )

    def _check_precision(self, reference: Variant) -> None:
        """A reduced precision serves only when its answers stay near fp32's on the same
        inputs (PRECISION_ATOL per class probability)."""
        x = self._sample(min(16, self.cfg.max_batch_size))
        want = reference.run(x)
        atol = PRECISION_ATOL[self.cfg.precision]
        for variant in self.variants:
            diff = float(np.abs(variant.run(x) - want).max())
            if diff > atol:
                raise ModelLoadError(
                    self.cfg,
                    f"precision {self.cfg.precision}: the {variant.name} form differs from fp32 "
                    f"by {diff:.3g} in a class probability (allowed {atol})",
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
        chosen: list[Variant] = []
        for n in sizes:
            x = np.zeros((n, *self.cfg.input_shape), dtype=self._np_dtype())
            times: dict[str, float] = {}
            for variant in self.variants:
                variant.run(x)
                t = time.perf_counter()
                variant.run(x)
                runs_wanted = max(1, min(repeats, int(TUNE_S_PER_SIZE / (time.perf_counter() - t + 1e-9))))
                runs = []
                for _ in range(runs_wanted):
                    t = time.perf_counter()
                    variant.run(x)
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
        more than float rounding (at the model's precision) is not used (and said so
        in the log)."""
        shape = (min(8, self.cfg.max_batch_size), *self.cfg.input_shape)
        x = np.random.default_rng(0).random(shape).astype(self._np_dtype())
        reference = self.variants[0].run(x)
        for variant in self.variants[1:]:
            out = variant.run(x)
            atol = PRECISION_ATOL[self.cfg.precision]
            if out.shape != reference.shape or not np.allclose(out, reference, rtol=1e-3, atol=atol):
                log.warning(
                    "%s v%d: the %s form answers differently from the %s one; not used",
                    self.cfg.name,
                    self.cfg.version,
                    variant.name,
                    self.variants[0].name,
                )
                self.variants.remove(variant)

    def variant_for(self, n: int) -> str:
        return self._pick(n).name

    def _pick(self, n: int) -> Variant:
        # The variant measured at the smallest size >= n (the largest beyond them).
        return self._chosen[min(bisect.bisect_left(self._sizes, n), len(self._sizes) - 1)]

    def _np_dtype(self) -> np.dtype:
        return np.dtype(dtype_name(self.cfg.input_dtype))

    def run(self, batch: np.ndarray) -> np.ndarray:
        """[N, *input_shape] -> [N, classes] float32 probabilities."""
        return self._pick(len(batch)).run(batch)


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
