"""Pydantic's validation errors, retold for people who write YAML.

Pydantic reports where (``loc``) and what (``type``) precisely, but in Python
terms: ``Input should be a valid dictionary or instance of Resources`` and a
link to its docs. Users need the YAML field path, the value they wrote and
what to write instead. :func:`explain` walks the model's fields along the
error's location (so it can skip union tags, which are not YAML, and knows the
fields that *are* allowed where an unknown one appeared) and phrases the
message per error type.
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, Tag
from pydantic.fields import FieldInfo

# -- walking the model along an error location ---------------------------------


def _candidates(annotation: Any) -> list[tuple[str | None, Any]]:
    """Types ``annotation`` may hold, with their union tag if they have one."""
    found: list[tuple[str | None, Any]] = []
    tag: str | None = None
    while typing.get_origin(annotation) is typing.Annotated:
        for extra in annotation.__metadata__:
            if isinstance(extra, Tag):
                tag = extra.tag
        annotation = annotation.__origin__
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        for member in typing.get_args(annotation):
            if member is not type(None):
                found.extend(_candidates(member))
        return found
    return [(tag, annotation)]


def _field(model: type[BaseModel], key: str) -> FieldInfo | None:
    for name, info in model.model_fields.items():
        if key in (info.alias, name):
            return info
    return None


class _Walk:
    """The YAML path of a location, plus what the model says about its last step."""

    def __init__(self, root: type[BaseModel], loc: tuple[int | str, ...]) -> None:
        self.path = ""
        self.field: FieldInfo | None = None
        self.parent_models: list[type[BaseModel]] = []
        current: list[tuple[str | None, Any]] = [(None, root)]
        for step in loc:
            tagged = [c for c in current if c[0] is not None and c[0] == step]
            if tagged:  # a union tag pydantic inserts: not part of the YAML path
                current = tagged
                continue
            self.parent_models = [t for _, t in current if _is_model(t)]
            if isinstance(step, int):
                self.path += f"[{step}]"
            else:
                self.path += f".{step}" if self.path else step
            self.field = None
            following: list[tuple[str | None, Any]] = []
            for _, tp in current:
                if _is_model(tp) and isinstance(step, str):
                    info = _field(tp, step)
                    if info is not None:
                        self.field = info
                        following.extend(_candidates(info.annotation))
                elif typing.get_origin(tp) in (list, dict):
                    following.extend(_candidates(typing.get_args(tp)[-1]))
            current = following

    def allowed(self) -> list[str]:
        """YAML spellings of the fields allowed beside the last step."""
        names: list[str] = []
        for model in self.parent_models:
            names.extend(info.alias or name for name, info in model.model_fields.items())
        return sorted(set(names))


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


# -- phrasing -------------------------------------------------------------------


def shown(value: Any) -> str:
    """How a YAML value the user wrote reads back in a message."""
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return f"the number {value}"
    if isinstance(value, str):
        return f"the text {value!r}"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


def _quote_hint(value: Any) -> str:
    if isinstance(value, bool | int | float):
        return "; quote it if you meant text, e.g. \"8080\""
    return ""


def did_you_mean(word: str, choices: list[str]) -> str | None:
    """The closest choice, comparing case- and separator-insensitively so max_surge finds maxSurge."""

    def norm(text: str) -> str:
        return re.sub(r"[-_]", "", text.lower())

    by_norm = {norm(c): c for c in choices}
    if norm(word) in by_norm:
        return by_norm[norm(word)]
    close = difflib.get_close_matches(norm(word), list(by_norm), n=1, cutoff=0.6)
    return by_norm[close[0]] if close else None


_EXPECTED = {
    "string_type": "expected text",
    "int_type": "expected a whole number",
    "int_parsing": "expected a whole number",
    "int_from_float": "expected a whole number",
    "float_type": "expected a number",
    "float_parsing": "expected a number",
    "bool_type": "expected true or false",
    "bool_parsing": "expected true or false",
    "dict_type": "expected a mapping (key: value)",
    "model_type": "expected a mapping (key: value)",
    "model_attributes_type": "expected a mapping (key: value)",
    "list_type": "expected a list",
    "path_type": "expected a file path",
}

_BOUNDS = {
    "greater_than": ("gt", "must be more than {}"),
    "greater_than_equal": ("ge", "must be {} or more"),
    "less_than": ("lt", "must be less than {}"),
    "less_than_equal": ("le", "must be {} or less"),
}


def explain(root: type[BaseModel], error: Mapping[str, Any]) -> tuple[str, str]:
    """``(field path, message)`` for one pydantic error raised while validating ``root``."""
    kind = error["type"]
    value = error.get("input")
    ctx = error.get("ctx") or {}
    loc = tuple(error["loc"])
    if kind == "extra_forbidden":
        walk = _Walk(root, loc)
        allowed = walk.allowed()
        guess = did_you_mean(str(loc[-1]), allowed) if loc else None
        if guess is not None:
            return walk.path, f"unknown field; did you mean {guess!r}?"
        return walk.path, "unknown field; allowed here: " + ", ".join(allowed)
    walk = _Walk(root, loc)
    if kind == "missing":
        hint = walk.field.description if walk.field is not None else None
        return walk.path, "required field is missing" + (f"; {hint}" if hint else "")
    if kind in _EXPECTED:
        return walk.path, f"{_EXPECTED[kind]}, got {shown(value)}" + (
            _quote_hint(value) if kind == "string_type" else ""
        )
    if kind in _BOUNDS:
        key, phrase = _BOUNDS[kind]
        bound = ctx.get(key)
        if isinstance(bound, float) and bound.is_integer():
            bound = int(bound)
        return walk.path, phrase.format(bound) + f", got {shown(value)}"
    if kind in ("literal_error", "enum"):
        expected = str(ctx.get("expected", ""))
        choices = re.findall(r"'([^']*)'", expected)
        message = f"{value!r} is not one of {expected}"
        guess = did_you_mean(str(value), choices) if isinstance(value, str) else None
        return walk.path, message + (f"; did you mean {guess!r}?" if guess else "")
    if kind in ("value_error", "assertion_error") and "error" in ctx:
        return walk.path, str(ctx["error"])
    message = error["msg"]
    return walk.path, message[:1].lower() + message[1:]
