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
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from inferpool.client import Client
from tests.servers import ApiThread

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DEFAULT_TARGET = "127.0.0.1:50051"
NORUN = "<!-- norun -->"
SHELLS = ("sh", "bash", "console", "shell")

pytestmark = pytest.mark.timeout(180)


@dataclass(frozen=True)
class Block:
    lang: str
    line: int  # of the opening fence, 1-based
    code: str
    section: int = 0  # how many headings came before it

    @property
    def id(self) -> str:
        return f"{self.lang}-L{self.line}"


def blocks(text: str) -> list[Block]:
    """The fenced blocks of a Markdown text not marked <!-- norun -->."""
    found: list[Block] = []
    lines = text.splitlines()
    i = section = 0
    while i < len(lines):
        match = re.match(r"^(\s*)(```+|~~~+)\s*([\w+-]*)", lines[i])
        if not match:
            section += bool(re.match(r"^#{1,6} ", lines[i]))
            i += 1
            continue
        fence, lang, start = match.group(2), match.group(3).lower(), i
        body: list[str] = []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i])
            i += 1
        i += 1  # the closing fence
        before = next((lines[j].strip() for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        if before != NORUN:
            found.append(Block(lang, start + 1, "\n".join(body) + "\n", section))
    return found


def cli_lines(block: Block) -> list[str]:
    return [line.strip() for line in block.code.splitlines() if line.strip().startswith("inferpool ")]


def _readme_blocks() -> list[Block]:
    return blocks(README.read_text())


PYTHON_BLOCKS = [b for b in _readme_blocks() if b.lang in ("python", "py")]
CLI_BLOCKS = [b for b in _readme_blocks() if b.lang in SHELLS and cli_lines(b)]


def test_the_parser_finds_fenced_blocks_and_honours_norun() -> None:
    text = "\n".join(
        [
            "```python",
            "print(1)",
            "```",
            NORUN,
            "",
            "```python",
            "raise SystemExit(1)",
            "```",
            "## Next",
            "~~~sh",
            "inferpool job JOB_ID  # status",
            "# not a heading inside a block",
            "~~~",
        ]
    )
    found = blocks(text)
    assert [(b.lang, b.line, b.code, b.section) for b in found] == [
        ("python", 1, "print(1)\n", 0),
        ("sh", 10, "inferpool job JOB_ID  # status\n# not a heading inside a block\n", 1),
    ]
    assert cli_lines(found[1]) == ["inferpool job JOB_ID  # status"]


def test_the_readme_has_runnable_examples() -> None:
    assert PYTHON_BLOCKS, "README.md has no ```python example"
    assert CLI_BLOCKS, "README.md has no `inferpool ...` command in a ```sh block"


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
