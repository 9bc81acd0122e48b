"""Self-validating parameter dataclasses shared by every hook family.

A method declares its parameters as a frozen dataclass subclassing :class:`Params`. Construction checks
types (ints widen to floats; bools never pass as numbers) and calls :meth:`Params.validate` for ranges, so
an invalid value can never reach a kernel. Fields made with :func:`per_row` may differ between the rows of
one batch; the others are "static" and rows are grouped by them (see :meth:`Params.group_key`).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Mapping, Sequence
from types import SimpleNamespace
from typing import Any, ClassVar

from .errors import ParamError

_PER_ROW = "llmgraft_per_row"
_CHOICES = "llmgraft_choices"


def per_row(default: float | int):
    """A numeric field that may take a different value in every row of a batch (it is stacked to a tensor)."""
    return dataclasses.field(default=default, metadata={_PER_ROW: True})


def choice(default: str, choices: Sequence[str]):
    """A string field restricted to ``choices``."""
    if default not in choices:
        raise ValueError(f"default {default!r} not among {tuple(choices)}")
    return dataclasses.field(default=default, metadata={_CHOICES: tuple(choices)})


@dataclasses.dataclass(frozen=True)
class Params:
    """Base of every method's parameters. Subclasses are ``@dataclass(frozen=True)`` and override validate."""

    #: Name used in error messages (the method name); set by subclasses.
    owner: ClassVar[str] = "llmgraft"

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, self._coerce(f, hints[f.name], getattr(self, f.name)))
        self.validate()

    def validate(self) -> None:
        """Check ranges and cross-field rules; raise :class:`ParamError` with a message a user can act on."""

    # -- construction from loose mappings (request fields, config files, CLI) --------------------------
    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]):
        """Build from a mapping, rejecting unknown keys by name and listing the valid ones."""
        names = cls.field_names()
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise ParamError(f"{cls.owner}: unknown parameter(s) {', '.join(map(repr, unknown))}; "
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
    def describe(cls) -> list[tuple[str, str, Any]]:
        """(name, type, default) for each field, for ``llmgraft plugins`` and docs."""
        hints = typing.get_type_hints(cls)
        rows = []
        for f in dataclasses.fields(cls):
            kind = getattr(hints[f.name], "__name__", str(hints[f.name]))
            if _CHOICES in f.metadata:
                kind = "|".join(f.metadata[_CHOICES])
            if f.metadata.get(_PER_ROW):
                kind += " (per row)"
            default = f.default if f.default is not dataclasses.MISSING else "required"
            rows.append((f.name, kind, default))
        return rows

    # -- batching -----------------------------------------------------------------------------------------
    @classmethod
    def per_row_fields(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get(_PER_ROW))

    def group_key(self) -> tuple:
        """The static (non per-row) values: rows with equal keys can be processed as one batch."""
        return tuple((f.name, getattr(self, f.name)) for f in dataclasses.fields(self)
                     if not f.metadata.get(_PER_ROW))

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
        hints = typing.get_type_hints(cls)
        for name in cls.per_row_fields():
            dtype = torch.float32 if hints[name] is float else torch.int64
            out[name] = torch.tensor([getattr(r, name) for r in rows], dtype=dtype, device=device)
        return SimpleNamespace(**out)

    # -- type checks --------------------------------------------------------------------------------------
    def _coerce(self, f: dataclasses.Field, kind: Any, value: Any) -> Any:
        where = f"{self.owner}: parameter {f.name!r}"
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
            choices = f.metadata.get(_CHOICES)
            if choices and value not in choices:
                raise ParamError(f"{where} must be one of {', '.join(choices)}; got {value!r}")
            return value
        return value
