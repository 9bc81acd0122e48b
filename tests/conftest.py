"""Shared fixtures: a scratch area, fixture plugin packages installed with pip, tiny models, one vLLM engine.

vLLM settings must be in the environment before vLLM is imported, so they are set at collection time.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from llmgraft.testing.engine import set_cpu_engine_env

ROOT = Path(__file__).resolve().parent.parent
SCRATCH = ROOT / ".scratch" / "tests"
SCRATCH.mkdir(parents=True, exist_ok=True)

set_cpu_engine_env(SCRATCH, quiet=False)
os.environ["TMPDIR"] = str(SCRATCH / "tmp")
Path(os.environ["TMPDIR"]).mkdir(parents=True, exist_ok=True)
tempfile.tempdir = None


#: The README's install command for the example plugin; :func:`pip_install_target` runs it as written.
PLUGIN_INSTALL = ".venv/bin/python -m pip install ./tests/plugins/llmgraft-top-a"
_PIP = ".venv/bin/python -m pip install "


def pip_install_target(command: str, target: Path) -> Path:
    """Run a README ``pip install`` command for real, into an isolated directory (no venv mutation).

    pip reads its options from the environment: the target directory, no dependencies (llmgraft is
    already here), no index and no build isolation (the tests run offline).
    """
    if not target.exists():
        assert command.startswith(_PIP), command
        env = dict(os.environ, PIP_TARGET=str(target), PIP_NO_DEPS="1", PIP_NO_INDEX="1",
                   PIP_NO_BUILD_ISOLATION="0", PIP_QUIET="1")
        subprocess.run([sys.executable, "-m", "pip", "install", *command[len(_PIP):].split()], check=True,
                       cwd=ROOT, env=env)
    return target


@contextlib.contextmanager
def installed_on_path(command: str, tmp_path_factory):
    """Install a fixture plugin with ``command``, put it on ``sys.path`` and rediscover plugins."""
    from llmgraft.hooks import reset_registry

    site = pip_install_target(command, tmp_path_factory.mktemp("site") / command.rsplit("/", 1)[-1])
    sys.path.insert(0, str(site))
    importlib.invalidate_caches()
    reset_registry()
    try:
        yield site
    finally:
        sys.path.remove(str(site))
        reset_registry()


@pytest.fixture(params=["native", "avx2", "torch"])
def kernel_path(request, monkeypatch):
    """Run a truncation-sampler test on the compiled top-N kernel as built for this CPU, on its AVX2 loops
    (LLMGRAFT_NATIVE_FLAGS=-mno-avx512f) and on the torch path (LLMGRAFT_NATIVE=0)."""
    from llmgraft.kernels import native

    if request.param == "torch":
        monkeypatch.setenv("LLMGRAFT_NATIVE", "0")
        return request.param
    if request.param == "avx2":
        monkeypatch.setenv("LLMGRAFT_NATIVE_FLAGS", "-mno-avx512f")
    wanted = {"native": ("AVX-512", "AVX2"), "avx2": ("AVX2",)}[request.param]
    if not native.describe().startswith("compiled") or native.load(native.extra_flags()).isa not in wanted:
        pytest.skip(f"the compiled kernel's {request.param} loops do not run on this machine")
    return request.param


@pytest.fixture(scope="session")
def plugin_site(tmp_path_factory) -> Path:
    """The example third-party plugin ``llmgraft-top-a``, installed as the README says and on ``sys.path``."""
    with installed_on_path(PLUGIN_INSTALL, tmp_path_factory) as site:
        yield site


@pytest.fixture(scope="session")
def examples_site(tmp_path_factory) -> Path:
    """``llmgraft-examples`` (one small method per family besides samplers) installed and on ``sys.path``."""
    with installed_on_path(_PIP + "./tests/plugins/llmgraft-examples", tmp_path_factory) as site:
        yield site


@pytest.fixture(scope="session")
def broken_site(tmp_path_factory) -> Path:
    """The broken fixture plugins, installed with pip into their own directory (not on sys.path)."""
    return pip_install_target(_PIP + "./tests/plugins/llmgraft-broken", tmp_path_factory.mktemp("site") / "broken")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    from llmgraft.testing.models import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="session")
def llm(tiny_llama, plugin_site):
    """One in-process vLLM engine (KV cache sized) shared by the engine tests."""
    from llmgraft.testing.engine import cpu_engine

    engine = cpu_engine(tiny_llama, max_model_len=512)
    yield engine
    del engine
