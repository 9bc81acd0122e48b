"""The README's fenced code blocks, each with the ``<!-- readme-test: ... -->`` note that says how the
test suite runs it. A block without a note is an error, so no block can go untested."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"
_BLOCK = re.compile(r"(?:<!-- readme-test: (?P<note>.+?) -->\n)?```(?P<lang>\w*)\n(?P<code>.*?)\n```", re.S)


@dataclass(frozen=True)
class Block:
    note: str | None
    lang: str
    code: str
    line: int


def blocks() -> list[Block]:
    text = README.read_text()
    return [Block(m["note"], m["lang"], m["code"], text.count("\n", 0, m.start()) + 1)
            for m in _BLOCK.finditer(text)]


def block(note: str) -> Block:
    found = [b for b in blocks() if b.note == note]
    assert len(found) == 1, f"README has {len(found)} blocks noted {note!r}"
    return found[0]


def commands(code: str) -> list[str]:
    """Shell commands of a block: continuation lines joined, comments and blank lines dropped."""
    joined = code.replace("\\\n", " ")
    out = []
    for line in joined.splitlines():
        line = re.sub(r"\s+#.*$", "", line).strip()
        if line and not line.startswith("#"):
            out.append(line)
    return out
