"""From flat request fields (vLLM ``extra_args`` / ``vllm_xargs``, server defaults) to a sampler choice.

Request fields are flat (vLLM's ``vllm_xargs`` allows no nesting), so three spellings select a sampler:

* shorthand: ``{"top_h": 0.4}`` selects sampler ``top_h`` and sets its primary parameter (alpha);
* prefixed parameters: ``{"top_h_variant": "hf", "top_h_top_n": 50}``;
* general form: ``{"llmgraft_sampler": "<name>", ...}``, for any registered sampler.

``{"llmgraft_sampler": "none"}`` opts a request out of a server-wide default. Unknown ``llmgraft_*`` keys,
unknown sampler names and unknown prefixed parameters are errors. Once a request selects a sampler, in any
of the three forms, its other keys are read like this (they may belong to other logits processors):

* a bare key that is exactly one of the sampler's parameters sets it (``{"top_h": 0.3, "variant": "paper"}``);
* a bare key close to one of its parameters or to a registered sampler name is an error with "did you
  mean" (:mod:`llmgraft.hooks.names` defines close);
* any other key passes through untouched.

A request that selects no sampler leaves every other key alone: a bare shorthand of a plugin that is not
installed looks like any other processor's key, which is why ``llmgraft_sampler`` (an unknown name is an
error) is the spelling to prefer.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import ParamError, UnknownPluginError
from .families import Sampler
from .manager import Registry, get_registry
from .names import closest
from .params import Params
from .retention import SETTINGS_KEY as RETENTION_KEY

SAMPLER_KEY = "llmgraft_sampler"
OPT_OUT = "none"


@dataclass(frozen=True)
class SamplerChoice:
    """A sampler with validated parameters for one request."""

    sampler: Sampler
    params: Params

    def group_key(self) -> tuple:
        """Rows with equal keys run through one batched ``apply`` call."""
        return (self.sampler.name, *self.params.group_key())


class _Fields:
    """Parameters collected for one sampler, remembering which field set each (for "given twice")."""

    def __init__(self, sampler: str) -> None:
        self.sampler, self.values, self.keys = sampler, {}, {}

    def put(self, param: str, value: Any, key: str) -> None:
        if param in self.values:
            raise ParamError(f"{self.sampler}: parameter {param!r} given twice ({self.keys[param]!r} and {key!r})")
        self.values[param], self.keys[param] = value, key


def _parse(fields: Mapping[str, Any], registry: Registry, where: str = "request field", strict: bool = False
           ) -> tuple[str | None, dict[str, Any]]:
    """(sampler name, :data:`OPT_OUT` or None; that sampler's parameter values) from flat fields.

    ``where`` names the fields in errors. With ``strict`` (fields that are llmgraft's alone) every key
    must be known: nothing passes through, and a sampler must be chosen.
    """
    names = sorted(registry.names("sampler"), key=len, reverse=True)  # longest prefix wins
    explicit = None
    found: dict[str, _Fields] = {}  # sampler → parameters set by its shorthand or prefixed keys
    bare: dict[str, Any] = {}
    for key, value in fields.items():
        if key == SAMPLER_KEY:
            if not isinstance(value, str):
                raise ParamError(f"{SAMPLER_KEY} must be a sampler name, got {value!r}")
            explicit = value
        elif key.startswith("llmgraft_"):
            raise ParamError(f"unknown llmgraft {where} {key!r}; did you mean {SAMPLER_KEY!r}?")
        elif key in names:
            primary = registry.get("sampler", key).primary
            if primary is None:
                raise ParamError(f"sampler {key!r} has no shorthand; use {SAMPLER_KEY!r} and {key}_<param> fields")
            found.setdefault(key, _Fields(key)).put(primary, value, key)
        elif prefix := next((n for n in names if key.startswith(n + "_")), None):
            if key == prefix + "_":
                raise ParamError(f"{where} {key!r} names no parameter of {prefix}")
            found.setdefault(prefix, _Fields(prefix)).put(key[len(prefix) + 1:], value, key)
        else:
            bare[key] = value
    if explicit == OPT_OUT:
        if found:
            raise ParamError(f"{SAMPLER_KEY}='none' conflicts with sampler fields for {', '.join(sorted(found))}")
        return OPT_OUT, {}
    if explicit is not None:
        try:
            registry.get("sampler", explicit)
        except UnknownPluginError as exc:  # a ValueError: HTTP 400, naming the field
            raise UnknownPluginError(f"{SAMPLER_KEY}: {exc}") from None
        others = sorted(set(found) - {explicit})
        if others:
            raise ParamError(f"{where}s select sampler {explicit!r} but also set fields of {', '.join(others)}")
    elif len(found) > 1:
        raise ParamError(f"one llmgraft sampler at a time; {where}s name {', '.join(sorted(found))}")
    selected = explicit or next(iter(found), None)
    if selected is None:
        if strict:
            near = closest(next(iter(bare), ""), ["sampler", *names]) if bare else None
            hint = f"; did you mean {near!r}?" if near else ""
            raise ParamError(f"the llmgraft server config names no sampler (set 'sampler'){hint} "
                             f"(keys: {', '.join(map(repr, fields))})")
        return None, {}
    collected = found.get(selected) or _Fields(selected)
    params_cls = registry.get("sampler", selected).params_cls
    parameters = params_cls.field_names()
    aliases = params_cls.aliases
    for key, value in bare.items():
        if key in parameters:
            collected.put(key, value, key)
        elif key in aliases:
            collected.put(aliases[key], value, key)
        elif (near := closest(key, parameters) or closest(key, names)) or strict:
            hint = f"; did you mean {near!r}?" if near else ""
            raise ParamError(f"{where} {key!r} is not a parameter of {selected}{hint} "
                             f"(parameters: {', '.join(parameters)})")
    return selected, collected.values


def parse_sampler_fields(fields: Mapping[str, Any] | None, registry: Registry | None = None
                         ) -> SamplerChoice | str | None:
    """The request's own choice: a :class:`SamplerChoice`, :data:`OPT_OUT`, or None if it names none."""
    return resolve_sampler(fields, None, registry, opt_out=OPT_OUT)


#: Keys of the "llmgraft" server section that configure features other than sampling (their own parsers).
OTHER_SECTIONS = (RETENTION_KEY,)


def parse_server_defaults(config: Mapping[str, Any] | None, registry: Registry | None = None
                          ) -> SamplerChoice | None:
    """Server-wide default from ``{"sampler": name, ...fields}`` (vLLM ``--additional-config`` "llmgraft").

    The section is llmgraft's alone, so every key in it must be known: a typo is an error, never a
    silently missing default. Keys in :data:`OTHER_SECTIONS` belong to other features and are skipped.
    """
    if not isinstance(config, Mapping) and config:
        raise ParamError(f"llmgraft server config must be a mapping, got {config!r}")
    config = {k: v for k, v in (config or {}).items() if k not in OTHER_SECTIONS}
    if not config:
        return None
    fields = {SAMPLER_KEY if k == "sampler" else k: v for k, v in config.items()}
    choice = parse_own_fields(fields, "server config key", registry)
    return None if choice == OPT_OUT else choice


def parse_own_fields(fields: Mapping[str, Any], where: str, registry: Registry | None = None
                     ) -> SamplerChoice | str:
    """A sampler choice from fields that are llmgraft's alone (a server config, a processor's keywords),
    in the request-field spellings, with every key known; ``where`` names the fields in errors."""
    registry = registry or get_registry()
    name, values = _parse(fields, registry, where=where, strict=True)
    if name == OPT_OUT:
        return OPT_OUT
    sampler = registry.get("sampler", name)
    return SamplerChoice(sampler, sampler.params_cls.from_mapping(values))


def resolve_sampler(fields: Mapping[str, Any] | None, default: SamplerChoice | None,
                    registry: Registry | None = None, opt_out: Any = None) -> SamplerChoice | Any:
    """The request's sampler: its own choice, else the server default; ``opt_out`` if it opted out.

    When the request picks the default's sampler, its fields override the default's parameters. (A
    request that selects no sampler keeps the default as it is: its bare keys are not read, because
    admission, in vLLM's API process, validates requests without knowing the server's default.)
    """
    if not fields:
        return default
    registry = registry or get_registry()
    name, values = _parse(fields, registry)
    if name == OPT_OUT:
        return opt_out
    if name is None:
        return default
    sampler = registry.get("sampler", name)
    if default is not None and default.sampler.name == name:
        try:
            return SamplerChoice(sampler, sampler.params_cls.from_mapping({**default.params.to_dict(), **values}))
        except ParamError:  # a cross-field rule between default and request: the request was validated alone
            pass
    return SamplerChoice(sampler, sampler.params_cls.from_mapping(values))
