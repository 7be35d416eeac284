"""Tensor proto <-> numpy, with the size and dtype checks both sides rely on."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from inferpool.errors import InvalidInput
from inferpool.v1 import tensor_pb2

DataType = tensor_pb2.DataType

# Little-endian explicitly: the wire format is fixed, whatever the host is.
_TO_NUMPY: dict[int, np.dtype] = {
    DataType.DATA_TYPE_FLOAT32: np.dtype("<f4"),
    DataType.DATA_TYPE_FLOAT16: np.dtype("<f2"),
    DataType.DATA_TYPE_FLOAT64: np.dtype("<f8"),
    DataType.DATA_TYPE_UINT8: np.dtype("u1"),
    DataType.DATA_TYPE_INT8: np.dtype("i1"),
    DataType.DATA_TYPE_INT32: np.dtype("<i4"),
    DataType.DATA_TYPE_INT64: np.dtype("<i8"),
    DataType.DATA_TYPE_BOOL: np.dtype("?"),
}
_NAMES: dict[str, int] = {
    "float32": DataType.DATA_TYPE_FLOAT32,
    "float16": DataType.DATA_TYPE_FLOAT16,
    "float64": DataType.DATA_TYPE_FLOAT64,
    "uint8": DataType.DATA_TYPE_UINT8,
    "int8": DataType.DATA_TYPE_INT8,
    "int32": DataType.DATA_TYPE_INT32,
    "int64": DataType.DATA_TYPE_INT64,
    "bool": DataType.DATA_TYPE_BOOL,
}
_FROM_NUMPY: dict[str, int] = {np.dtype(name).name: code for name, code in _NAMES.items()}


def dtype_from_name(name: str) -> int:
    """'float32' -> DATA_TYPE_FLOAT32; raises ValueError for names we do not carry."""
    try:
        return _NAMES[name]
    except KeyError:
        raise ValueError(f"unsupported dtype {name!r}; expected one of {sorted(_NAMES)}") from None


def dtype_name(code: int) -> str:
    for name, value in _NAMES.items():
        if value == code:
            return name
    return DataType.Name(code) if code in DataType.values() else f"<unknown dtype {code}>"


def shape_text(shape: Sequence[int], limit: int = 8) -> str:
    """A shape for an error message, bounded: a request may carry hundreds of thousands
    of dimensions, and echoing them whole makes a status message larger than clients
    accept (grpc then reports RESOURCE_EXHAUSTED instead of the real error)."""
    if len(shape) <= limit:
        return str(list(shape))
    head = ", ".join(str(d) for d in shape[: limit - 1])
    return f"[{head}, ..., {shape[-1]}] ({len(shape)} dimensions)"


def numpy_dtype(code: int) -> np.dtype:
    """The little-endian numpy dtype of a DataType."""
    return _TO_NUMPY[code]


def itemsize(code: int) -> int:
    return _TO_NUMPY[code].itemsize


def to_proto(array: np.ndarray) -> tensor_pb2.Tensor:
    try:
        code = _FROM_NUMPY[array.dtype.name]
    except KeyError:
        raise ValueError(f"unsupported dtype {array.dtype}") from None
    data = np.ascontiguousarray(array, dtype=_TO_NUMPY[code]).tobytes()
    return tensor_pb2.Tensor(dtype=code, shape=list(array.shape), data=data)  # type: ignore[arg-type]


def from_proto(tensor: tensor_pb2.Tensor) -> np.ndarray:
    """Zero-copy view of the bytes as an array (read-only). Raises InvalidInput when the
    dtype is unknown, a dimension is negative, or the byte length does not match."""
    if tensor.dtype not in _TO_NUMPY:
        raise InvalidInput(f"unsupported dtype {dtype_name(tensor.dtype)}")
    shape = tuple(tensor.shape)
    if any(d < 0 for d in shape):
        raise InvalidInput(f"shape {shape_text(shape)} has a negative dimension")
    dtype = _TO_NUMPY[tensor.dtype]
    expected = math.prod(shape) * dtype.itemsize
    data = tensor.data  # each read of a bytes field copies it: a bulk chunk's ~800 KB, once
    if len(data) != expected:
        raise InvalidInput(
            f"data is {len(data)} bytes but shape {shape_text(shape)} of {dtype.name} needs {expected}"
        )
    return np.frombuffer(data, dtype=dtype).reshape(shape)
