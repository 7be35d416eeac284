"""What every backend gives the runner: forms of one model, each a callable from a numpy
batch to float32 class probabilities, and a clear error when the model cannot load."""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from inferpool.repository import ModelConfig

log = logging.getLogger(__name__)

# Largest difference of one class probability allowed between a reduced-precision form
# and the fp32 one on the same inputs; past it the model does not load at that precision.
PRECISION_ATOL = {"fp32": 1e-3, "fp16": 2e-2, "bf16": 6e-2}


class ModelLoadError(Exception):
    """A model version that cannot be served: its file is missing or corrupt, or the model
    disagrees with its config. The message names the model, the file and the mismatch."""

    def __init__(self, cfg: ModelConfig, mismatch: str, file: Path | None = None) -> None:
        self.cfg = cfg
        where = file if file is not None else cfg.model_file
        super().__init__(f"model {cfg.name} v{cfg.version} ({cfg.platform}): {where}: {mismatch}")


@dataclass
class Variant:
    """One form of the model: `run` maps [N, *input_shape] (the config's dtype) to
    [N, classes] float32 probabilities."""

    name: str
    run: Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class LoadOptions:
    """What a backend needs beyond the config: where compiled forms are kept between
    starts (None: nowhere) and the CPU threads its own pool may use."""

    cache_dir: Path | None = None
    threads: int = 1


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float32, copy=False)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    out: np.ndarray = e / e.sum(axis=1, keepdims=True)
    return out


def file_digest(path: Path) -> str:
    """A short content hash: a cached form of a file that changed in place is not reused."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def cache_key(cfg: ModelConfig, device: str, runtime_version: str, *extra: Any) -> str:
    """The folder a compiled form of this model version lives in: model version, file
    contents, runtime version and device (and the precision), so no start reuses a form
    built for something else."""
    parts = [cfg.name, f"v{cfg.version}", file_digest(cfg.model_file), runtime_version, device, cfg.precision]
    parts += [str(e) for e in extra]
    return "-".join(p.replace("/", "_").replace(" ", "_") for p in parts)


def require_file(cfg: ModelConfig) -> Path:
    path = cfg.model_file
    if not path.is_file():
        raise ModelLoadError(cfg, "model file is missing")
    return path


def usable_cache_dir(setting: str) -> Path | None:
    """The compiled-form cache folder a setting names, created if need be; None when the
    setting is empty or the folder cannot be written (a read-only home in a container):
    the worker then compiles at every start rather than not starting."""
    if not setting:
        return None
    path = Path(setting).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        log.warning("compiled-form cache %s is not writable (%s); compiled forms are not kept", path, exc)
        return None
    return path
