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

from .errors import ParamError
from .families import Sampler
from .manager import Registry, get_registry
from .names import closest
from .params import Params

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


def _put(values: dict[str, Any], sampler: str, param: str, value: Any) -> None:
    if param in values:
        raise ParamError(f"{sampler}: parameter {param!r} given twice")
    values[param] = value


def _parse(fields: Mapping[str, Any], registry: Registry) -> tuple[str | None, dict[str, Any]]:
    """(sampler name, :data:`OPT_OUT` or None; that sampler's parameter values) from flat fields."""
    names = sorted(registry.names("sampler"), key=len, reverse=True)  # longest prefix wins
    explicit = None
    found: dict[str, dict[str, Any]] = {}  # sampler → parameters set by its shorthand or prefixed keys
    bare: dict[str, Any] = {}
    for key, value in fields.items():
        if key == SAMPLER_KEY:
            if not isinstance(value, str):
                raise ParamError(f"{SAMPLER_KEY} must be a sampler name, got {value!r}")
            explicit = value
        elif key.startswith("llmgraft_"):
            raise ParamError(f"unknown llmgraft field {key!r}; did you mean {SAMPLER_KEY!r}?")
        elif key in names:
            primary = registry.get("sampler", key).primary
            if primary is None:
                raise ParamError(f"sampler {key!r} has no shorthand; use {SAMPLER_KEY!r} and {key}_<param> fields")
            _put(found.setdefault(key, {}), key, primary, value)
        elif prefix := next((n for n in names if key.startswith(n + "_")), None):
            _put(found.setdefault(prefix, {}), prefix, key[len(prefix) + 1:], value)
        else:
            bare[key] = value
    if explicit == OPT_OUT:
        if found:
            raise ParamError(f"{SAMPLER_KEY}='none' conflicts with sampler fields for {', '.join(sorted(found))}")
        return OPT_OUT, {}
    if explicit is not None:
        registry.get("sampler", explicit)  # an unknown name is an UnknownPluginError (a ValueError)
        others = sorted(set(found) - {explicit})
        if others:
            raise ParamError(f"request selects sampler {explicit!r} but also sets fields of {', '.join(others)}")
    elif len(found) > 1:
        raise ParamError(f"one llmgraft sampler per request; fields name {', '.join(sorted(found))}")
    selected = explicit or next(iter(found), None)
    if selected is None:
        return None, {}
    values = found.get(selected, {})
    parameters = registry.get("sampler", selected).params_cls.field_names()
    for key, value in bare.items():
        if key in parameters:
            _put(values, selected, key, value)
        elif near := closest(key, parameters) or closest(key, names):
            raise ParamError(f"request field {key!r} is not a parameter of {selected}; did you mean {near!r}? "
                             f"(parameters: {', '.join(parameters)})")
    return selected, values


def parse_sampler_fields(fields: Mapping[str, Any] | None, registry: Registry | None = None
                         ) -> SamplerChoice | str | None:
    """The request's own choice: a :class:`SamplerChoice`, :data:`OPT_OUT`, or None if it names none."""
    return resolve_sampler(fields, None, registry, opt_out=OPT_OUT)


def parse_server_defaults(config: Mapping[str, Any] | None, registry: Registry | None = None
                          ) -> SamplerChoice | None:
    """Server-wide default from ``{"sampler": name, ...fields}`` (vLLM ``--additional-config`` "llmgraft")."""
    if not config:
        return None
    if not isinstance(config, Mapping):
        raise ParamError(f"llmgraft server config must be a mapping, got {config!r}")
    fields = {SAMPLER_KEY if k == "sampler" else k: v for k, v in config.items()}
    choice = parse_sampler_fields(fields, registry)
    return None if choice == OPT_OUT else choice


def resolve_sampler(fields: Mapping[str, Any] | None, default: SamplerChoice | None,
                    registry: Registry | None = None, opt_out: Any = None) -> SamplerChoice | Any:
    """The request's sampler: its own choice, else the server default; ``opt_out`` if it opted out.

    When the request picks the default's sampler, its fields override the default's parameters.
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
        values = {**default.params.to_dict(), **values}
    return SamplerChoice(sampler, sampler.params_cls.from_mapping(values))
