"""The pluggy core: registry, discovery controls, broken plugins, params, request-field parsing."""

from __future__ import annotations

import types
from dataclasses import dataclass

import pytest
import torch

from llmgraft.hooks import (
    FAMILIES,
    ParamError,
    Params,
    Registry,
    UnknownPluginError,
    choice,
    get_registry,
    hookimpl,
    per_row,
)
from llmgraft.hooks.sampling import OPT_OUT, parse_sampler_fields, parse_server_defaults, resolve_sampler


def test_six_families_and_builtin_top_h():
    assert set(FAMILIES) == {"sampler", "merger", "attention", "kv_manager", "optimizer", "adapter"}
    registry = Registry(autoload=False)
    assert registry.names("sampler") == ["top_h"]
    assert registry.entries["sampler"]["top_h"].origin == "llmgraft"
    with pytest.raises(UnknownPluginError, match="available: top_h"):
        registry.get("sampler", "top_x")
    with pytest.raises(UnknownPluginError, match="unknown family"):
        registry.get("samplers", "top_h")


def test_registry_is_lazy_and_idempotent():
    assert get_registry() is get_registry()


def test_third_party_plugin_discovered_with_origin(plugin_site):
    registry = Registry()
    entry = registry.entries["sampler"]["top_a"]
    assert entry.origin == "top_a (llmgraft-top-a)"
    assert registry.load_errors == {}


def test_disable_autoload_and_allow_list(plugin_site, monkeypatch):
    monkeypatch.setenv("LLMGRAFT_DISABLE_PLUGIN_AUTOLOAD", "1")
    assert "top_a" not in Registry().names("sampler")
    monkeypatch.delenv("LLMGRAFT_DISABLE_PLUGIN_AUTOLOAD")
    monkeypatch.setenv("LLMGRAFT_PLUGINS", "something_else")
    assert Registry().names("sampler") == ["top_h"]  # built-ins always load
    monkeypatch.setenv("LLMGRAFT_PLUGINS", "something_else, top_a")
    assert "top_a" in Registry().names("sampler")


def test_broken_plugins_are_reported_and_skipped(plugin_site, broken_site, monkeypatch):
    monkeypatch.syspath_prepend(str(broken_site))
    with pytest.warns(RuntimeWarning) as caught:
        registry = Registry()
    messages = " ".join(str(w.message) for w in caught)
    assert "broken_import (llmgraft-broken)" in messages and "a_dependency_that_is_not_installed" in messages
    assert "broken_hook_name (llmgraft-broken)" in messages and "llmgraft_register_samplerz" in messages
    assert set(registry.load_errors) == {"broken_import (llmgraft-broken)", "broken_hook_name (llmgraft-broken)"}
    # The rest keep working.
    assert registry.names("sampler") == ["top_a", "top_h"]
    assert not registry.pm.has_plugin("broken_hook_name")


def _plugin(**hooks) -> types.ModuleType:
    module = types.ModuleType("handmade")
    for name, fn in hooks.items():
        setattr(module, name, hookimpl(fn))
    return module


def test_duplicate_and_invalid_registrations_are_rejected():
    registry = Registry(autoload=False)
    top_h = registry.get("sampler", "top_h")

    def dup(register):
        register(top_h)

    with pytest.warns(RuntimeWarning, match="already registered by llmgraft"):
        assert registry.add_plugin(_plugin(llmgraft_register_samplers=dup), "dup") is False

    class NoApply:
        name, description, params_cls, primary = "no_apply", "", Params, None

    def bad(register):
        register(NoApply())

    with pytest.warns(RuntimeWarning, match="missing method `apply`"):
        assert registry.add_plugin(_plugin(llmgraft_register_samplers=bad), "bad") is False
    assert registry.names("sampler") == ["top_h"]


@dataclass(frozen=True)
class DemoParams(Params):
    owner = "demo"
    alpha: float = per_row(0.5)
    k: int = 3
    mode: str = choice("a", ("a", "b"))
    flag: bool = False

    def validate(self):
        if self.alpha < 0:
            raise ParamError(f"demo: alpha must be >= 0, got {self.alpha}")


def test_params_types_ranges_and_unknown_keys():
    assert DemoParams(alpha=1).alpha == 1.0 and isinstance(DemoParams(alpha=1).alpha, float)
    assert DemoParams(k=4.0).k == 4
    for bad in ({"alpha": "0.5"}, {"alpha": True}, {"alpha": float("nan")}, {"k": 2.5}, {"mode": "c"},
                {"flag": 1}, {"alpha": -1.0}):
        with pytest.raises(ParamError, match="demo"):
            DemoParams.from_mapping(bad)
    with pytest.raises(ParamError, match=r"unknown parameter\(s\) 'alpah'; valid: alpha, k, mode, flag"):
        DemoParams.from_mapping({"alpah": 0.1})
    assert isinstance(ParamError("x"), ValueError)  # hosts map ValueError to HTTP 400


def test_params_stack_per_row_fields_and_group_key():
    rows = [DemoParams(alpha=0.1), DemoParams(alpha=0.2)]
    batch = DemoParams.stack(rows)
    assert torch.equal(batch.alpha, torch.tensor([0.1, 0.2])) and batch.k == 3 and batch.mode == "a"
    assert DemoParams(alpha=0.1).group_key() == DemoParams(alpha=0.9).group_key()
    assert DemoParams(k=1).group_key() != DemoParams(k=2).group_key()
    with pytest.raises(ValueError, match="different static"):
        DemoParams.stack([DemoParams(k=1), DemoParams(k=2)])
    assert [r[0] for r in DemoParams.describe()] == ["alpha", "k", "mode", "flag"]


def test_request_fields_three_spellings(plugin_site):
    short = parse_sampler_fields({"top_h": 0.3, "other_processor_key": 1})
    assert short.sampler.name == "top_h" and short.params.alpha == 0.3
    prefixed = parse_sampler_fields({"top_h": 0.3, "top_h_variant": "hf", "top_h_top_n": 50})
    assert (prefixed.params.variant, prefixed.params.top_n) == ("hf", 50)
    general = parse_sampler_fields({"llmgraft_sampler": "top_a", "top_a_a": 0.5})
    assert general.sampler.name == "top_a" and general.params.a == 0.5
    assert parse_sampler_fields({"llmgraft_sampler": "top_h"}).params.alpha == 0.4
    bare = parse_sampler_fields({"llmgraft_sampler": "top_a", "a": 0.7, "unrelated": "x"})
    assert bare.sampler.name == "top_a" and bare.params.a == 0.7
    assert parse_server_defaults({"sampler": "top_h", "alpha": 0.2, "variant": "hf"}).params.variant == "hf"
    assert parse_sampler_fields({"unrelated": 1}) is None and parse_sampler_fields(None) is None
    assert parse_sampler_fields({"llmgraft_sampler": "none"}) == OPT_OUT


@pytest.mark.parametrize("fields, message", [
    ({"top_h": 1.5}, r"alpha must be in \(0, 1\]"),
    ({"top_h": "high"}, "must be a number"),
    ({"top_h_alpah": 0.3}, "unknown parameter"),
    ({"top_h_variant": "official"}, "must be one of reference, hf, paper"),
    ({"llmgraft_sampler": "top_x"}, "no sampler named 'top_x'"),
    ({"llmgraft_sampler": 3}, "must be a sampler name"),
    ({"llmgraft_samplr": "top_h"}, "unknown llmgraft field"),
    ({"top_h": 0.3, "top_a": 0.2}, "one llmgraft sampler per request"),
    ({"llmgraft_sampler": "top_a", "top_h": 0.2}, "also sets fields of top_h"),
    ({"llmgraft_sampler": "none", "top_h": 0.2}, "conflicts"),
    ({"llmgraft_sampler": "top_h", "alpha": 0.2, "top_h_alpha": 0.3}, "given twice"),
    ({"top_h": 0.2, "top_h_alpha": 0.3}, "given twice"),
    ({"llmgraft_sampler": "top_h", "alpha": 2.0}, r"alpha must be in \(0, 1\]"),
])
def test_request_field_errors(plugin_site, fields, message):
    with pytest.raises(ValueError, match=message):
        parse_sampler_fields(fields)


def test_server_defaults_and_overrides(plugin_site):
    default = parse_server_defaults({"sampler": "top_h", "top_h": 0.3, "top_h_variant": "paper"})
    assert default.params.alpha == 0.3 and default.params.variant == "paper"
    assert resolve_sampler(None, default) is default
    assert resolve_sampler({"llmgraft_sampler": "none"}, default) is None
    merged = resolve_sampler({"top_h": 0.7}, default)
    assert merged.params.alpha == 0.7 and merged.params.variant == "paper"
    assert resolve_sampler({"top_a": 0.1}, default).sampler.name == "top_a"
    with pytest.raises(ParamError):
        parse_server_defaults({"sampler": "top_h", "top_h": 0})
    assert parse_server_defaults(None) is None


def test_algorithm_code_never_imports_a_host_framework():
    import pathlib

    root = pathlib.Path(__file__).resolve().parent.parent / "llmgraft"
    offenders = []
    for folder in ("hooks", "plugins", "kernels"):
        for path in (root / folder).rglob("*.py"):
            text = path.read_text()
            for host in ("vllm", "peft", "transformers"):
                if f"import {host}" in text or f"from {host}" in text:
                    offenders.append(f"{path.name}: {host}")
    assert offenders == []
