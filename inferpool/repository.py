"""The model repository: `<root>/<name>/<version>/{config.json, model file}`.

Laid out like Triton's so users bring their own models by copying a folder; each
config names its backend (`platform`: torchscript, torch_export or onnxruntime), whose
model file is model.pt, model.pt2 or model.onnx unless `default_model_filename` says.
This module reads configs only (no torch): the API validates requests against the
declared signature, the worker loads the weights next to it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from inferpool import tensor
from inferpool.errors import InvalidInput, ModelNotFound
from inferpool.names import MODEL_NAME_RE
from inferpool.v1 import tensor_pb2

CONFIG_FILE = "config.json"
# The backends a config may name, and the file each reads by default.
MODEL_FILES = {"torchscript": "model.pt", "torch_export": "model.pt2", "onnxruntime": "model.onnx"}
PRECISIONS = ("fp32", "fp16", "bf16")
OUTPUT_KINDS = ("logits", "probabilities")


NONFINITE = "input contains NaN or infinite values"


class RepositoryError(ValueError):
    """A model folder or its config is malformed."""


def _nonfinite_rows(arrays: np.ndarray) -> list[int]:
    """The rows (first dimension) of a float array holding NaN or infinite values."""
    if arrays.dtype.kind != "f" or not len(arrays):
        return []
    finite = np.isfinite(arrays).reshape(len(arrays), -1).all(axis=1)
    return np.flatnonzero(~finite).tolist()


@dataclass(frozen=True)
class ModelConfig:
    name: str
    version: int
    path: Path
    input_name: str
    input_dtype: int  # tensor_pb2.DataType
    input_shape: tuple[int, ...]  # without the batch dimension
    output_kind: str
    labels: tuple[str, ...]
    max_batch_size: int
    max_delay_ms: float
    channels_last: bool
    # Misses one API process lets wait for a worker before it answers RESOURCE_EXHAUSTED
    # (Triton's dynamic_batching.max_queue_size, but bounded by default).
    max_queue_size: int = 0
    platform: str = "torchscript"
    model_filename: str = MODEL_FILES["torchscript"]
    # The precision the model's weights and inputs run in (its answers stay float32).
    precision: str = "fp32"
    # Backend-specific switches (e.g. torch_export's "aot_inductor"), read by the worker.
    options: tuple[tuple[str, object], ...] = ()

    @property
    def model_file(self) -> Path:
        return self.path / self.model_filename

    def option(self, key: str, default: Any = None) -> Any:
        return dict(self.options).get(key, default)

    @property
    def request_shape(self) -> tuple[int, ...]:
        return (1, *self.input_shape)

    @property
    def input_nbytes(self) -> int:
        return math.prod(self.request_shape) * tensor.itemsize(self.input_dtype)

    @classmethod
    def from_file(cls, path: Path) -> ModelConfig:
        try:
            raw: dict[str, Any] = json.loads((path / CONFIG_FILE).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise RepositoryError(f"{path / CONFIG_FILE}: {exc}") from exc
        where = path / CONFIG_FILE
        try:
            name = path.parent.name
            version = int(path.name)
            if raw.get("name", name) != name:
                raise RepositoryError(f"{where}: name {raw['name']!r} does not match folder {name!r}")
            if int(raw.get("version", version)) != version:
                raise RepositoryError(f"{where}: version does not match folder {path.name!r}")
            spec_in, spec_out = raw["input"], raw.get("output", {})
            shape = tuple(int(d) for d in spec_in["shape"])
            if not shape or any(d <= 0 for d in shape):
                raise RepositoryError(f"{where}: input shape must be positive dimensions, got {shape}")
            kind = spec_out.get("kind", "logits")
            if kind not in OUTPUT_KINDS:
                raise RepositoryError(f"{where}: output kind must be one of {OUTPUT_KINDS}")
            labels = tuple(str(label) for label in raw.get("labels", ()))
            max_batch_size = int(raw.get("max_batch_size", 32))
            max_delay_ms = float(raw.get("max_delay_ms", 2.0))
            max_queue_size = int(raw.get("max_queue_size", 32 * max_batch_size))
            if max_batch_size <= 0 or max_delay_ms < 0 or max_queue_size <= 0:
                raise RepositoryError(
                    f"{where}: max_batch_size and max_queue_size must be > 0 and max_delay_ms >= 0"
                )
            platform = str(raw.get("platform", "torchscript"))
            if platform not in MODEL_FILES:
                raise RepositoryError(
                    f"{where}: platform must be one of {sorted(MODEL_FILES)}, got {platform!r}"
                )
            filename = str(raw.get("default_model_filename", MODEL_FILES[platform]))
            if not filename or "/" in filename or filename.startswith("."):
                raise RepositoryError(
                    f"{where}: default_model_filename must be a file name in the version folder"
                )
            precision = str(raw.get("precision", "fp32"))
            if precision not in PRECISIONS:
                raise RepositoryError(f"{where}: precision must be one of {PRECISIONS}, got {precision!r}")
            options = raw.get("backend_options", {})
            if not isinstance(options, dict):
                raise RepositoryError(f"{where}: backend_options must be an object")
            return cls(
                name=name,
                version=version,
                path=path,
                input_name=str(spec_in.get("name", "input")),
                input_dtype=tensor.dtype_from_name(spec_in["dtype"]),
                input_shape=shape,
                output_kind=kind,
                labels=labels,
                max_batch_size=max_batch_size,
                max_delay_ms=max_delay_ms,
                channels_last=bool(raw.get("channels_last", False)),
                max_queue_size=max_queue_size,
                platform=platform,
                model_filename=filename,
                precision=precision,
                options=tuple(sorted((str(k), v) for k, v in options.items())),
            )
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, RepositoryError):
                raise
            raise RepositoryError(f"{where}: {exc!r}") from exc

    def _check_dtype(self, t: tensor_pb2.Tensor) -> None:
        if t.dtype != self.input_dtype:
            raise InvalidInput(
                f"model {self.name!r} takes {tensor.dtype_name(self.input_dtype)}, "
                f"got {tensor.dtype_name(t.dtype)}"
            )

    def validate(self, t: tensor_pb2.Tensor) -> np.ndarray:
        """The request tensor as an array, or InvalidInput saying what is wrong. Its cost
        is bounded by the model's signature: the rank is compared before any dimension."""
        self._check_dtype(t)
        shape = t.shape
        if len(shape) != len(self.request_shape) or tuple(shape) != self.request_shape:
            raise InvalidInput(
                f"model {self.name!r} takes shape {list(self.request_shape)} (batch of 1), "
                f"got {tensor.shape_text(t.shape)}"
            )
        array = tensor.from_proto(t)
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise InvalidInput(NONFINITE)
        return array

    def validate_many(self, tensors: Sequence[tensor_pb2.Tensor]) -> list[np.ndarray | InvalidInput]:
        """validate() for the inputs of a bulk chunk: per input only the header is
        compared, and one numpy pass over the whole chunk checks the values (per-input
        numpy calls cost more than the arithmetic here). Each result is the input's
        array, or the InvalidInput validate() raises for it."""
        results: list[Any] = []  # None until the values are checked
        good: list[int] = []
        chunks: list[bytes] = []
        dtype, shape, nbytes = self.input_dtype, self.request_shape, self.input_nbytes
        for t in tensors:
            data = t.data  # each access copies the bytes: once per input
            if t.dtype == dtype and len(data) == nbytes and tuple(t.shape) == shape:
                good.append(len(results))
                chunks.append(data)
                results.append(None)
                continue
            try:
                results.append(self.validate(t))  # the exact message
            except InvalidInput as exc:
                results.append(exc)
        if not good:
            return results
        arrays = np.frombuffer(b"".join(chunks), dtype=tensor.numpy_dtype(dtype)).reshape(len(good), *shape)
        nonfinite = set(_nonfinite_rows(arrays))
        for row, i in enumerate(good):
            results[i] = InvalidInput(NONFINITE) if row in nonfinite else arrays[row]
        return results

    def items_in(self, t: tensor_pb2.Tensor) -> int:
        """How many items a bulk input holds: k for [k, *input_shape] holding k rows of
        the model's dtype; 1 for an input of one row, no row or another rank (it fails
        as one item when it does not fit). An input claiming k > 1 rows that its bytes
        do not hold raises InvalidInput: its row count would be the client's word alone,
        and a few bytes could stand for millions of items (a failed result each)."""
        k = self._claimed_rows(t)
        if k > 1:
            self._check_bytes(t, len(t.data))  # a copy of the bytes: once per input and check
        return k

    def _claimed_rows(self, t: tensor_pb2.Tensor) -> int:
        """items_in() from the header alone (no look at the bytes)."""
        shape = t.shape
        if len(shape) != len(self.request_shape) or shape[0] <= 1:
            return 1
        self._check_dtype(t)
        if tuple(shape[1:]) != self.input_shape:
            raise InvalidInput(
                f"inputs: model {self.name!r} takes batches shaped [n, "
                f"{', '.join(map(str, self.input_shape))}], got {tensor.shape_text(shape)}"
            )
        return int(shape[0])

    def _check_bytes(self, t: tensor_pb2.Tensor, held: int) -> None:
        needed = t.shape[0] * self.input_nbytes
        if held != needed:
            raise InvalidInput(
                f"inputs: an input shaped {tensor.shape_text(t.shape)} needs {needed} "
                f"bytes of {tensor.dtype_name(self.input_dtype)}, got {held}"
            )

    def validate_blocks(
        self, tensors: Sequence[tensor_pb2.Tensor]
    ) -> list[tuple[np.ndarray | None, dict[int, InvalidInput]]]:
        """validate_many() for inputs holding items_in() items each, input by input: all
        its rows as one read-only array ([k, *input_shape]; None when no row fits) and
        the rows that fail, with their reasons. A one-row input that does not fit fails
        as one item; a multi-row input that does not hold its rows raises InvalidInput
        (items_in()), so failures never outnumber the rows actually received. Kept whole
        so that callers hash, look up and queue a block without an array per item."""
        counts = [self._claimed_rows(t) for t in tensors]
        if all(k == 1 for k in counts):
            return [
                (None, {0: c}) if isinstance(c, InvalidInput) else (c, {})
                for c in self.validate_many(tensors)
            ]
        blocks: list[tuple[np.ndarray | None, dict[int, InvalidInput]]] = []
        for t, k in zip(tensors, counts, strict=True):
            if k == 1:
                blocks += self.validate_blocks([t])
                continue
            data = t.data  # each read of a bytes field copies it: once here
            self._check_bytes(t, len(data))
            rows = np.frombuffer(data, dtype=tensor.numpy_dtype(self.input_dtype)).reshape(
                k, *self.input_shape
            )
            nonfinite = _nonfinite_rows(rows)
            blocks.append((rows, {row: InvalidInput(NONFINITE) for row in nonfinite}))
        return blocks

    def validate_batch(self, t: tensor_pb2.Tensor) -> tuple[np.ndarray, list[int]]:
        """A tensor of n inputs, [n, *input_shape], as a read-only array, and the rows
        holding NaN or infinite values; InvalidInput when the tensor as a whole does not
        fit the signature."""
        self._check_dtype(t)
        if len(t.shape) != 1 + len(self.input_shape) or tuple(t.shape[1:]) != self.input_shape:
            raise InvalidInput(
                f"model {self.name!r} takes batches shaped [n, {', '.join(map(str, self.input_shape))}], "
                f"got {tensor.shape_text(t.shape)}"
            )
        array = tensor.from_proto(t)  # InvalidInput when the bytes do not fill the shape
        return array, _nonfinite_rows(array)

    def label(self, index: int) -> str:
        return self.labels[index] if index < len(self.labels) else str(index)


class Repository:
    """All models under a root folder, by name and version."""

    def __init__(self, models: dict[str, dict[int, ModelConfig]]) -> None:
        self._models = models

    @classmethod
    def load(cls, root: Path) -> Repository:
        if not root.is_dir():
            raise RepositoryError(f"model repository {root} is not a directory")
        models: dict[str, dict[int, ModelConfig]] = {}
        for model_dir in sorted(p for p in root.iterdir() if p.is_dir()):
            versions = {
                int(v.name): ModelConfig.from_file(v)
                for v in model_dir.iterdir()
                if v.is_dir() and v.name.isdigit() and (v / CONFIG_FILE).exists()
            }
            if not versions:
                continue
            if not MODEL_NAME_RE.match(model_dir.name):
                raise RepositoryError(f"model folder name {model_dir.name!r} is not a valid model name")
            models[model_dir.name] = versions
        if not models:
            raise RepositoryError(f"model repository {root} holds no <name>/<version>/{CONFIG_FILE}")
        return cls(models)

    @property
    def names(self) -> list[str]:
        return sorted(self._models)

    def only(self, names: list[str]) -> Repository:
        """The repository cut down to `names` (RepositoryError names any it lacks)."""
        missing = sorted(set(names) - set(self._models))
        if missing:
            raise RepositoryError(
                f"no model {', '.join(missing)} in the repository (have: {', '.join(self.names)})"
            )
        return Repository({name: self._models[name] for name in names})

    def versions(self, name: str) -> list[int]:
        return sorted(self._models.get(name, {}))

    def all(self) -> list[ModelConfig]:
        return [cfg for name in self.names for cfg in self._models[name].values()]

    def resolve(self, name: str, version: int = 0) -> ModelConfig:
        """Version 0 means the latest; an unknown name or version raises ModelNotFound."""
        versions = self._models.get(name)
        if versions is None:
            shown = name if len(name) <= 64 else name[:64] + "..."
            raise ModelNotFound(f"model {shown!r} is not in the repository (have: {', '.join(self.names)})")
        if version == 0:
            return versions[max(versions)]
        try:
            return versions[version]
        except KeyError:
            raise ModelNotFound(
                f"model {name!r} has no version {version} (have: {sorted(versions)})"
            ) from None
