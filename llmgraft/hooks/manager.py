"""Plugin discovery and the registry of methods.

Order: built-in plugins, then the ``llmgraft`` entry-point group, each third-party plugin checked with
``check_pending`` (a misspelt hook name is rejected). Loading is lazy (first :func:`get_registry` call) and
idempotent. Environment controls, read at load time:

* ``LLMGRAFT_PLUGINS=a,b``: load only these third-party plugins (built-ins always load).
* ``LLMGRAFT_DISABLE_PLUGIN_AUTOLOAD=1``: load no third-party plugin.

A third-party plugin that fails to import, validate or register is skipped with one warning naming it
(a ``RuntimeWarning``, shown once per process); its error is kept in :attr:`Registry.load_errors` and the
rest keep working. A method is validated against its family's whole contract when it registers
(:meth:`Family.check`), so a plugin missing any part fails here, not on the first request.
"""

from __future__ import annotations

import importlib
import os
import threading
import warnings
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

import pluggy

from . import specs
from .errors import PluginLoadError, UnknownPluginError
from .families import FAMILIES, Family
from .params import Params

ENTRY_POINT_GROUP = "llmgraft"
BUILTIN_PLUGINS = ("llmgraft.plugins.top_h", "llmgraft.plugins.top_w", "llmgraft.plugins.top_nsigma",
                   "llmgraft.plugins.p_less", "llmgraft.plugins.mwa", "llmgraft.plugins.task_vectors",
                   "llmgraft.plugins.mos", "llmgraft.plugins.slim_moe", "llmgraft.plugins.prompt_distill",
                   "llmgraft.plugins.quant")
BUILTIN_ORIGIN = "llmgraft"


@dataclass(frozen=True)
class Entry:
    family: str
    name: str
    obj: Any
    origin: str  # "llmgraft" for built-ins, else the entry-point name (distribution in parentheses)


class Registry:
    """Loaded plugins and the method objects they registered, by family and name."""

    def __init__(self, autoload: bool | None = None, allow: set[str] | None = None) -> None:
        self.pm = pluggy.PluginManager(specs.PROJECT)
        self.pm.add_hookspecs(specs)
        self.entries: dict[str, dict[str, Entry]] = {family: {} for family in FAMILIES}
        self.load_errors: dict[str, str] = {}
        if autoload is None:
            autoload = os.environ.get("LLMGRAFT_DISABLE_PLUGIN_AUTOLOAD", "").lower() not in ("1", "true", "yes")
        if allow is None and os.environ.get("LLMGRAFT_PLUGINS", "").strip():
            allow = {n.strip() for n in os.environ["LLMGRAFT_PLUGINS"].split(",") if n.strip()}
        for module in BUILTIN_PLUGINS:
            self._add(BUILTIN_ORIGIN, importlib.import_module(module), module)
        if autoload:
            self._load_entry_points(allow)

    # -- loading ------------------------------------------------------------------------------------------
    def _load_entry_points(self, allow: set[str] | None) -> None:
        installed = sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name)
        for missing in sorted((allow or set()) - {ep.name for ep in installed}):
            self._fail(f"{missing} (LLMGRAFT_PLUGINS)", "named in LLMGRAFT_PLUGINS but no installed plugin has "
                       f"that name; installed: {', '.join(ep.name for ep in installed) or '(none)'}")
        for ep in installed:
            if allow is not None and ep.name not in allow:
                continue
            dist = getattr(getattr(ep, "dist", None), "name", None)
            origin = f"{ep.name} ({dist})" if dist else ep.name
            try:
                plugin = ep.load()
            except Exception as exc:  # noqa: BLE001 - any import failure must not break the others
                self._fail(origin, f"failed to import {ep.value!r}: {type(exc).__name__}: {exc}")
                continue
            self._add(origin, plugin, ep.name)

    def _add(self, origin: str, plugin: Any, plugin_name: str) -> bool:
        """Register one plugin and collect what it registers; on any failure undo it, record why, and
        return False."""
        try:
            self.pm.register(plugin, name=plugin_name)
            self.pm.check_pending()
        except Exception as exc:  # noqa: BLE001
            if self.pm.is_registered(plugin):
                self.pm.unregister(plugin)
            if origin == BUILTIN_ORIGIN:
                raise
            self._fail(origin, f"invalid plugin: {exc}")
            return False
        collected: list[Entry] = []
        try:
            for family in FAMILIES.values():
                for impl in getattr(self.pm.hook, family.hook).get_hookimpls():
                    if impl.plugin is plugin:
                        impl.function(register=lambda obj, f=family: collected.append(self._check(f, obj, origin)))
        except Exception as exc:  # noqa: BLE001
            self.pm.unregister(plugin)
            if origin == BUILTIN_ORIGIN:
                raise
            self._fail(origin, f"registration failed: {exc}" if isinstance(exc, PluginLoadError)
                       else f"registration failed: {type(exc).__name__}: {exc}")
            return False
        if not collected:
            self.pm.unregister(plugin)
            self._fail(origin, "registered no method: its hook functions need the @llmgraft.hookimpl decorator "
                               "and must call register(...)")
            return False
        ok = True
        for entry in collected:
            taken = self.entries[entry.family].get(entry.name)
            if taken is not None:
                self._fail(origin, f"{entry.family} {entry.name!r} is already registered by {taken.origin}; "
                                   "this one is ignored")
                ok = False
                continue
            self.entries[entry.family][entry.name] = entry
        return ok

    @staticmethod
    def _check(family: Family, obj: Any, origin: str) -> Entry:
        try:
            name = family.check(obj)
        except TypeError as exc:
            raise PluginLoadError(str(exc)) from None
        if obj.params_cls.owner == Params.owner:  # error messages name the method unless its author chose
            obj.params_cls.owner = name
        return Entry(family.name, name, obj, origin)

    def _fail(self, origin: str, message: str) -> None:
        self.load_errors[origin] = message
        warnings.warn(f"llmgraft: plugin {origin} skipped: {message}", RuntimeWarning, stacklevel=3)

    def add_plugin(self, plugin: Any, name: str | None = None) -> bool:
        """Register a plugin object (module or class instance) by hand, e.g. from a notebook or a test.

        Returns False, with the reason in :attr:`load_errors`, if it (or any method it registers) was
        rejected.
        """
        name = name or getattr(plugin, "__name__", None) or type(plugin).__name__
        if name == BUILTIN_ORIGIN or name in BUILTIN_PLUGINS:
            raise ValueError(f"{name!r} is a built-in plugin's name")
        if self.pm.has_plugin(name):  # a notebook cell run again: the new version replaces the old one
            self.pm.unregister(name=name)
            for family in self.entries.values():
                for method in [m for m, e in family.items() if e.origin == name]:
                    del family[method]
            self.load_errors.pop(name, None)
        return self._add(name, plugin, name)

    # -- queries ------------------------------------------------------------------------------------------
    def get(self, family: str, name: str) -> Any:
        """The method object ``name`` of ``family``; an unknown name lists the available ones."""
        if family not in self.entries:
            raise UnknownPluginError(f"unknown family {family!r}; families: {', '.join(FAMILIES)}")
        entry = self.entries[family].get(name)
        if entry is None:
            known = ", ".join(sorted(self.entries[family])) or "(none)"
            raise UnknownPluginError(f"no {family} named {name!r}; available: {known}")
        return entry.obj

    def names(self, family: str) -> list[str]:
        return sorted(self.entries[family])

    def all_entries(self) -> list[Entry]:
        return [e for family in self.entries.values() for e in family.values()]


_registry: Registry | None = None
_lock = threading.Lock()


def get_registry() -> Registry:
    """The process-wide registry, loaded on first use."""
    global _registry
    if _registry is None:
        with _lock:
            if _registry is None:
                _registry = Registry()
    return _registry


def reset_registry() -> None:
    """Forget the loaded registry so the next :func:`get_registry` rediscovers plugins (tests, notebooks)."""
    global _registry
    with _lock:
        _registry = None
