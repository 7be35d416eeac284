"""The README's examples, executed against a real stack (the session's Redis,
Memcached, worker and API).

Convention (what the README's author controls):
- every fenced block tagged ```python runs as a `python` process from the repository
  root, after the ```python blocks before it in the same section (under the same
  heading), as a reader would run them in one session, with the default address
  `127.0.0.1:50051` replaced by the test API's; it must exit 0 within the time limit;
- every line of a ```sh / ```bash / ```console block that starts with `inferpool `
  runs (through a shell, `#` comments allowed) in a scratch directory holding
  `images.npy` (16 held-out digits), with INFERPOOL_TARGET naming the test API and the
  placeholder JOB_ID replaced by the id of a finished job; each must exit 0;
- a block preceded by the line `<!-- norun -->` (blank lines between allowed) is not
  run: for examples that need what tests do not have (Docker, a GPU, a deployment).
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from inferpool.client import Client
from tests.servers import ApiThread
from tests.unit.test_readme import (
    CLI_BLOCKS,
    PYTHON_BLOCKS,
    ROOT,
    Block,
    cli_lines,
)

DEFAULT_TARGET = "127.0.0.1:50051"


pytestmark = pytest.mark.timeout(180)


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=[b.id for b in PYTHON_BLOCKS])
def test_python_example(block: Block, api: ApiThread, tmp_path: Path) -> None:
    before = [b.code for b in PYTHON_BLOCKS if b.section == block.section and b.line < block.line]
    script = tmp_path / "example.py"
    script.write_text("\n".join([*before, block.code]).replace(DEFAULT_TARGET, api.target))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "INFERPOOL_TARGET": api.target}
    run = subprocess.run(
        [sys.executable, str(script)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, f"README.md line {block.line}:\n{block.code}\n{run.stderr[-3000:]}"


def _inferpool_command() -> str:
    """The installed console script, else the module (a checkout without an install)."""
    script = shutil.which("inferpool", path=str(Path(sys.executable).parent))
    return shlex.quote(script) if script else f"{shlex.quote(sys.executable)} -m inferpool.cli"


@pytest.mark.parametrize("block", CLI_BLOCKS, ids=[b.id for b in CLI_BLOCKS])
def test_cli_example(
    block: Block,
    api: ApiThread,
    client: Client,
    heldout: tuple[np.ndarray, np.ndarray],
    tmp_path: Path,
) -> None:
    x = heldout[0][:16]
    np.save(tmp_path / "images.npy", x)
    job = client.submit(x, "digits")
    job.wait(timeout_s=60)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "INFERPOOL_TARGET": api.target}
    for line in cli_lines(block):
        command = _inferpool_command() + line.removeprefix("inferpool").replace("JOB_ID", job.id)
        run = subprocess.run(
            ["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
        )
        assert run.returncode == 0, f"README.md line {block.line}: {line}\n{run.stderr[-3000:]}"
