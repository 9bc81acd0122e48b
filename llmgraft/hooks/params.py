"""Self-validating parameter dataclasses shared by every hook family.

A method declares its parameters as a frozen dataclass subclassing :class:`Params`, each field made with
:func:`param` (or its shorthands :func:`per_row` and :func:`choice`), which carries a one-line ``help``
text and, for numbers, a ``range`` such as ``"(0, 1]"``. Construction checks types (ints widen to floats;
strings and bools never pass as numbers; JSON lists become tuples), ranges and choices, then calls
:meth:`Params.validate` for cross-field rules, so an invalid value can never reach a kernel.

Supported field types: ``float``, ``int``, ``bool``, ``str``, ``X | None``, ``tuple[X, ...]``,
``tuple[X, Y]`` and ``list[X]`` (stored as a tuple, so parameters stay hashable), nested freely.

Fields made with ``per_row=True`` (numbers only) may differ between the rows of one batch and are stacked
to [B] tensors; the others are "static" and rows are grouped by them (see :meth:`Params.group_key`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import types
import typing
from collections.abc import Mapping, Sequence
from types import SimpleNamespace
from typing import Any, ClassVar

from .errors import ParamError

_META = "llmgraft"
_INTERVAL = re.compile(r"^\s*([\[(])\s*(-?inf|[-+0-9.e]+)\s*,\s*(\+?inf|[-+0-9.e]+)\s*([\])])\s*$")


@dataclasses.dataclass(frozen=True)
class Interval:
    """A numeric range written as in mathematics: ``"(0, 1]"``, ``"[1, inf)"``."""

    text: str
    low: float
    high: float
    low_open: bool
    high_open: bool

    @classmethod
    def parse(cls, text: str) -> Interval:
        match = _INTERVAL.match(text)
        if not match:
            raise ValueError(f"range {text!r} is not an interval such as '(0, 1]' or '[1, inf)'")
        left, low, high, right = match.groups()
        return cls(text.strip(), float(low), float(high), left == "(", right == ")")

    def __contains__(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below


@dataclasses.dataclass(frozen=True)
class FieldSpec:
    """What :func:`param` records beside a field."""

    help: str
    range: Interval | None = None
    choices: tuple[str, ...] | None = None
    per_row: bool = False


def param(default: Any = dataclasses.MISSING, *, help: str, range: str | None = None,  # noqa: A002
          choices: Sequence[str] | None = None, per_row: bool = False) -> Any:
    """A parameter field: ``help`` (one line, shown by ``llmgraft plugins``), an optional numeric
    ``range`` (checked on construction, also for each number inside a tuple), optional string
    ``choices``, and ``per_row`` for numbers that may differ per request in one batch."""
    spec = FieldSpec(help, Interval.parse(range) if range else None, tuple(choices) if choices else None,
                     per_row)
    if isinstance(default, (list, dict, set)):
        raise ValueError("mutable defaults are not allowed; use a tuple")
    return dataclasses.field(default=default, metadata={_META: spec})


def per_row(default: float | int, *, help: str, range: str | None = None) -> Any:  # noqa: A002
    """A number that may take a different value in every row of a batch (it is stacked to a tensor)."""
    return param(default, help=help, range=range, per_row=True)


def choice(default: str, choices: Sequence[str], *, help: str) -> Any:  # noqa: A002
    """A string restricted to ``choices``."""
    if default not in choices:
        raise ValueError(f"default {default!r} not among {tuple(choices)}")
    return param(default, help=help, choices=choices)


def _spec(f: dataclasses.Field) -> FieldSpec | None:
    return f.metadata.get(_META)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    """The resolved field types of a Params class, once per class (resolving them costs more than the
    rest of a construction, and parameters are built for every request)."""
    return typing.get_type_hints(cls)


def _type_name(kind: Any) -> str:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin in (tuple, list):
        inner = ", ".join("..." if a is Ellipsis else _type_name(a) for a in args)
        return f"{origin.__name__}[{inner}]"
    return "None" if kind is type(None) else getattr(kind, "__name__", str(kind))


def _unsupported(kind: Any) -> str | None:
    """Why a field type cannot be a parameter, or None if it can."""
    if kind in (float, int, bool, str, type(None)):
        return None
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType, tuple, list) and args:
        for arg in args:
            if arg is not Ellipsis and (why := _unsupported(arg)):
                return why
        return None
    return f"type {_type_name(kind)} is not supported (use float, int, bool, str, X | None, tuple or list)"


@dataclasses.dataclass(frozen=True)
class Params:
    """Base of every method's parameters. Subclasses are ``@dataclass(frozen=True)``; fields use
    :func:`param`; :meth:`validate` may add cross-field rules."""

    #: Name used in error messages; registration sets it to the method's name unless a subclass set it.
    owner: ClassVar[str] = "llmgraft"
    #: Other spellings users reach for, mapped to field names (``{"lambda": "lam"}``); accepted everywhere.
    aliases: ClassVar[dict[str, str]] = {}

    def __post_init__(self) -> None:
        hints = _hints(type(self))
        for f in dataclasses.fields(self):
            spec = _spec(f)
            where = f"{self.owner}: {f.name}"
            value = _coerce(where, hints[f.name], getattr(self, f.name))
            if spec is not None:
                _check_spec(where, spec, value)
            object.__setattr__(self, f.name, value)
        self.validate()

    def validate(self) -> None:
        """Check cross-field rules; raise :class:`ParamError` with a message a user can act on."""

    # -- construction from loose mappings (request fields, config files, CLI) --------------------------
    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]):
        """Build from a mapping, rejecting unknown keys by name (with the closest valid name)."""
        from .names import closest

        names = cls.field_names()
        if cls.aliases and any(k in cls.aliases for k in values):
            values = dict(values)
            for alias, name in cls.aliases.items():
                if alias in values:
                    if name in values:
                        raise ParamError(f"{cls.owner}: {name!r} given twice ({alias!r} is another name for it)")
                    values[name] = values.pop(alias)
        unknown = sorted(set(values) - set(names))
        if unknown:
            hints = [f"{k!r} (did you mean {m!r}?)" if (m := closest(k, names)) else repr(k) for k in unknown]
            raise ParamError(f"{cls.owner}: unknown parameter(s) {', '.join(hints)}; "
                             f"valid: {', '.join(names) or '(none)'}")
        try:
            return cls(**values)
        except TypeError as exc:  # e.g. a required field missing
            raise ParamError(f"{cls.owner}: {exc}") from None

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def spec(cls, name: str) -> FieldSpec | None:
        """What :func:`param` declared for field ``name`` (help, range, choices, per_row)."""
        return next((_spec(f) for f in dataclasses.fields(cls) if f.name == name), None)

    @classmethod
    def describe(cls) -> list[dict[str, Any]]:
        """Per field: name, type, default, range (or choices) and help, for ``llmgraft plugins`` and docs."""
        hints = _hints(cls)
        rows = []
        for f in dataclasses.fields(cls):
            spec = _spec(f) or FieldSpec("")
            kind = _type_name(hints[f.name]) + (" (per row)" if spec.per_row else "")
            allowed = "|".join(spec.choices) if spec.choices else (spec.range.text if spec.range else "")
            default = f.default if f.default is not dataclasses.MISSING else "required"
            rows.append({"name": f.name, "type": kind, "default": default, "range": allowed, "help": spec.help})
        return rows

    @classmethod
    def check_class(cls) -> None:
        """Raise ``TypeError`` naming the first problem that makes ``cls`` unusable as parameters.

        Run at plugin registration: every field needs a supported type and a one-line help text,
        ``per_row`` fields are numbers, ranges belong to numbers and choices to strings, and the
        defaults themselves must validate.
        """
        declared = cls.__dict__.get("__dataclass_params__")  # a subclass of a dataclass is not one itself
        if declared is None or not declared.frozen:
            raise TypeError(f"{cls.__name__} must be decorated with @dataclass(frozen=True)")
        hints = _hints(cls)
        for f in dataclasses.fields(cls):
            where = f"{cls.__name__}.{f.name}"
            spec, kind = _spec(f), hints[f.name]
            if why := _unsupported(kind):
                raise TypeError(f"{where}: {why}")
            if spec is None or not spec.help.strip() or "\n" in spec.help:
                raise TypeError(f"{where}: declare it with llmgraft.param(..., help='one line')")
            if spec.per_row and kind not in (float, int):
                raise TypeError(f"{where}: per_row fields must be float or int, not {_type_name(kind)}")
            if spec.choices and kind is not str:
                raise TypeError(f"{where}: choices belong to str fields")
            if spec.range and not _numeric(kind):
                raise TypeError(f"{where}: a range belongs to numbers (or tuples of numbers)")
        if all(f.default is not dataclasses.MISSING for f in dataclasses.fields(cls)):
            try:
                cls()
            except ParamError as exc:
                raise TypeError(f"{cls.__name__}: its defaults are invalid: {exc}") from None

    # -- batching -----------------------------------------------------------------------------------------
    @classmethod
    def per_row_fields(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls) if (s := _spec(f)) is not None and s.per_row)

    def group_key(self) -> tuple:
        """The static (non per-row) values: rows with equal keys can be processed as one batch."""
        per_row_names = self.per_row_fields()
        return tuple((f.name, getattr(self, f.name)) for f in dataclasses.fields(self)
                     if f.name not in per_row_names)

    @classmethod
    def stack(cls, rows: Sequence[Params], device=None) -> SimpleNamespace:
        """Batch rows sharing a group key: per-row fields become float32/int64 tensors of shape [B]."""
        import torch

        if not rows:
            raise ValueError("cannot stack zero rows")
        key = rows[0].group_key()
        if any(r.group_key() != key for r in rows[1:]):
            raise ValueError("rows with different static parameters cannot share a batch")
        out = dict(key)
        hints = _hints(cls)
        for name in cls.per_row_fields():
            dtype = torch.float32 if hints[name] is float else torch.int64
            out[name] = torch.tensor([getattr(r, name) for r in rows], dtype=dtype, device=device)
        return SimpleNamespace(**out)


def _numeric(kind: Any) -> bool:
    if kind in (float, int):
        return True
    args = [a for a in typing.get_args(kind) if a is not Ellipsis and a is not type(None)]
    return bool(args) and all(_numeric(a) for a in args)


def _check_spec(where: str, spec: FieldSpec, value: Any) -> None:
    if spec.choices and value not in spec.choices:
        raise ParamError(f"{where} must be one of {', '.join(spec.choices)}; got {value!r}")
    if spec.range:
        for number in _numbers(value):
            if number not in spec.range:
                raise ParamError(f"{where} must be in {spec.range.text}, got {number}")


def _numbers(value: Any):
    if isinstance(value, tuple):
        for item in value:
            yield from _numbers(item)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield value


def _coerce(where: str, kind: Any, value: Any) -> Any:
    """``value`` checked against ``kind`` (ints widen to floats, lists become tuples), or ParamError."""
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ParamError(f"{where} must be a number, got {value!r}")
        value = float(value)
        if not math.isfinite(value):
            raise ParamError(f"{where} must be finite, got {value!r}")
        return value
    if kind is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamError(f"{where} must be an integer, got {value!r}")
        return value
    if kind is bool:
        if not isinstance(value, bool):
            raise ParamError(f"{where} must be true or false, got {value!r}")
        return value
    if kind is str:
        if not isinstance(value, str):
            raise ParamError(f"{where} must be a string, got {value!r}")
        return value
    if kind is type(None):
        if value is not None:
            raise ParamError(f"{where} must be null, got {value!r}")
        return None
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(where, arg, value)
            except ParamError as exc:
                errors.append(str(exc))
        raise ParamError(errors[0] if len(errors) == 1 else f"{where} must be {_type_name(kind)}, got {value!r}")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ParamError(f"{where} must be a list ({_type_name(kind)}), got {value!r}")
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise ParamError(f"{where} must have {len(args)} items ({_type_name(kind)}), got {value!r}")
            return tuple(_coerce(f"{where}[{i}]", a, v) for i, (a, v) in enumerate(zip(args, value)))
        item = args[0]
        return tuple(_coerce(f"{where}[{i}]", item, v) for i, v in enumerate(value))
    raise ParamError(f"{where}: unsupported parameter type {_type_name(kind)}")
