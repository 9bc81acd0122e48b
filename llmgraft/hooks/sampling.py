"""From flat request fields (vLLM ``extra_args`` / ``vllm_xargs``, server defaults) to a sampler choice.

Request fields are flat (vLLM's ``vllm_xargs`` allows no nesting), so three spellings are accepted:

* shorthand: ``{"top_h": 0.4}`` selects sampler ``top_h`` and sets its primary parameter (alpha);
* prefixed parameters: ``{"top_h_variant": "hf", "top_h_top_n": 50}``;
* general form: ``{"llmgraft_sampler": "<name>", "<name>_<param>": ...}``, for any registered sampler.

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
            found.setdefault(key, {})[primary] = value
            continue
        for name in names:
            if key.startswith(name + "_"):
                found.setdefault(name, {})[key[len(name) + 1:]] = value
                break
    return explicit, found


def parse_sampler_fields(fields: Mapping[str, Any] | None, registry: Registry | None = None
                         ) -> SamplerChoice | str | None:
    """The request's own choice: a :class:`SamplerChoice`, :data:`OPT_OUT`, or None if it names none."""
    if not fields:
        return None
    registry = registry or get_registry()
    explicit, found = _split(fields, registry)
    if explicit == OPT_OUT:
        if found:
            raise ParamError(f"{SAMPLER_KEY}='none' conflicts with sampler fields for {', '.join(sorted(found))}")
        return OPT_OUT
    if explicit is not None:
        sampler = registry.get("sampler", explicit)  # unknown name → UnknownPluginError (a ValueError)
        others = sorted(set(found) - {explicit})
        if others:
            raise ParamError(f"request selects sampler {explicit!r} but also sets fields of {', '.join(others)}")
        return SamplerChoice(sampler, sampler.params_cls.from_mapping(found.get(explicit, {})))
    if not found:
        return None
    if len(found) > 1:
        raise ParamError(f"one llmgraft sampler per request; fields name {', '.join(sorted(found))}")
    (name, values), = found.items()
    sampler = registry.get("sampler", name)
    return SamplerChoice(sampler, sampler.params_cls.from_mapping(values))


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
                    registry: Registry | None = None) -> SamplerChoice | None:
    """The request's sampler: its own choice, else the server default (unless it opted out).

    When the request picks the default's sampler, its fields override the default's parameters.
    """
    choice = parse_sampler_fields(fields, registry)
    if choice == OPT_OUT:
        return None
    if choice is None:
        return default
    if default is not None and choice.sampler.name == default.sampler.name and fields:
        registry = registry or get_registry()
        _, found = _split(fields, registry)
        base = default.params.to_dict()
        base.update(found.get(choice.sampler.name, {}))
        return SamplerChoice(choice.sampler, choice.sampler.params_cls.from_mapping(base))
    return choice
