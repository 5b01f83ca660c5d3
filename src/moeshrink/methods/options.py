"""Method options, declared once: a pydantic model per method gives the types, defaults and ranges,
validates what the user gave (lax mode, so ``--option KEY=VALUE`` strings coerce), says what is
recorded in the plan, and describes itself for the command-line help."""

from __future__ import annotations

import json
import types
import typing
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic.fields import FieldInfo

from moeshrink.errors import MoeShrinkError

_MISSING = object()


class MethodOptions(BaseModel):
    """The options of one expert-level method (none here): a method class declares its own as a nested
    ``class Options(MethodOptions)`` with typed fields, defaults and ``Field(ge=..., le=...)`` ranges.

    Fields are recorded in the plan in declaration order; :meth:`omitted` names those a setting makes
    meaningless (left out of the plan, as they always were). ``found`` names options the method sets
    itself (a STUN threshold found under a global budget): never given by the user."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    found: ClassVar[frozenset[str]] = frozenset()

    def omitted(self) -> set[str]:
        """Options not recorded in the plan with these settings (none by default)."""
        return set()

    def recorded(self) -> dict[str, Any]:
        """The options as the plan records them: declaration order, less :meth:`omitted`."""
        skip = self.omitted()
        return {name: getattr(self, name) for name in type(self).model_fields if name not in skip}

    @classmethod
    def given(cls) -> list[str]:
        """The options a user may give, in declaration order."""
        return [name for name in cls.model_fields if name not in cls.found]

    @classmethod
    def parse(cls, method: str, options: dict[str, Any]) -> MethodOptions:
        """Validate ``options`` for ``method``, or raise a one-line :class:`MoeShrinkError` naming the
        method, the option, what is allowed and what was given."""
        try:
            return cls(**options)
        except ValidationError as e:
            raise MoeShrinkError("; ".join(_problem(cls, method, error) for error in e.errors())) from None


def _problem(cls: type[MethodOptions], method: str, error: Any) -> str:
    """One validation error as a short phrase."""
    if not error["loc"]:  # a rule over several options
        return f"{method} options: {error['msg']}"
    name = str(error["loc"][0])
    given = error.get("input", _MISSING)
    if error["type"] == "extra_forbidden" or name not in cls.model_fields:
        known = cls.given()
        return f"{method} has no option {name!r}; " + (
            f"known options: {', '.join(known)}" if known else f"{method} takes no options"
        )
    shown = "" if given is _MISSING else f", got {given!r}"
    return f"{method} {name} must be {allowed(cls.model_fields[name])}{shown}"


def _kinds(annotation: Any) -> list[Any]:
    """The alternatives of a union annotation (one item otherwise)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return list(typing.get_args(annotation))
    return [annotation]


def _type_name(annotation: Any) -> str:
    """A short name of the field's type for the help: ``int``, ``float | null``, ``str``..."""
    names = {int: "int", float: "float", bool: "bool", str: "str", type(None): "null"}
    parts = [
        "str" if typing.get_origin(kind) is Literal else names.get(kind, getattr(kind, "__name__", str(kind)))
        for kind in _kinds(annotation)
    ]
    return " | ".join(parts)


def _range(field: FieldInfo) -> str:
    """The field's bounds, e.g. ``>= 1``; empty when unbounded."""
    symbols = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
    bounds = [
        f"{symbol} {getattr(item, bound)}"
        for item in field.metadata
        for bound, symbol in symbols.items()
        if getattr(item, bound, None) is not None
    ]
    return " and ".join(bounds)


def allowed(field: FieldInfo) -> str:
    """What a field accepts, in words: ``one of a, b``, ``an integer >= 1 or null``..."""
    words = {int: "an integer", float: "a number", bool: "true or false", str: "a string", type(None): "null"}
    bounds = _range(field)
    parts = []
    for kind in _kinds(field.annotation):
        if typing.get_origin(kind) is Literal:
            parts.append("one of " + ", ".join(str(v) for v in typing.get_args(kind)))
        elif kind is type(None):
            continue
        else:
            parts.append(
                words.get(kind, str(kind)) + (f" {bounds}" if bounds and kind in (int, float) else "")
            )
    if type(None) in _kinds(field.annotation):
        parts.append("null")
    return " or ".join(parts)


def describe(cls: type[MethodOptions]) -> str:
    """One line per option the user may give: name, type, default, range (and a note, if declared)."""
    lines = []
    for name in cls.given():
        field = cls.model_fields[name]
        default = field.default if isinstance(field.default, str) else json.dumps(field.default)
        line = f"{name}: {_type_name(field.annotation)}, default {default}"
        choices = [k for k in _kinds(field.annotation) if typing.get_origin(k) is Literal]
        if choices:
            line += ", one of " + ", ".join(str(v) for k in choices for v in typing.get_args(k))
        elif _range(field):
            line += f", {_range(field)}"
        if field.description:
            line += f" ({field.description})"
        lines.append(line)
    return "\n".join(lines)
