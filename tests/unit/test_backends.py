"""The model backends without servers: the three forms of the digits model agree, a model
that cannot serve fails at load naming model, file and mismatch, precision, the cache."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from inferpool.repository import ModelConfig, Repository, RepositoryError
from inferpool.workers.backends import LoadOptions, ModelLoadError
from inferpool.workers.runtime import ModelRunner

ROOT = Path(__file__).resolve().parents[2]
MODELS = {"digits": "torchscript", "digits_export": "torch_export", "digits_onnx": "onnxruntime"}
# The largest difference of one class probability between the forms, all at fp32: float
# rounding in differently fused kernels, four orders of magnitude below a decision.
AGREEMENT_ATOL = 1e-4
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def heldout() -> tuple[np.ndarray, np.ndarray]:
    data = np.load(ROOT / "models" / "digits" / "heldout.npz")
    return data["x"].astype(np.float32), data["y"]


def copy_model(tmp_path: Path, name: str, new_name: str | None = None, **config: object) -> ModelConfig:
    """A copy of a shipped model under tmp_path (renamed, its config changed)."""
    new_name = new_name or name
    folder = tmp_path / new_name / "1"
    shutil.copytree(ROOT / "models" / name / "1", folder)
    raw = json.loads((folder / "config.json").read_text())
    raw.update(name=new_name, **config)
    (folder / "config.json").write_text(json.dumps(raw))
    return ModelConfig.from_file(folder)


def test_repository_ships_each_backend() -> None:
    repo = Repository.load(ROOT / "models")
    assert {name: repo.resolve(name).platform for name in MODELS} == MODELS
    assert repo.resolve("digits_export").model_file.name == "model.pt2"
    assert repo.resolve("digits_onnx").model_file.name == "model.onnx"


def test_three_forms_agree_on_the_heldout_set(heldout: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = heldout
    repo = Repository.load(ROOT / "models")
    probs = {}
    for name in MODELS:
        runner = ModelRunner(repo.resolve(name), CPU)
        runner.warm_up(repeats=1)
        probs[name] = np.concatenate([runner.run(x[i : i + 64]) for i in range(0, len(x), 64)])
    reference = probs["digits"]
    assert float((reference.argmax(1) == y).mean()) >= 0.95
    for name in ("digits_export", "digits_onnx"):
        assert (probs[name].argmax(1) == reference.argmax(1)).all(), name
        assert np.abs(probs[name] - reference).max() <= AGREEMENT_ATOL, name
        assert np.allclose(probs[name].sum(1), 1.0, atol=1e-5)


@pytest.mark.parametrize("name", list(MODELS))
def test_missing_file_names_model_and_file(tmp_path: Path, name: str) -> None:
    cfg = copy_model(tmp_path, name, "broken")
    cfg.model_file.unlink()
    with pytest.raises(ModelLoadError) as err:
        ModelRunner(cfg, CPU)
    assert str(err.value) == f"model broken v1 ({MODELS[name]}): {cfg.model_file}: model file is missing"


@pytest.mark.parametrize("name", list(MODELS))
def test_corrupt_file_names_model_and_file(tmp_path: Path, name: str) -> None:
    cfg = copy_model(tmp_path, name, "broken")
    cfg.model_file.write_bytes(cfg.model_file.read_bytes()[:5000])
    with pytest.raises(ModelLoadError) as err:
        ModelRunner(cfg, CPU)
    message = str(err.value)
    assert message.startswith(f"model broken v1 ({MODELS[name]}): {cfg.model_file}: "), message


@pytest.mark.parametrize("name", list(MODELS))
def test_input_shape_disagreeing_with_config(tmp_path: Path, name: str) -> None:
    cfg = copy_model(
        tmp_path, name, "broken", input={"name": "image", "dtype": "float32", "shape": [1, 32, 32]}
    )
    with pytest.raises(ModelLoadError) as err:
        ModelRunner(cfg, CPU)
    message = str(err.value)
    assert message.startswith(f"model broken v1 ({MODELS[name]}): {cfg.model_file}: "), message
    if name == "digits":  # TorchScript declares no signature: the trial batch fails
        assert "fails on input [1, 1, 32, 32] float32 as the config declares" in message
    else:
        assert "input shape [n, 1, 28, 28] does not match the config's [n, 1, 32, 32]" in message


@pytest.mark.parametrize("name", ["digits_export", "digits_onnx"])
def test_input_dtype_disagreeing_with_config(tmp_path: Path, name: str) -> None:
    cfg = copy_model(
        tmp_path, name, "broken", input={"name": "image", "dtype": "float64", "shape": [1, 28, 28]}
    )
    with pytest.raises(ModelLoadError, match="does not match the config's float64"):
        ModelRunner(cfg, CPU)


@pytest.mark.parametrize("name", list(MODELS))
def test_output_size_disagreeing_with_labels(tmp_path: Path, name: str) -> None:
    cfg = copy_model(tmp_path, name, "broken", labels=["a", "b", "c"])
    with pytest.raises(ModelLoadError, match="output size 10 does not match the config's 3 labels"):
        ModelRunner(cfg, CPU)


def test_unknown_platform_or_precision_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(RepositoryError, match="platform must be one of"):
        copy_model(tmp_path, "digits", "a", platform="tensorrt")
    with pytest.raises(RepositoryError, match="precision must be one of"):
        copy_model(tmp_path, "digits", "b", precision="int4")


@pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="this CPU has no bf16")
@pytest.mark.parametrize("name", ["digits", "digits_export"])
def test_bf16_on_cpu_agrees_with_fp32(
    tmp_path: Path, name: str, heldout: tuple[np.ndarray, np.ndarray]
) -> None:
    x, _ = heldout
    runner = ModelRunner(copy_model(tmp_path, name, precision="bf16"), CPU)
    fp32 = ModelRunner(Repository.load(ROOT / "models").resolve(name), CPU)
    got, want = runner.run(x[:64]), fp32.run(x[:64])
    assert got.dtype == np.float32
    assert not np.array_equal(got, want)  # it did run in bf16
    assert (got.argmax(1) == want.argmax(1)).mean() >= 0.98
    assert np.abs(got - want).max() <= 0.06


def test_fp16_on_cpu_agrees_with_fp32(tmp_path: Path, heldout: tuple[np.ndarray, np.ndarray]) -> None:
    x, _ = heldout
    runner = ModelRunner(copy_model(tmp_path, "digits_export", precision="fp16"), CPU)
    want = ModelRunner(Repository.load(ROOT / "models").resolve("digits_export"), CPU).run(x[:64])
    got = runner.run(x[:64])
    assert not np.array_equal(got, want)
    assert np.abs(got - want).max() <= 0.02


def test_onnxruntime_refuses_a_reduced_precision(tmp_path: Path) -> None:
    cfg = copy_model(tmp_path, "digits_onnx", precision="fp16")
    with pytest.raises(ModelLoadError, match="precision fp16: onnxruntime runs the types in the file"):
        ModelRunner(cfg, CPU)


def test_onnx_optimised_graph_is_cached_and_reused(
    tmp_path: Path, heldout: tuple[np.ndarray, np.ndarray]
) -> None:
    cfg = copy_model(tmp_path / "repo", "digits_onnx")
    cache = tmp_path / "cache"
    first = ModelRunner(cfg, CPU, LoadOptions(cache, 1))
    (entry,) = cache.iterdir()
    assert entry.name.startswith("digits_onnx-v1-") and f"-{torch.device('cpu')}-fp32-ort" in entry.name
    cached = entry / "model.onnx"
    assert cached.stat().st_size > 0
    mtime = cached.stat().st_mtime_ns
    second = ModelRunner(cfg, CPU, LoadOptions(cache, 1))
    assert cached.stat().st_mtime_ns == mtime  # read, not written again
    x = heldout[0][:16]
    assert np.allclose(first.run(x), second.run(x), atol=1e-6)
    # A damaged entry is replaced, not fatal.
    cached.write_bytes(b"not onnx")
    third = ModelRunner(cfg, CPU, LoadOptions(cache, 1))
    assert np.allclose(third.run(x), first.run(x), atol=1e-6)


def test_cache_key_changes_with_the_model_file(tmp_path: Path) -> None:
    from inferpool.workers.backends.base import cache_key

    cfg = copy_model(tmp_path, "digits_onnx")
    before = cache_key(cfg, "cpu", "1.0")
    assert cache_key(cfg, "cuda:0", "1.0") != before
    assert cache_key(cfg, "cpu", "1.1") != before
    cfg.model_file.write_bytes(cfg.model_file.read_bytes() + b"\0")
    assert cache_key(cfg, "cpu", "1.0") != before


def test_a_worker_serving_only_onnx_models_never_imports_torch(tmp_path: Path) -> None:
    copy_model(tmp_path, "digits_onnx")
    script = f"""
import sys
from pathlib import Path
import inferpool.workers.app, inferpool.workers.main
from inferpool.repository import Repository
from inferpool.workers.runtime import ModelRunner, configure_threads, needs_torch, pick_device
configs = Repository.load(Path({str(tmp_path)!r})).all()
use_torch = needs_torch(configs)
configure_threads(1, use_torch)
runner = ModelRunner(configs[0], pick_device("cpu", use_torch))
runner.warm_up(repeats=1)
print(use_torch, "torch" in sys.modules, runner.run(runner._sample(2)).shape)
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["False", "False", "(2,", "10)"]
