"""Quality metrics the bundled code LM supports: diversity (distinct-n) and coherence (syntax validity)."""

from __future__ import annotations

import ast
import io
import tokenize
from collections.abc import Sequence


def distinct_n(sequences: Sequence[Sequence[int]], n: int = 2) -> float:
    """Unique n-grams / total n-grams pooled over all sequences (Li et al., 2016); 0 when there are none."""
    grams = [tuple(seq[i:i + n]) for seq in sequences for i in range(len(seq) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def first_logical_line(prompt: str, completion: str) -> str | None:
    """The completion cut at the end of the logical line it continues, or None if it never ends there.

    Python's own tokenizer decides where the line ends, so brackets and strings spanning physical lines
    are handled; a completion that is cut off or breaks tokenization mid-line gives None.
    """
    text = prompt + completion
    start = len(prompt)
    line_offsets = [0]
    for line in text.splitlines(keepends=True):
        line_offsets.append(line_offsets[-1] + len(line))
    try:
        for tok in tokenize.generate_tokens(io.StringIO(text).readline):
            if tok.type == tokenize.NEWLINE:
                end = line_offsets[tok.end[0] - 1] + tok.end[1]
                if end > start:
                    return completion[: end - start]
    except (tokenize.TokenError, IndentationError, SyntaxError):
        return None
    return None


def statement_is_valid(prompt: str, completion: str) -> bool:
    """Does ``prompt`` + the completion's first logical line parse as Python?

    A line that opens a block (``for x in y:``) gets a ``pass`` body, so it is judged on its own syntax.
    """
    line = first_logical_line(prompt, completion)
    if line is None:
        return False
    source = prompt + line
    try:
        ast.parse(source)
        return True
    except SyntaxError:
        pass
    last = source.rstrip("\n").splitlines()[-1]
    indent = last[: len(last) - len(last.lstrip())]
    try:
        ast.parse(source.rstrip("\n") + "\n" + indent + "    pass\n")
        return True
    except SyntaxError:
        return False
