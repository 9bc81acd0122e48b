"""Crash-safe writers: outputs appear whole or not at all."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import tempfile
from pathlib import Path


@contextlib.contextmanager
def atomic_directory(target: str | Path):
    """Yield a temp dir beside ``target``; on success rename it into place, replacing any old copy.

    A crash or exception leaves ``target`` untouched and removes the partial temp dir. A process killed
    outright (SIGKILL, OOM) cannot clean up: its temp dir carries its pid, and the next write of the same
    target removes the temp dirs of processes that no longer exist.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_orphans(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the result should look like any other directory
    try:
        yield tmp
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _remove_orphans(target: Path) -> None:
    """Remove ``target``'s temp dirs left by processes that have died (their pid is in the name)."""
    for stale in target.parent.glob(f"{glob.escape(f'.{target.name}')}.tmp-*-*"):
        pid = stale.name[len(f".{target.name}.tmp-"):].split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(stale, ignore_errors=True)
        except PermissionError:  # alive, another user's
            pass
