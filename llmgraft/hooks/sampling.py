"""From flat request fields (vLLM ``extra_args`` / ``vllm_xargs``, server defaults) to a sampler choice.

Request fields are flat (vLLM's ``vllm_xargs`` allows no nesting), so three spellings are accepted:

* shorthand: ``{"top_h": 0.4}`` selects sampler ``top_h`` and sets its primary parameter (alpha);
* prefixed parameters: ``{"top_h_variant": "hf", "top_h_top_n": 50}``;
* general form: ``{"llmgraft_sampler": "<name>", "<param>": ...}`` (or ``"<name>_<param>"``), for any
  registered sampler, third-party ones included.

``{"llmgraft_sampler": "none"}`` opts a request out of a server-wide default. Keys that belong to no
llmgraft sampler are ignored (they may be another logits processor's); keys that do are validated strictly.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import ParamError
from .families import Sampler
from .manager import Registry, get_registry
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


def _split(fields: Mapping[str, Any], registry: Registry) -> tuple[str | None, dict[str, dict[str, Any]]]:
    """(explicit sampler name, {sampler name: {param: value}}) from flat fields."""
    names = sorted(registry.names("sampler"), key=len, reverse=True)
    explicit = None
    found: dict[str, dict[str, Any]] = {}
    for key, value in fields.items():
        if key == SAMPLER_KEY:
            if not isinstance(value, str):
                raise ParamError(f"{SAMPLER_KEY} must be a sampler name, got {value!r}")
            explicit = value
            continue
        if key.startswith("llmgraft_"):
            raise ParamError(f"unknown llmgraft field {key!r}; did you mean {SAMPLER_KEY!r}?")
        if key in names:
            primary = registry.get("sampler", key).primary
            if primary is None:
                raise ParamError(f"sampler {key!r} has no shorthand; use {SAMPLER_KEY!r} and {key}_<param> fields")
            _put(found.setdefault(key, {}), key, primary, value)
            continue
        for name in names:
            if key.startswith(name + "_"):
                _put(found.setdefault(name, {}), name, key[len(name) + 1:], value)
                break
    return explicit, found


def _parse(fields: Mapping[str, Any], registry: Registry) -> tuple[str | None, dict[str, Any]]:
    """(sampler name, :data:`OPT_OUT` or None; that sampler's parameter values) from flat fields."""
    explicit, found = _split(fields, registry)
    if explicit == OPT_OUT:
        if found:
            raise ParamError(f"{SAMPLER_KEY}='none' conflicts with sampler fields for {', '.join(sorted(found))}")
        return OPT_OUT, {}
    if explicit is not None:
        sampler = registry.get("sampler", explicit)  # unknown name → UnknownPluginError (a ValueError)
        others = sorted(set(found) - {explicit})
        if others:
            raise ParamError(f"request selects sampler {explicit!r} but also sets fields of {', '.join(others)}")
        values = found.get(explicit, {})
        for name in sampler.params_cls.field_names():  # the general form may also name parameters bare
            if name in fields:
                _put(values, explicit, name, fields[name])
        return explicit, values
    if len(found) > 1:
        raise ParamError(f"one llmgraft sampler per request; fields name {', '.join(sorted(found))}")
    return next(iter(found.items()), (None, {}))


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
