"""Pure units: settings, tensors, the envelope codec, the repository, cache keys, status mapping."""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

import grpc
import numpy as np
import pytest
from kombu.exceptions import EncodeError
from kombu.serialization import dumps, loads

from inferpool import codec, errors, heap, tensor
from inferpool.api import front_cache
from inferpool.api.front_cache import LocalCache
from inferpool.api.job_watch import WATCH_MIN_INTERVAL_S, next_look_s
from inferpool.api.status import code_for
from inferpool.cache import CacheKeys
from inferpool.repository import ModelConfig, Repository, RepositoryError
from inferpool.settings import Settings, SettingsError
from inferpool.v1 import envelope_pb2

ROOT = Path(__file__).resolve().parents[2]


def test_settings_defaults_and_env() -> None:
    s = Settings.from_env({"INFERPOOL_GRPC_PORT": "0", "INFERPOOL_CACHE_TTL_S": "10"})
    assert s.grpc_port == 0 and s.cache_ttl_s == 10
    assert Settings.from_env({}).redis_url.startswith("redis://")
    assert Settings.from_env(s.env()) == s


def test_settings_report_every_problem() -> None:
    with pytest.raises(SettingsError) as info:
        Settings.from_env(
            {"INFERPOOL_REDIS_URL": "http://x", "INFERPOOL_GRPC_PORT": "70000", "INFERPOOL_MEMCACHED": "nope"}
        )
    text = str(info.value)
    for var in ("INFERPOOL_REDIS_URL", "INFERPOOL_GRPC_PORT", "INFERPOOL_MEMCACHED"):
        assert var in text


@pytest.mark.parametrize(
    "dtype", ["float32", "float16", "float64", "uint8", "int8", "int32", "int64", "bool"]
)
def test_tensor_roundtrip(dtype: str) -> None:
    a = (np.arange(24).reshape(2, 3, 4) % 2).astype(dtype)
    t = tensor.to_proto(a)
    assert len(t.data) == a.nbytes
    np.testing.assert_array_equal(tensor.from_proto(t), a)


def test_tensor_rejects_bad_lengths_and_shapes() -> None:
    t = tensor.to_proto(np.zeros((2, 2), np.float32))
    t.data = t.data[:-1]
    with pytest.raises(errors.InvalidInput, match="bytes"):
        tensor.from_proto(t)
    t = tensor.to_proto(np.zeros((2, 2), np.float32))
    t.shape[:] = [-2, -2]
    with pytest.raises(errors.InvalidInput, match="negative"):
        tensor.from_proto(t)


def test_envelope_serializer_carries_raw_protobuf() -> None:
    codec.register_serializer()
    env = envelope_pb2.Envelope(envelope_version=codec.ENVELOPE_VERSION, model="digits", model_version=1)
    env.items.add(request_id="a", input=tensor.to_proto(np.ones((1, 2), np.float32)))
    body = codec.encode(env)
    content_type, encoding, data = dumps(((body,), {}, {"callbacks": None}), serializer=codec.SERIALIZER)
    assert (content_type, encoding) == (codec.CONTENT_TYPE, "binary")
    assert data == body  # the message body is the envelope itself, not JSON around it
    (args, kwargs, _embed) = loads(data, content_type, encoding, accept=[codec.CONTENT_TYPE])
    assert args == (body,) and kwargs == {}
    assert codec.decode(args[0]) == env
    with pytest.raises(EncodeError):
        dumps((("not bytes",), {}, {}), serializer=codec.SERIALIZER)


def test_poison_envelopes_are_recognised() -> None:
    with pytest.raises(codec.PoisonMessage):
        codec.decode(b"\xff\xff\xff garbage")
    with pytest.raises(codec.PoisonMessage, match="version"):
        codec.decode(envelope_pb2.Envelope(envelope_version=99).SerializeToString())


def test_cache_key_covers_model_version_dtype_shape_scope_and_bytes() -> None:
    cfg = Repository.load(ROOT / "models").resolve("digits")
    keys = CacheKeys(b"s" * 32)
    zeros = bytes(cfg.input_nbytes)
    found = {
        keys.input_key(cfg, zeros),
        keys.input_key(dataclasses.replace(cfg, version=cfg.version + 1), zeros),
        keys.input_key(dataclasses.replace(cfg, name="other"), zeros),
        keys.input_key(dataclasses.replace(cfg, input_dtype=tensor.DataType.DATA_TYPE_INT32), zeros),
        keys.input_key(dataclasses.replace(cfg, input_shape=(784,)), zeros),  # same bytes, other shape
        keys.input_key(cfg, zeros, "alice"),
        keys.input_key(cfg, b"\x01" + zeros[1:]),
    }
    assert len(found) == 7
    assert keys.input_key(cfg, zeros) == keys.input_key(cfg, bytearray(zeros))
    assert all(len(k) <= 250 and " " not in k for k in found)


def test_repository_loads_digits_and_resolves_versions() -> None:
    repo = Repository.load(ROOT / "models")
    cfg = repo.resolve("digits")
    assert cfg.version == max(repo.versions("digits"))
    assert cfg.request_shape == (1, 1, 28, 28)
    assert len(cfg.labels) == 10 and cfg.model_file.exists()
    with pytest.raises(errors.ModelNotFound):
        repo.resolve("digits", 12345)
    with pytest.raises(errors.ModelNotFound):
        repo.resolve("missing")


def test_validate_many_answers_as_validate_does_for_each_input() -> None:
    cfg = Repository.load(ROOT / "models").resolve("digits")
    rng = np.random.default_rng(3)
    good = [rng.random((1, 1, 28, 28), dtype=np.float32) for _ in range(5)]
    nan = good[0].copy()
    nan[0, 0, 5, 5] = np.nan
    short = tensor.to_proto(good[1])
    short.data = short.data[:-4]
    inputs = [
        tensor.to_proto(good[0]),
        tensor.to_proto(nan),
        tensor.to_proto(good[2].astype(np.float64)),  # wrong dtype
        short,  # wrong byte length
        tensor.to_proto(np.zeros((1, 1, 28, 27), np.float32)),  # wrong shape
        tensor.to_proto(good[3]),
        tensor.to_proto(np.full((1, 1, 28, 28), np.inf, np.float32)),
    ]
    checked = cfg.validate_many(inputs)
    assert len(checked) == len(inputs)
    for t, result in zip(inputs, checked, strict=True):
        try:
            expected = cfg.validate(t)
        except errors.InvalidInput as exc:
            assert isinstance(result, errors.InvalidInput) and str(result) == str(exc)
        else:
            assert isinstance(result, np.ndarray) and result.shape == cfg.request_shape
            np.testing.assert_array_equal(result, expected)
    assert [isinstance(r, np.ndarray) for r in checked] == [True, False, False, False, False, True, False]
    assert cfg.validate_many([]) == []


def test_validate_batch_takes_a_chunk_whole_and_names_its_nonfinite_rows() -> None:
    cfg = Repository.load(ROOT / "models").resolve("digits")
    x = np.random.default_rng(4).random((6, 1, 28, 28), dtype=np.float32)
    x[2, 0, 1, 1] = np.nan
    x[5, 0, 0, 0] = -np.inf
    rows, nonfinite = cfg.validate_batch(tensor.to_proto(x))
    np.testing.assert_array_equal(rows, x)
    assert nonfinite == [2, 5]
    empty, nonfinite = cfg.validate_batch(tensor.to_proto(x[:0]))
    assert empty.shape == (0, 1, 28, 28) and nonfinite == []
    short = tensor.to_proto(x)
    short.data = short.data[:-4]
    for bad in (tensor.to_proto(x.astype(np.float64)), tensor.to_proto(x[:, 0]), short):
        with pytest.raises(errors.InvalidInput):
            cfg.validate_batch(bad)


def test_validate_blocks_gives_each_input_whole_with_its_failed_rows() -> None:
    cfg = Repository.load(ROOT / "models").resolve("digits")
    x = np.random.default_rng(6).random((4, 1, 28, 28), dtype=np.float32)
    x[2, 0, 0, 0] = np.nan
    inputs = [
        tensor.to_proto(x[:1]),
        tensor.to_proto(x[1:]),  # three items, the second not finite
        tensor.to_proto(np.zeros((1, 1, 28, 27), np.float32)),  # one item that does not fit
        tensor.to_proto(np.zeros((28, 28), np.float32)),  # the wrong rank: one item
    ]
    assert [cfg.items_in(t) for t in inputs] == [1, 3, 1, 1]
    blocks = cfg.validate_blocks(inputs)
    assert [len(failed) for _, failed in blocks] == [0, 1, 1, 1]
    (first, _), (rows, failed), (none, wrong), (also_none, rank) = blocks
    assert first is not None and first.shape == cfg.request_shape
    np.testing.assert_array_equal(first, x[:1])
    assert rows is not None and rows.shape == (3, 1, 28, 28)
    np.testing.assert_array_equal(rows, x[1:])
    assert list(failed) == [1] and str(failed[1]) == "input contains NaN or infinite values"
    assert none is None and also_none is None
    assert list(wrong) == [0] and "shape" in str(wrong[0])
    # Rows claimed but not held are one error for the whole request, never one per row.
    for claim in (np.zeros((2, 1, 28, 27), np.float32), x[1:3].astype(np.float64)):
        with pytest.raises(errors.InvalidInput):
            cfg.items_in(tensor.to_proto(claim))
    hollow = tensor.to_proto(x[:1])
    hollow.shape[0], hollow.data = 1_000_000, b""
    with pytest.raises(errors.InvalidInput, match="needs 3136000000 bytes"):
        cfg.validate_blocks([inputs[0], hollow])
    assert list(rank) == [0] and "batch of 1" in str(rank[0])
    # Inputs of one item each take validate_many's single pass, and say the same.
    singles = [tensor.to_proto(x[i : i + 1]) for i in range(4)] + [inputs[3]]
    checked = cfg.validate_many(singles)
    for (block, why), c in zip(cfg.validate_blocks(singles), checked, strict=True):
        if isinstance(c, errors.InvalidInput):
            assert block is None and str(why[0]) == str(c)
        else:
            assert block is not None and not why
            np.testing.assert_array_equal(block, c)


def test_row_keys_are_the_keys_of_each_row_sent_alone() -> None:
    cfg = Repository.load(ROOT / "models").resolve("digits")
    x = np.random.default_rng(7).random((5, 1, 28, 28), dtype=np.float32)
    keys = CacheKeys(b"s" * 32)
    alone = [keys.input_key(cfg, tensor.to_proto(x[i : i + 1]).data) for i in range(5)]
    assert keys.row_keys(cfg, x) == alone and len(set(alone)) == 5
    assert keys.row_keys(cfg, x[1:4]) == alone[1:4]
    assert keys.row_keys(cfg, x[::2]) == alone[::2]  # strided rows are hashed by their values
    assert keys.row_keys(cfg, x[:0]) == []
    assert [keys.input_key(cfg, x[i].data) for i in range(5)] == alone


def test_large_buffers_stay_in_the_heap_on_glibc() -> None:
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt is glibc's")
    assert heap.keep_large_buffers()


def test_a_watch_looks_again_sooner_only_when_the_pace_says_the_job_ends_sooner() -> None:
    def look(total: int, finished: int, now: float, previous: tuple[float, int] | None) -> float:
        return next_look_s(0.2, total, finished, now, previous)

    assert look(1000, 100, 1.0, None) == 0.2  # no pace yet
    assert look(0, 100, 1.0, (0.9, 50)) == 0.2  # still uploading: total unknown
    assert look(1000, 100, 1.0, (0.9, 100)) == 0.2  # no progress since the last look
    assert look(1000, 500, 1.0, (0.9, 400)) == 0.2  # 500 left at 1000/s: 0.5 s
    assert look(1000, 950, 1.0, (0.9, 850)) == pytest.approx(0.05)  # 50 left at 1000/s
    assert look(1000, 999, 1.0, (0.9, 899)) == WATCH_MIN_INTERVAL_S  # never busier than this


def test_repository_rejects_bad_config(tmp_path: Path) -> None:
    version = tmp_path / "m" / "1"
    version.mkdir(parents=True)
    (version / "config.json").write_text(json.dumps({"input": {"dtype": "complex64", "shape": [3]}}))
    with pytest.raises(RepositoryError, match="complex64"):
        ModelConfig.from_file(version)
    (version / "config.json").write_text(json.dumps({"input": {"dtype": "float32", "shape": [0]}}))
    with pytest.raises(RepositoryError, match="shape"):
        Repository.load(tmp_path)


def test_status_mapping() -> None:
    assert code_for(errors.InvalidInput("x")) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_for(errors.ModelNotFound("x")) == grpc.StatusCode.NOT_FOUND
    assert code_for(errors.Overloaded("x")) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert code_for(errors.BackendUnavailable("x")) == grpc.StatusCode.UNAVAILABLE
    assert code_for(errors.DeadlineExceeded("x")) == grpc.StatusCode.DEADLINE_EXCEEDED
    assert code_for(KeyError("x")) == grpc.StatusCode.INTERNAL


def test_admission_refuses_when_the_backlog_cannot_meet_the_deadline() -> None:
    """Deadline-aware admission: the requests ahead plus one batch, at the recent answer
    rate, must fit in ADMIT_SHARE of the caller's budget."""
    from inferpool.api.admission import ADMIT_SHARE, Admission

    cfg = Repository.load(ROOT / "models").resolve("digits", 0)
    batch = cfg.max_batch_size
    admission = Admission()
    for _ in range(2 * batch):  # no deadline: only max_queue_size applies
        admission.admit(cfg)
    # As if this process had been sending for a whole rate window already.
    admission.backlog(cfg).since -= 2.0
    for _ in range(batch):  # half of them answered within the 2 s rate window
        admission.settle(cfg, answered=True)
    # `batch` still waiting at `batch / 2` answers/s: a new call waits for them and
    # its own batch, 4 s, and is let in only with 4 s <= ADMIT_SHARE * budget.
    fits_s = (batch + batch) / (batch / 2.0) / ADMIT_SHARE
    admission.admit(cfg, budget_s=fits_s * 1.05)
    admission.settle(cfg)  # that caller gave up: `batch` waiting again
    with pytest.raises(errors.Overloaded, match="too close to the"):
        admission.admit(cfg, budget_s=fits_s * 0.95)
    assert admission.rejected == 1 and admission.backlog(cfg).waiting == batch


def test_result_bytes_are_the_messages_serialized() -> None:
    rng = np.random.default_rng(11)
    assert codec.scores_bytes(np.zeros(0, np.float32)) == envelope_pb2.Scores().SerializeToString()
    # One-byte lengths up to 31 classes, two-byte varints from 32.
    for classes in (1, 10, 31, 32, 33, 1000):
        for row in rng.random((3, classes), dtype=np.float32):
            scores = envelope_pb2.Scores(values=row.tolist())
            reply = envelope_pb2.Reply(status=envelope_pb2.Reply.STATUS_OK, scores=scores)
            assert codec.scores_bytes(row) == scores.SerializeToString()
            assert codec.ok_reply_bytes(codec.scores_bytes(row)) == reply.SerializeToString()
            parsed = envelope_pb2.Reply.FromString(codec.ok_reply_bytes(codec.scores_bytes(row)))
            assert list(parsed.scores.values) == row.tolist()
    # A float64 or strided row is written as the float32 values the message would hold.
    wide = rng.random((4, 10))[:, 0]
    assert codec.scores_bytes(wide) == envelope_pb2.Scores(values=wide.tolist()).SerializeToString()
    # A whole batch at once: the same bytes as row by row, float64 and strided included.
    for rows in (
        rng.random((5, 10), dtype=np.float32),
        rng.random((3, 40)),
        rng.random((4, 2000), dtype=np.float32)[:, ::2],
        np.zeros((2, 0), np.float32),
        np.zeros((0, 10), np.float32),
    ):
        scores, replies = codec.ok_results(rows)
        assert scores == [codec.scores_bytes(row) for row in rows]
        assert replies == [codec.ok_reply_bytes(s) for s in scores]


def test_ids_are_unique_32_hex_digits_and_a_forked_child_draws_its_own() -> None:
    from inferpool.api.core import new_id

    ids = [new_id() for _ in range(10_000)]
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch("[0-9a-f]{32}", i) for i in ids)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next id must not be one its parent hands out
        os.write(write, new_id().encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    child = os.read(read, 64).decode()
    os.close(read)
    parent = [new_id() for _ in range(3)]
    assert len(child) == 32 and child not in parent
    assert child[:16] != parent[0][:16]


def test_top_classes_orders_by_score_then_index_on_both_paths() -> None:
    from inferpool.api.core import SMALL_OUTPUT, top_classes

    cfg = Repository.load(ROOT / "models").resolve("digits", 0)
    small = [0.1, 0.3, 0.3, 0.05, 0.05, 0.0, 0.1, 0.05, 0.05, 0.0]
    assert [c.index for c in top_classes(cfg, small, 4)] == [1, 2, 0, 6]
    assert [c.label for c in top_classes(cfg, small, 1)] == ["1"]
    assert len(top_classes(cfg, small, 50)) == len(small)
    rng = np.random.default_rng(5)
    big = rng.random(SMALL_OUTPUT * 4).astype(np.float32)
    big[[9, 3, 200]] = 2.0  # a three-way tie at the top
    expected = sorted(range(len(big)), key=lambda i: (-big[i], i))[:6]
    assert [c.index for c in top_classes(cfg, big.tolist(), 6)] == expected
    assert [c.index for c in top_classes(cfg, big[:SMALL_OUTPUT].tolist(), 6)] == sorted(
        range(SMALL_OUTPUT), key=lambda i: (-big[i], i)
    )[:6]


def test_local_cache_evicts_least_recently_used_and_expires(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]
    monkeypatch.setattr(front_cache.time, "monotonic", lambda: now[0])
    cache = LocalCache(max_items=2, ttl_s=10)
    a, b, c = (envelope_pb2.Scores(values=[v]) for v in (0.1, 0.2, 0.3))
    cache.put("a", a)
    cache.put("b", b)
    assert cache.get("a") is a  # now the most recently used
    cache.put("c", c)
    assert cache.get("b") is None and cache.get("a") is a and cache.get("c") is c
    now[0] += 10
    assert cache.get("a") is None and len(cache) == 1
    off = LocalCache(max_items=0, ttl_s=10)
    off.put("a", a)
    assert off.get("a") is None and len(off) == 0


def test_a_replaced_setting_stops_the_start_with_its_new_name() -> None:
    expected = "INFERPOOL_HTTP_ACCESS_LOG is no longer read: use INFERPOOL_ACCESS_LOG"
    with pytest.raises(SettingsError, match=expected):
        Settings.from_env({"INFERPOOL_HTTP_ACCESS_LOG": "true"})
    assert Settings.from_env({"INFERPOOL_ACCESS_LOG": "true"}).access_log
