"""The Python standard library's own source, as an offline text corpus.

Every machine that runs Python has it on disk, so models and tokenizers built from it need no hub. The
corpus is split by top-level package: a few packages are held out entirely, so held-out loss measures
generalisation to unseen modules rather than memorisation.
"""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path

#: Top-level stdlib packages/modules never trained on; their loss is the held-out metric.
HELDOUT_PACKAGES = ("json", "html", "wsgiref", "xmlrpc", "csv.py", "tomllib", "urllib")

#: Trees that are third-party, vendored or generated code (not stdlib style), so skipped.
_SKIPPED = {"site-packages", "ensurepip", "__pycache__", "pydoc_data", "encodings"}


def stdlib_root() -> Path:
    """Directory holding the pure-Python standard library of the running interpreter."""
    return Path(sysconfig.get_paths()["stdlib"])


def package_of(path: Path, root: Path | None = None) -> str:
    """Top-level package (or module file name) a stdlib file belongs to, e.g. ``email`` or ``csv.py``."""
    return path.relative_to(root or stdlib_root()).parts[0]


def stdlib_files(split: str = "train", packages: tuple[str, ...] | None = None) -> list[Path]:
    """Sorted stdlib ``.py`` files of one split: ``train``, ``heldout`` or ``all``.

    ``packages`` restricts the listing to those top-level packages (used for per-package "tasks").
    """
    if split not in ("train", "heldout", "all"):
        raise ValueError(f"split must be 'train', 'heldout' or 'all', not {split!r}")
    root = stdlib_root()
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIPPED)
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            path = Path(dirpath) / name
            package = package_of(path, root)
            if packages is not None and package not in packages:
                continue
            held = package in HELDOUT_PACKAGES
            if split == "all" or (split == "heldout") == held:
                files.append(path)
    return sorted(files)


def read_texts(files: list[Path]) -> list[str]:
    """File contents, skipping files that are not valid UTF-8."""
    texts = []
    for path in files:
        try:
            texts.append(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            continue
    return texts
