"""Packaging rules that keep deployments small and the contract honest."""

from __future__ import annotations

import ast
import filecmp
import importlib.metadata
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

ROOT = Path(__file__).resolve().parents[2]
PROTO_DIR = ROOT / "protos" / "inferpool" / "v1"
GENERATED = ROOT / "inferpool" / "v1"


def test_api_imports_no_torch_and_no_workers() -> None:
    code = (
        "import sys, inferpool.api.server, inferpool.api.core, inferpool.client\n"
        "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'workers',"
        " 'inferpool.workers', 'api')))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)


def _python_sources(root: Path) -> Iterator[Path]:
    """Every hand-written .py file of the tree, each once (links are not followed)."""
    skip = {"build", "dist", "node_modules", "__pycache__"}
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in skip and not d.startswith(".")]
        yield from (Path(folder, n) for n in names if n.endswith(".py") and "_pb2" not in n)


def _imported_roots(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    roots: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def test_everything_imports_through_the_inferpool_root() -> None:
    """`api` and `workers` are folders, not packages: importing them by their bare names would
    load a second copy of each module (two metric registries, two settings) beside
    `inferpool.api` and `inferpool.workers`, and collide with other projects' `api`."""
    sources = list(_python_sources(ROOT))
    assert len(sources) > 100
    offenders = sorted(str(f.relative_to(ROOT)) for f in sources if {"api", "workers"} & _imported_roots(f))
    assert not offenders, f"import inferpool.api / inferpool.workers instead: {offenders}"
    names = {p.name: p.resolve() for p in (ROOT / "inferpool").iterdir() if p.is_symlink()}
    assert names == {"api": ROOT / "api", "workers": ROOT / "workers"}


def test_generated_code_matches_proto(tmp_path: Path) -> None:
    """The committed _pb2 files are what `make proto` produces from protos/."""
    from grpc_tools import protoc

    # `python -m grpc_tools.protoc` adds the well-known types' include dir itself; main() does not.
    well_known = Path(protoc.__file__).parent / "_proto"
    base = [
        "grpc_tools.protoc",
        f"-I{ROOT / 'protos'}",
        f"-I{well_known}",
        f"--python_out={tmp_path}",
        f"--pyi_out={tmp_path}",
    ]
    plain = [str(PROTO_DIR / "tensor.proto"), str(PROTO_DIR / "envelope.proto")]
    assert protoc.main([*base, *plain]) == 0
    grpc_protos = [str(PROTO_DIR / "inference.proto"), str(PROTO_DIR / "jobs.proto")]
    grpc_args = [*base, f"--grpc_python_out={tmp_path}", *grpc_protos]
    assert protoc.main(grpc_args) == 0
    fresh = tmp_path / "inferpool" / "v1"
    names = sorted(p.name for p in fresh.iterdir())
    committed = sorted(p.name for p in GENERATED.glob("*_pb2*"))
    assert names == committed, "run `make proto`"
    _, mismatch, errors = filecmp.cmpfiles(fresh, GENERATED, names, shallow=False)
    assert not mismatch and not errors, f"stale generated code {mismatch + errors}: run `make proto`"

    # Triton's GRPCInferenceService (the KServe v2 protocol's superset): model_config has no service.
    triton_protos = ROOT / "protos" / "inferpool" / "triton"
    assert protoc.main([*base, str(triton_protos / "model_config.proto")]) == 0
    service = str(triton_protos / "grpc_service.proto")
    assert protoc.main([*base, f"--grpc_python_out={tmp_path}", service]) == 0
    fresh, generated = tmp_path / "inferpool" / "triton", ROOT / "inferpool" / "triton"
    names = sorted(p.name for p in fresh.iterdir())
    assert names == sorted(p.name for p in generated.glob("*_pb2*")), "run `make proto`"
    _, mismatch, errors = filecmp.cmpfiles(fresh, generated, names, shallow=False)
    assert not mismatch and not errors, f"stale generated code {mismatch + errors}: run `make proto`"


def _embedded_descriptor(path: Path) -> descriptor_pb2.FileDescriptorProto:
    """The FileDescriptorProto a generated _pb2.py registers, read without importing it."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "AddSerializedFile":
            arg = node.args[0]
            assert isinstance(arg, ast.Constant) and isinstance(arg.value, bytes)
            return descriptor_pb2.FileDescriptorProto.FromString(arg.value)
    raise AssertionError(f"no AddSerializedFile in {path}")


@pytest.mark.parametrize(("ours", "theirs"), [("grpc_service", "service"), ("model_config", "model_config")])
def test_triton_protos_match_tritonclient(ours: str, theirs: str) -> None:
    """protos/inferpool/triton/ is Triton's contract as tritonclient ships it (reconstructed
    from its descriptors: see the README there): the same descriptor but for the file
    names. Parsed, not imported: the two cannot share protobuf's default pool."""
    try:
        dist = importlib.metadata.distribution("tritonclient")
    except importlib.metadata.PackageNotFoundError:
        pytest.fail("tritonclient is not installed: it is a dev dependency (pip install -e .[dev])")
    # Compared with whatever version is installed: a release that changed the contract
    # fails here, naming itself, instead of skipping.
    where = f"vendored from tritonclient 2.41.0, installed {dist.version}"
    mine = _embedded_descriptor(ROOT / "inferpool" / "triton" / f"{ours}_pb2.py")
    upstream = _embedded_descriptor(Path(str(dist.locate_file(f"tritonclient/grpc/{theirs}_pb2.py"))))
    assert mine.name == f"inferpool/triton/{ours}.proto"
    assert [d.rpartition("/")[2] for d in mine.dependency] == list(upstream.dependency), where
    mine.name = upstream.name
    del mine.dependency[:]
    mine.dependency.extend(upstream.dependency)
    assert mine.SerializeToString(deterministic=True) == upstream.SerializeToString(deterministic=True), where
