"""Start-up errors that the user must see: repeated as the last lines of the process that started vLLM.

vLLM builds logits processors inside its engine-core (or worker) process. When llmgraft's server config
(``--additional-config '{"llmgraft": ...}'``) is invalid, that process fails with our ParamError, but the
API server then prints a long traceback of its own ending in "Engine core initialization failed", and the
real reason is buried in the middle. So the general plugin (which vLLM runs in every process, the API
server first) names a report file in the environment that child processes inherit; a child that fails
writes its reason there, and the process that created the file prints it when it exits.
"""

from __future__ import annotations

import atexit
import os
import sys
import tempfile
import uuid
from pathlib import Path

_ENV = "LLMGRAFT_STARTUP_REPORT"


def install() -> None:
    """In the first vLLM process of this environment: name the report file and print it at exit."""
    if _ENV in os.environ:
        return
    path = Path(tempfile.gettempdir()) / f"llmgraft-startup-{os.getpid()}-{uuid.uuid4().hex[:8]}.txt"
    os.environ[_ENV] = f"{os.getpid()}:{path}"
    atexit.register(_print_report, path)


def report(message: str) -> None:
    """Record why this (child) process cannot start; a no-op in the process that prints the report."""
    owner, _, path = os.environ.get(_ENV, "").partition(":")
    if path and owner != str(os.getpid()):
        with open(path, "a", encoding="utf-8") as out:
            out.write(message.rstrip() + "\n")


def _print_report(path: Path) -> None:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return
    path.unlink(missing_ok=True)
    for line in dict.fromkeys(text.splitlines()):  # every engine process reports the same reason
        print(f"llmgraft: vLLM could not start: {line}", file=sys.stderr, flush=True)
