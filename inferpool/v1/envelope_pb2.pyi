from inferpool.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Envelope(_message.Message):
    __slots__ = ("envelope_version", "model", "model_version", "items", "enqueued_unix_ns", "job_id", "chunk")
    ENVELOPE_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    ENQUEUED_UNIX_NS_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    envelope_version: int
    model: str
    model_version: int
    items: _containers.RepeatedCompositeFieldContainer[EnvelopeItem]
    enqueued_unix_ns: int
    job_id: str
    chunk: BulkChunk
    def __init__(self, envelope_version: _Optional[int] = ..., model: _Optional[str] = ..., model_version: _Optional[int] = ..., items: _Optional[_Iterable[_Union[EnvelopeItem, _Mapping]]] = ..., enqueued_unix_ns: _Optional[int] = ..., job_id: _Optional[str] = ..., chunk: _Optional[_Union[BulkChunk, _Mapping]] = ...) -> None: ...

class BulkChunk(_message.Message):
    __slots__ = ("inputs", "job_indexes", "deadline_unix_ns", "cache_scope", "traceparent")
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    JOB_INDEXES_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_NS_FIELD_NUMBER: _ClassVar[int]
    CACHE_SCOPE_FIELD_NUMBER: _ClassVar[int]
    TRACEPARENT_FIELD_NUMBER: _ClassVar[int]
    inputs: _tensor_pb2.Tensor
    job_indexes: _containers.RepeatedScalarFieldContainer[int]
    deadline_unix_ns: int
    cache_scope: str
    traceparent: str
    def __init__(self, inputs: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., job_indexes: _Optional[_Iterable[int]] = ..., deadline_unix_ns: _Optional[int] = ..., cache_scope: _Optional[str] = ..., traceparent: _Optional[str] = ...) -> None: ...

class EnvelopeItem(_message.Message):
    __slots__ = ("request_id", "input", "deadline_unix_ns", "reply_key", "traceparent", "job_index", "cache_scope")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_NS_FIELD_NUMBER: _ClassVar[int]
    REPLY_KEY_FIELD_NUMBER: _ClassVar[int]
    TRACEPARENT_FIELD_NUMBER: _ClassVar[int]
    JOB_INDEX_FIELD_NUMBER: _ClassVar[int]
    CACHE_SCOPE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    input: _tensor_pb2.Tensor
    deadline_unix_ns: int
    reply_key: str
    traceparent: str
    job_index: int
    cache_scope: str
    def __init__(self, request_id: _Optional[str] = ..., input: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., deadline_unix_ns: _Optional[int] = ..., reply_key: _Optional[str] = ..., traceparent: _Optional[str] = ..., job_index: _Optional[int] = ..., cache_scope: _Optional[str] = ...) -> None: ...

class Reply(_message.Message):
    __slots__ = ("request_id", "status", "error", "scores", "queue_ms", "compute_ms", "batch_size", "cached")
    class Status(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATUS_UNSPECIFIED: _ClassVar[Reply.Status]
        STATUS_OK: _ClassVar[Reply.Status]
        STATUS_INVALID_INPUT: _ClassVar[Reply.Status]
        STATUS_INTERNAL: _ClassVar[Reply.Status]
    STATUS_UNSPECIFIED: Reply.Status
    STATUS_OK: Reply.Status
    STATUS_INVALID_INPUT: Reply.Status
    STATUS_INTERNAL: Reply.Status
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_MS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    CACHED_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    status: Reply.Status
    error: str
    scores: Scores
    queue_ms: float
    compute_ms: float
    batch_size: int
    cached: bool
    def __init__(self, request_id: _Optional[str] = ..., status: _Optional[_Union[Reply.Status, str]] = ..., error: _Optional[str] = ..., scores: _Optional[_Union[Scores, _Mapping]] = ..., queue_ms: _Optional[float] = ..., compute_ms: _Optional[float] = ..., batch_size: _Optional[int] = ..., cached: _Optional[bool] = ...) -> None: ...

class Scores(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, values: _Optional[_Iterable[float]] = ...) -> None: ...
