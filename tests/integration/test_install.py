"""The base install (no extras) is a working client and CLI that imports only what it declares.

`pip install .` gives the client SDK and the `inferpool` command; celery, redis,
pymemcache and torch come only with the `api` / `worker` extras, so nothing the client
or the CLI imports may need them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.servers import ApiThread

ROOT = Path(__file__).resolve().parents[2]

# Top-level modules that only the server extras bring (or that are the server itself).
SERVER_ONLY = (
    "celery",
    "kombu",
    "redis",
    "pymemcache",
    "aiomcache",
    "torch",
    "prometheus_client",
    "opentelemetry",
)

CHECK = f"""
import json, sys
import inferpool.client, inferpool.cli
loaded = sorted({{m.split(".")[0] for m in sys.modules}} & set({SERVER_ONLY!r}))
print(json.dumps({{"loaded": loaded, "from": inferpool.__file__}}))
"""


def test_client_and_cli_import_no_server_dependency() -> None:
    """The same check in the dev venv, where those packages are installed and would be
    imported if anything reached for them: seconds, where the fresh venv takes a minute."""
    run = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["loaded"] == []


@pytest.mark.timeout(900)
def test_base_install_in_a_fresh_venv(
    api: ApiThread, heldout: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    """`pip install .` (the declared dependencies, nothing else) into a new venv, then the
    import check, `inferpool --help`, and a real Classify through the installed CLI."""
    # A copy, so that the build's egg-info and build/ land in it, not in the checkout
    # (where two test runs would race on them).
    src = tmp_path / "src"
    shutil.copytree(
        ROOT,
        src,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", "__pycache__", "*.egg-info", "build", "dist", "*_cache"
        ),
    )
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python, inferpool = venv / "bin" / "python", venv / "bin" / "inferpool"
    # Nothing of this checkout or the dev venv on the path: only what the install put there.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "-c", str(src / "constraints.txt"), str(src)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=tmp_path,
    )
    assert install.returncode == 0, install.stderr[-4000:]

    run = subprocess.run(
        [str(python), "-c", CHECK], capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path
    )
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["loaded"] == []
    assert Path(report["from"]).is_relative_to(venv)

    run = subprocess.run([str(inferpool), "--help"], capture_output=True, text=True, timeout=60, env=env)
    assert run.returncode == 0 and "classify" in run.stdout, run.stderr

    x, y = heldout
    np.save(tmp_path / "some.npy", x[:5])
    run = subprocess.run(
        [str(inferpool), "--target", api.target, "classify", str(tmp_path / "some.npy"), "--model", "digits"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert run.returncode == 0, run.stderr
    rows = [json.loads(line) for line in run.stdout.splitlines()]
    assert [r["index"] for r in rows] == list(range(5))
    assert sum(r["classes"][0]["index"] == label for r, label in zip(rows, y[:5], strict=True)) >= 4
