"""platform torch_export: a program saved by `torch.export.save` (model.pt2) with a
dynamic batch dimension, run as the exported program; with `"backend_options":
{"aot_inductor": true}` also compiled ahead of time by AOTInductor into a shared
library, kept in the compiled-form cache (a compile takes tens of seconds on a CPU,
loading the compiled package milliseconds)."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from inferpool.repository import ModelConfig
from inferpool.tensor import dtype_name
from inferpool.workers.backends.base import LoadOptions, ModelLoadError, Variant, cache_key, require_file
from inferpool.workers.backends.torchcall import TorchCall, precision_dtype

log = logging.getLogger(__name__)


def _check_signature(cfg: ModelConfig, program: Any) -> None:
    """The exported program's one input against the config: rank, the dimensions after
    the batch, dtype, and a batch dimension that is not fixed."""
    inputs = program.graph_signature.user_inputs
    if len(inputs) != 1:
        raise ModelLoadError(cfg, f"the program takes {len(inputs)} inputs, the config declares 1")
    node = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == inputs[0])
    val = node.meta.get("val")
    if val is None:
        return
    shape = list(val.shape)
    want = [*cfg.input_shape]
    if len(shape) != len(want) + 1 or any(
        not isinstance(d, torch.SymInt) and int(d) != w for d, w in zip(shape[1:], want, strict=False)
    ):
        got = "[" + ", ".join("n" if isinstance(d, torch.SymInt) else str(int(d)) for d in shape) + "]"
        raise ModelLoadError(
            cfg, f"input shape {got} does not match the config's [n, {', '.join(map(str, want))}]"
        )
    if not isinstance(shape[0], torch.SymInt):
        raise ModelLoadError(cfg, f"the batch dimension is fixed at {int(shape[0])}: export it dynamic")
    if str(val.dtype).removeprefix("torch.") != dtype_name(cfg.input_dtype):
        raise ModelLoadError(
            cfg,
            f"input dtype {str(val.dtype).removeprefix('torch.')} does not match the config's "
            f"{dtype_name(cfg.input_dtype)}",
        )


def load(cfg: ModelConfig, device: torch.device, options: LoadOptions, fp32: bool = False) -> list[Variant]:
    path = require_file(cfg)
    try:
        program = torch.export.load(str(path))
    except Exception as exc:
        raise ModelLoadError(
            cfg, f"not a torch.export program torch can load ({type(exc).__name__})"
        ) from exc
    _check_signature(cfg, program)
    dtype = torch.float32 if fp32 else precision_dtype(cfg, device)
    module = program.module().to(device)
    if dtype != torch.float32:
        module = module.to(dtype)
    variants = [Variant("exported", TorchCall(cfg, device, module, dtype))]
    if not fp32 and cfg.option("aot_inductor", False):
        try:
            variants.append(
                Variant(
                    "aot_inductor", TorchCall(cfg, device, _aoti(cfg, module, device, dtype, options), dtype)
                )
            )
        except Exception as exc:  # the exported program still serves
            log.warning("AOTInductor did not compile %s v%d: %r", cfg.name, cfg.version, exc)
    return variants


def _aoti(
    cfg: ModelConfig, module: Any, device: torch.device, dtype: torch.dtype, options: LoadOptions
) -> Any:
    """The AOTInductor package of the model at `dtype` on `device`: from the cache when
    one was built for this model version, torch and device, else compiled (and kept)."""
    import torch._inductor  # lazily: Inductor's import alone takes seconds

    key = cache_key(cfg, str(device), torch.__version__, "aoti")
    cached = options.cache_dir / key / "model.pt2" if options.cache_dir else None
    if cached is not None and cached.is_file():
        try:
            loaded = torch._inductor.aoti_load_package(str(cached))
            log.info("%s v%d: AOTInductor package from the cache (%s)", cfg.name, cfg.version, cached.parent)
            return loaded
        except Exception as exc:
            log.warning("cached AOTInductor package %s does not load (%r); compiling again", cached, exc)
    example = torch.zeros((2, *cfg.input_shape), dtype=dtype, device=device)
    batch = torch.export.Dim("batch", min=1, max=max(4096, cfg.max_batch_size))
    t0 = time.perf_counter()
    program = torch.export.export(module, (example,), dynamic_shapes=({0: batch},))
    with tempfile.TemporaryDirectory(prefix="inferpool-aoti-") as tmp:
        built = Path(
            torch._inductor.aoti_compile_and_package(program, package_path=str(Path(tmp) / "model.pt2"))
        )
        log.info("%s v%d: AOTInductor compiled in %.1fs", cfg.name, cfg.version, time.perf_counter() - t0)
        if cached is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            partial = cached.with_name(f".model.pt2.{os.getpid()}")
            shutil.copyfile(built, partial)
            # Whole or not at all: workers starting together on a shared cache race here.
            os.replace(partial, cached)
        return torch._inductor.aoti_load_package(str(built))
