"""How tests/integration/test_readme.py finds the README's examples: its parser and the
README's own shape, without servers."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

README = ROOT / "README.md"

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
