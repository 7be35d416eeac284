"""Packaging rules that keep deployments small and the contract honest."""

from __future__ import annotations

import filecmp
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "protos" / "inferpool" / "v1"
GENERATED = ROOT / "inferpool" / "v1"


def test_api_imports_no_torch_and_no_workers() -> None:
    code = (
        "import sys, api.server, api.core, inferpool.client\n"
        "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'workers')))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)


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

    kserve_proto = ROOT / "protos" / "inferpool" / "kserve" / "v2" / "grpc_predict_v2.proto"
    assert protoc.main([*base, f"--grpc_python_out={tmp_path}", str(kserve_proto)]) == 0
    fresh, generated = tmp_path / "inferpool" / "kserve" / "v2", ROOT / "inferpool" / "kserve" / "v2"
    names = sorted(p.name for p in fresh.iterdir())
    assert names == sorted(p.name for p in generated.glob("*_pb2*")), "run `make proto`"
    _, mismatch, errors = filecmp.cmpfiles(fresh, generated, names, shallow=False)
    assert not mismatch and not errors, f"stale generated code {mismatch + errors}: run `make proto`"
