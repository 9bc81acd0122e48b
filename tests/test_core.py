"""The pluggy core: registry, discovery controls, broken plugins, family checks, params, request fields."""

from __future__ import annotations

import os
import subprocess
import sys
import types
from dataclasses import dataclass

import pytest
import torch

from llmgraft.hooks import (
    FAMILIES,
    ParamError,
    Params,
    Registry,
    Sampler,
    UnknownPluginError,
    choice,
    hookimpl,
    param,
    per_row,
)
from llmgraft.hooks.names import closest, edit_distance, is_close
from llmgraft.hooks.sampling import OPT_OUT, parse_sampler_fields, parse_server_defaults, resolve_sampler


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})


BUILTIN_SAMPLERS = ["p_less", "top_h", "top_nsigma", "top_w"]


def test_six_families_and_builtin_samplers():
    assert set(FAMILIES) == {"sampler", "merger", "attention", "kv_manager", "optimizer", "adapter", "quant_scheme"}
    registry = Registry(autoload=False)
    assert registry.names("sampler") == ["p_less", "top_h", "top_nsigma", "top_w"]
    assert {registry.entries["sampler"][n].origin for n in registry.names("sampler")} == {"llmgraft"}
    with pytest.raises(UnknownPluginError, match="available: p_less, top_h, top_nsigma, top_w"):
        registry.get("sampler", "top_x")
    with pytest.raises(UnknownPluginError, match="unknown family"):
        registry.get("samplers", "top_h")


def test_import_is_light_and_plugins_load_on_first_use():
    """``import llmgraft`` loads no plugin, no torch and no host; vLLM's entry point (imported by every
    engine) loads no plugin either; the registry loads plugins once, on first use."""
    result = run_python(
        "import sys, llmgraft\n"
        "heavy = [m for m in ('torch', 'llmgraft.plugins.top_h', 'transformers', 'vllm') if m in sys.modules]\n"
        "assert heavy == [], heavy\n"
        "import llmgraft.integrations.vllm\n"
        "assert 'llmgraft.plugins.top_h' not in sys.modules\n"
        "import llmgraft as g; r = g.get_registry()\n"
        "assert 'llmgraft.plugins.top_h' in sys.modules and r is g.get_registry()\n"
        "g.hooks.reset_registry(); assert g.get_registry() is not r\n"
        "print('ok')")
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


def test_algorithm_code_never_imports_a_host_framework():
    """Import every module of hooks/, plugins/, kernels/ and offline/ in a fresh interpreter; no host may load."""
    result = run_python(
        "import importlib, pkgutil, sys, llmgraft\n"
        "for pkg in ('hooks', 'plugins', 'kernels', 'offline'):\n"
        "    package = importlib.import_module('llmgraft.' + pkg)\n"
        "    for info in pkgutil.walk_packages(package.__path__, package.__name__ + '.'):\n"
        "        importlib.import_module(info.name)\n"
        "llmgraft.get_registry()\n"
        "print(sorted(h for h in ('vllm', 'peft', 'transformers') if h in sys.modules))")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


def test_third_party_plugin_discovered_with_origin(plugin_site):
    registry = Registry()
    entry = registry.entries["sampler"]["top_a"]
    assert entry.origin == "top_a (llmgraft-top-a)"
    assert registry.load_errors == {}


def test_disable_autoload_and_allow_list(plugin_site, monkeypatch):
    monkeypatch.setenv("LLMGRAFT_DISABLE_PLUGIN_AUTOLOAD", "1")
    assert "top_a" not in Registry().names("sampler")
    monkeypatch.delenv("LLMGRAFT_DISABLE_PLUGIN_AUTOLOAD")
    monkeypatch.setenv("LLMGRAFT_PLUGINS", "top_a")
    assert Registry().names("sampler") == ["p_less", "top_a", "top_h", "top_nsigma", "top_w"]  # built-ins always load
    monkeypatch.setenv("LLMGRAFT_PLUGINS", "not_installed, top_a")
    with pytest.warns(RuntimeWarning, match="not_installed.*named in LLMGRAFT_PLUGINS.*installed: .*top_a"):
        registry = Registry()
    assert "top_a" in registry.names("sampler")
    assert list(registry.load_errors) == ["not_installed (LLMGRAFT_PLUGINS)"]


def test_broken_plugins_are_reported_and_skipped(plugin_site, broken_site, monkeypatch):
    monkeypatch.syspath_prepend(str(broken_site))
    with pytest.warns(RuntimeWarning) as caught:
        registry = Registry()
    messages = " ".join(str(w.message) for w in caught)
    assert "broken_import (llmgraft-broken)" in messages and "a_dependency_that_is_not_installed" in messages
    assert "broken_hook_name (llmgraft-broken)" in messages and "llmgraft_register_samplerz" in messages
    assert "no_primary (llmgraft-broken)" in messages and "missing attribute `primary`" in messages
    assert set(registry.load_errors) == {"broken_import (llmgraft-broken)", "broken_hook_name (llmgraft-broken)",
                                         "no_primary (llmgraft-broken)"}
    # The rest keep working.
    assert registry.names("sampler") == ["p_less", "top_a", "top_h", "top_nsigma", "top_w"]
    assert not registry.pm.has_plugin("broken_hook_name")


def test_a_skipped_plugin_is_reported_once_per_process(plugin_site, broken_site):
    """vLLM loads the registry through its general plugin and again through the logits processor."""
    result = run_python(
        "from llmgraft.integrations.vllm import register\n"
        "from llmgraft import get_registry\n"
        "register(); get_registry(); register()\n",
        PYTHONPATH=f"{broken_site}{os.pathsep}{plugin_site}")
    assert result.returncode == 0, result.stderr[-2000:]
    output = result.stdout + result.stderr
    for plugin in ("broken_import", "broken_hook_name", "no_primary"):
        assert output.count(f"{plugin} (llmgraft-broken) skipped") == 1, output


def _plugin(**hooks) -> types.ModuleType:
    module = types.ModuleType("handmade")
    for name, fn in hooks.items():
        setattr(module, name, hookimpl(fn))
    return module


@dataclass(frozen=True)
class OneParam(Params):
    owner = "demo"
    a: float = param(0.5, range="[0, 1]", help="a number")


@dataclass(frozen=True)
class NoHelp(Params):
    a: float = 0.5


@dataclass(frozen=True)
class BadDefault(Params):
    a: float = param(2.0, range="[0, 1]", help="out of its own range")


@dataclass(frozen=True)
class DictField(Params):
    a: dict = param(None, help="unhashable")


def _sampler(**overrides) -> object:
    attributes = {"name": "demo", "description": "a demo sampler", "params_cls": OneParam, "primary": "a",
                  "apply": lambda self, logits, params: logits}
    attributes.update(overrides)
    return type("Demo", (), {k: v for k, v in attributes.items() if v is not ...})()


@pytest.mark.parametrize("overrides, message", [
    ({"primary": ...}, "missing attribute `primary`"),
    ({"primary": "b"}, "`primary` 'b' is not one of its parameters"),
    ({"description": ...}, "`description` must be a one-line string"),
    ({"description": "two\nlines"}, "one-line"),
    ({"name": "top-x"}, "Python identifier"),
    ({"params_cls": dict}, "Params subclass"),
    ({"params_cls": NoHelp}, "declare it with llmgraft.param"),
    ({"params_cls": BadDefault}, "defaults are invalid"),
    ({"params_cls": DictField}, "type dict is not supported"),
    ({"apply": ...}, "missing method `apply`"),
    ({"apply": lambda self, logits: logits}, "`apply` must accept"),
])
def test_registration_checks_the_whole_contract(overrides, message):
    registry = Registry(autoload=False)
    obj = _sampler(**overrides)

    def hook(register):
        register(obj)

    for attempt in range(2):  # the same failure twice must still report failure (same message recorded)
        with pytest.warns(RuntimeWarning, match=message):
            assert registry.add_plugin(_plugin(llmgraft_register_samplers=hook), "bad") is False
    assert registry.names("sampler") == BUILTIN_SAMPLERS


def test_good_handmade_plugin_and_duplicates():
    registry = Registry(autoload=False)

    def good(register):
        register(_sampler())

    assert registry.add_plugin(_plugin(llmgraft_register_samplers=good), "good") is True
    assert registry.names("sampler") == sorted(["demo", *BUILTIN_SAMPLERS])
    top_h = registry.get("sampler", "top_h")

    def dup(register):
        register(top_h)

    with pytest.warns(RuntimeWarning, match="already registered by llmgraft"):
        assert registry.add_plugin(_plugin(llmgraft_register_samplers=dup), "dup") is False


def test_family_base_classes_are_the_contract():
    """Subclassing the base class alone does not satisfy the contract: the parts must be provided."""
    class Incomplete(Sampler):
        name, description, params_cls = "incomplete", "no primary, no apply", OneParam

    with pytest.raises(TypeError, match="missing attribute `primary`"):
        FAMILIES["sampler"].check(Incomplete())
    Incomplete.primary = None
    with pytest.raises(TypeError, match="missing method `apply`"):  # the base class's stub is no apply
        FAMILIES["sampler"].check(Incomplete())
    with pytest.raises(TypeError, match=r"register an instance of Incomplete \(`register\(Incomplete\(\)\)`\)"):
        FAMILIES["sampler"].check(Incomplete)
    assert FAMILIES["sampler"].attributes() == ("name", "description", "params_cls", "primary")


# ---- parameters ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DemoParams(Params):
    owner = "demo"
    alpha: float = per_row(0.5, range="[0, inf)", help="a per-row number")
    k: int = param(3, range="[1, 10]", help="an integer")
    mode: str = choice("a", ("a", "b"), help="a choice")
    flag: bool = param(False, help="a flag")
    stages: tuple[tuple[int, float], ...] = param(((13, 0.5),), range="[0, 100]", help="(layer, ratio) pairs")
    names: list[str] = param(("x",), help="a list, stored as a tuple")
    limit: int | None = param(None, range="[1, inf)", help="optional")

    def validate(self):
        if self.flag and self.k > 5:
            raise ParamError("demo: flag needs k <= 5")


def test_params_types_ranges_and_unknown_keys():
    assert DemoParams(alpha=1).alpha == 1.0 and isinstance(DemoParams(alpha=1).alpha, float)
    assert DemoParams(k=4.0).k == 4
    assert DemoParams(stages=[[1, 2], [3, 0.5]]).stages == ((1, 2.0), (3, 0.5))  # JSON lists become tuples
    assert DemoParams(names=["p", "q"]).names == ("p", "q") and DemoParams(limit=7).limit == 7
    for bad, message in (({"alpha": "0.5"}, "alpha must be a number"), ({"alpha": True}, "must be a number"),
                         ({"alpha": float("nan")}, "finite"), ({"k": 2.5}, "integer"), ({"k": 11}, r"in \[1, 10\]"),
                         ({"mode": "c"}, "one of a, b"), ({"flag": 1}, "true or false"),
                         ({"alpha": -1.0}, r"in \[0, inf\)"), ({"stages": [[1]]}, "must have 2 items"),
                         ({"stages": [[1, 200.0]]}, r"in \[0, 100\], got 200"), ({"stages": 3}, "must be a list"),
                         ({"names": [1]}, r"names\[0\] must be a string"), ({"limit": 0}, "in"),
                         ({"flag": True, "k": 7}, "flag needs")):
        with pytest.raises(ParamError, match=message):
            DemoParams.from_mapping(bad)
    with pytest.raises(ParamError, match=r"unknown parameter\(s\) 'alpah' \(did you mean 'alpha'\?\); valid: alpha"):
        DemoParams.from_mapping({"alpah": 0.1})
    assert isinstance(ParamError("x"), ValueError)  # hosts map ValueError to HTTP 400


def test_params_stack_group_key_and_describe():
    rows = [DemoParams(alpha=0.1), DemoParams(alpha=0.2)]
    batch = DemoParams.stack(rows)
    assert torch.equal(batch.alpha, torch.tensor([0.1, 0.2])) and batch.k == 3 and batch.stages == ((13, 0.5),)
    assert DemoParams(alpha=0.1).group_key() == DemoParams(alpha=0.9).group_key()
    assert DemoParams(stages=[[1, 1]]).group_key() != DemoParams().group_key()
    hash(DemoParams(stages=[[1, 1]], names=["a"]).group_key())  # hashable: rows are grouped by it
    with pytest.raises(ValueError, match="different static"):
        DemoParams.stack([DemoParams(k=1), DemoParams(k=2)])
    described = {row["name"]: row for row in DemoParams.describe()}
    assert described["alpha"] == {"name": "alpha", "type": "float (per row)", "default": 0.5, "range": "[0, inf)",
                                  "help": "a per-row number"}
    assert described["mode"]["range"] == "a|b" and described["stages"]["type"] == "tuple[tuple[int, float], ...]"
    assert described["limit"]["type"] == "int | None"


def test_params_class_checks():
    DemoParams.check_class()
    for cls, message in ((NoHelp, "help"), (BadDefault, "defaults are invalid"), (DictField, "not supported")):
        with pytest.raises(TypeError, match=message):
            cls.check_class()

    @dataclass(frozen=True)
    class PerRowString(Params):
        s: str = param("x", per_row=True, help="not a number")

    with pytest.raises(TypeError, match="per_row fields must be float or int"):
        PerRowString.check_class()
    with pytest.raises(ValueError, match="not an interval"):
        param(1, range="0..1", help="bad range")


# ---- "did you mean" ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("key, name, close", [
    ("alpah", "alpha", True),        # a swap of two neighbouring letters is one edit
    ("alpa", "alpha", True), ("alphaa", "alpha", True), ("alpga", "alpha", True),
    ("alhpa_", "alpha", False),      # two edits, name of 5 characters: not close
    ("varaint", "variant", True), ("varint", "variant", True), ("vrnt", "variant", False),
    ("top_nn", "top_n", True), ("topn", "top_n", True),
    ("b", "a", False), ("aa", "a", False), ("ab", "ab", False),  # 1-2 character names: exact only
    ("temperature", "top_h", False),
])
def test_closeness_rule(key, name, close):
    assert is_close(key, name) is close


def test_edit_distance_and_closest():
    assert edit_distance("alpah", "alpha") == 1 and edit_distance("kitten", "sitting") == 3
    assert closest("alpah", ["alpha", "top_n"]) == "alpha" and closest("zzz", ["alpha"]) is None


# ---- request fields ------------------------------------------------------------------------------------------


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


def test_bare_parameters_are_read_once_a_sampler_is_selected(plugin_site):
    # Issue #6: {"top_h": 0.3, "variant": "paper"} used to run `reference` silently.
    assert parse_sampler_fields({"top_h": 0.3, "variant": "paper"}).params.variant == "paper"
    assert parse_sampler_fields({"top_h_top_n": 20, "alpha": 0.2}).params.alpha == 0.2
    # Keys of other processors pass through, even near-misses when no llmgraft sampler is selected.
    assert parse_sampler_fields({"top_h": 0.3, "repetition_window": 5, "seed_offset": 2}).params.alpha == 0.3
    assert parse_sampler_fields({"alpah": 0.3, "top_hh": 1}) is None


@pytest.mark.parametrize("fields, message", [
    ({"llmgraft_sampler": "top_h", "alpha": 0.4, "alpah": 0.3}, "'alpah' is not a parameter of top_h; did you mean 'alpha'"),
    ({"top_h": 0.3, "varaint": "paper"}, "did you mean 'variant'"),
    ({"top_h": 0.3, "top_nn": 5}, "did you mean 'top_n'"),
    ({"top_h": 0.3, "top_hh": 5}, "did you mean 'top_h'"),
    ({"top_h": 0.3, "top_aa": 5}, "did you mean 'top_a'"),
    ({"top_h": 1.5}, r"alpha must be in \(0, 1\]"),
    ({"top_h": "high"}, "must be a number"),
    ({"top_h": True}, "must be a number"),
    ({"top_h_alpah": 0.3}, "unknown parameter.*did you mean 'alpha'"),
    ({"top_h_variant": "official"}, "must be one of reference, hf, paper"),
    ({"llmgraft_sampler": "top_x"}, "llmgraft_sampler: no sampler named 'top_x'"),
    ({"llmgraft_sampler": 3}, "must be a sampler name"),
    ({"llmgraft_samplr": "top_h"}, "unknown llmgraft request field 'llmgraft_samplr'"),
    ({"top_h": 0.3, "top_a": 0.2}, "one llmgraft sampler at a time"),
    ({"llmgraft_sampler": "top_a", "top_h": 0.2}, "also set fields of top_h"),
    ({"llmgraft_sampler": "none", "top_h": 0.2}, "conflicts"),
    ({"llmgraft_sampler": "top_h", "alpha": 0.2, "top_h_alpha": 0.3}, "given twice \\('top_h_alpha' and 'alpha'\\)"),
    ({"top_h": 0.2, "top_h_alpha": 0.3}, "given twice \\('top_h' and 'top_h_alpha'\\)"),
    ({"top_h": 0.2, "alpha": 0.3}, "given twice"),
    ({"top_h": 0.2, "top_h_": 1}, "request field 'top_h_' names no parameter of top_h"),
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
    for bad, message in (({"sampler": "top_h", "top_h": 0}, r"alpha must be in \(0, 1\]"),
                         ({"sampler": "top_h", "top_h": True}, "must be a number"),
                         (["top_h"], "must be a mapping"),
                         # The section is llmgraft's alone: a typo must not silently drop the default.
                         ({"samplr": "top_h"}, "names no sampler \\(set 'sampler'\\); did you mean 'sampler'"),
                         ({"sampler": "top_h", "temperature": 1.5}, "server config key 'temperature' is not a"),
                         ({"sampler": "top_h", "apha": 0.3}, "did you mean 'alpha'")):
        with pytest.raises(ParamError, match=message):
            parse_server_defaults(bad)
    assert parse_server_defaults(None) is None and parse_server_defaults({"sampler": "none"}) is None


@dataclass(frozen=True)
class Pair(Params):
    low: float = param(0.1, range="[0, 1]", help="lower bound")
    high: float = param(0.5, range="[0, 1]", help="upper bound")

    def validate(self):
        if not self.low < self.high:
            raise ParamError(f"pair: low must be below high, got {self.low} and {self.high}")


def test_a_request_valid_alone_never_fails_against_the_server_default():
    """Admission validates the request alone; merging it into the default must not raise in the engine."""
    registry = Registry(autoload=False)

    def hook(register):
        register(_sampler(name="pair", params_cls=Pair, primary="high"))

    assert registry.add_plugin(_plugin(llmgraft_register_samplers=hook), "pair")
    default = parse_server_defaults({"sampler": "pair", "low": 0.4}, registry)
    request = {"llmgraft_sampler": "pair", "high": 0.3}
    assert parse_sampler_fields(request, registry).params.high == 0.3  # valid alone: admitted
    chosen = resolve_sampler(request, default, registry)
    assert (chosen.params.low, chosen.params.high) == (0.1, 0.3)
    assert resolve_sampler({"pair": 0.9}, default, registry).params.low == 0.4  # merged when valid


def test_a_plugin_that_registers_nothing_is_reported():
    registry = Registry(autoload=False)
    module = types.ModuleType("undecorated")

    def llmgraft_register_samplers(register):  # forgot @hookimpl: pluggy does not see it
        register(_sampler())

    module.llmgraft_register_samplers = llmgraft_register_samplers
    with pytest.warns(RuntimeWarning, match=r"registered no method: .*@llmgraft.hookimpl"):
        assert registry.add_plugin(module, "undecorated") is False


def test_adding_a_plugin_again_replaces_it():
    """A notebook cell run twice: the second version wins, with no error recorded."""
    registry = Registry(autoload=False)
    for version in ("v1", "v2"):
        def hook(register, version=version):
            register(_sampler(description=f"demo {version}"))

        assert registry.add_plugin(_plugin(llmgraft_register_samplers=hook), "notebook") is True
    assert registry.get("sampler", "demo").description == "demo v2" and registry.load_errors == {}
    with pytest.raises(ValueError, match="built-in"):
        registry.add_plugin(_plugin(), "llmgraft.plugins.top_h")


def test_params_must_be_decorated_and_errors_name_the_method():
    class NotDecorated(OneParam):  # forgot @dataclass(frozen=True): its own fields would be lost
        b: float = param(0.5, help="lost")

    with pytest.raises(TypeError, match="NotDecorated must be decorated with @dataclass"):
        NotDecorated.check_class()

    @dataclass(frozen=True)
    class Unowned(Params):
        a: float = param(0.5, range="[0, 1]", help="a number")

    registry = Registry(autoload=False)

    def hook(register):
        register(_sampler(name="unowned", params_cls=Unowned))

    assert registry.add_plugin(_plugin(llmgraft_register_samplers=hook), "unowned")
    with pytest.raises(ParamError, match=r"^unowned: a must be in \[0, 1\]"):
        Unowned(a=2.0)
