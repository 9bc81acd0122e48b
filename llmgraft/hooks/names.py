"""Telling a typo from an unrelated name, for "did you mean" errors.

Two names are *close* when their edit distance (insertions, deletions, substitutions, and swaps of two
neighbouring letters, each one edit) is at most 1 for names of up to 5 characters and at most 2 for
longer ones; names of 1-2 characters match only exactly. The length is the known name's.
"""

from __future__ import annotations

from collections.abc import Iterable


def edit_distance(a: str, b: str) -> int:
    """Optimal string alignment distance: Levenshtein plus adjacent transpositions."""
    rows = [list(range(len(b) + 1))]
    for i in range(1, len(a) + 1):
        row = [i] + [0] * len(b)
        for j in range(1, len(b) + 1):
            cost = a[i - 1] != b[j - 1]
            row[j] = min(rows[-1][j] + 1, row[j - 1] + 1, rows[-1][j - 1] + cost)
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                row[j] = min(row[j], rows[-2][j - 2] + 1)
        rows.append(row)
    return rows[-1][len(b)]


def allowed_distance(name: str) -> int:
    return 0 if len(name) <= 2 else 1 if len(name) <= 5 else 2


def is_close(key: str, name: str) -> bool:
    """Is ``key`` a plausible misspelling of ``name`` (and not ``name`` itself)?"""
    limit = allowed_distance(name)
    return key != name and limit > 0 and abs(len(key) - len(name)) <= limit and edit_distance(key, name) <= limit


def closest(key: str, names: Iterable[str]) -> str | None:
    """The known name ``key`` is closest to, if it is close to any."""
    candidates = [(edit_distance(key, n), n) for n in names if is_close(key, n)]
    return min(candidates)[1] if candidates else None


def quant_method_name(scheme: str) -> str:
    """The ``quantization_config.quant_method`` (and vLLM ``-q``) name of a quant scheme: ``llmgraft-w4a16``."""
    return "llmgraft-" + scheme.replace("_", "-")
