"""Checking and reading config dataclass fields: the machinery behind `qlora.config`.

* `check_fields`: every field's value against its annotation (``Literal`` choices listed,
  unions, lists, finite numbers), after the coercions YAML and Python callers need.
* `require`: a range rule, with the ``section.key must be ..., got ...`` message.
* `field_choices`, `field_doc`, `doc_entry`: what the command line reads off a field (its
  choices and its ``Attributes:`` docstring line) so that flags restate nothing.

Each config dataclass names its YAML section in a ``SECTION`` class variable, which prefixes
every message.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import types
import typing
from typing import Any, Literal, Union

__all__ = [
    "ConfigError",
    "check_fields",
    "check_value",
    "doc_entry",
    "field_choices",
    "field_doc",
    "field_types",
    "literal_choices",
    "require",
]


class ConfigError(ValueError):
    """A configuration key or value is invalid; the message names it and the valid choices."""


def require(config: Any, name: str, ok: bool, rule: str) -> None:
    """ConfigError ``section.name must be <rule>, got <value>`` unless ``ok``."""
    if not ok:
        value = getattr(config, name)
        raise ConfigError(f"{config.SECTION}.{name} must be {rule}, got {value!r}")


def check_fields(config: Any) -> None:
    """Coerce and type-check every field of a config dataclass against its annotation."""
    for name, hint in field_types(type(config)).items():
        value = _coerce(getattr(config, name), hint)
        check_value(f"{config.SECTION}.{name}", value, hint)
        setattr(config, name, value)


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """Field name -> resolved annotation (ClassVars left out)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in typing.get_type_hints(cls).items() if k in names}


def _coerce(value: Any, annotation: Any) -> Any:
    """The value a field stores: tuples as lists, ints in float fields as floats, paths as str."""
    if isinstance(value, tuple):
        return [_coerce(v, Any) for v in value]
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)  # YAML writes 2 for 2.0
    accepts_str = annotation is str or str in typing.get_args(annotation)
    if accepts_str and isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


_TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
_PLURALS = {bool: "booleans", int: "integers", float: "numbers", str: "strings"}


def _describe(annotation: Any) -> str:
    """How an error message names a type: "a number", "a list of strings"."""
    if typing.get_origin(annotation) is list:
        (item,) = typing.get_args(annotation) or (Any,)
        return f"a list of {_PLURALS.get(item, 'values')}"
    return _TYPE_WORDS.get(annotation, getattr(annotation, "__name__", str(annotation)))


def literal_choices(annotation: Any) -> tuple[Any, ...]:
    """The values a ``Literal`` annotation allows, or a union of Literals and None (None
    included: ``QuantKind | None``); () when the annotation allows any other type."""
    union = typing.get_origin(annotation) in (Union, types.UnionType)
    return _choices(typing.get_args(annotation) if union else (annotation,))


def _choices(options: tuple[Any, ...]) -> tuple[Any, ...]:
    choices: list[Any] = []
    for option in options:
        if typing.get_origin(option) is Literal:
            choices += typing.get_args(option)
        elif option is type(None):
            choices.append(None)
        else:
            return ()
    return tuple(choices)


def _check_union(name: str, value: Any, options: tuple[Any, ...]) -> None:
    errors = []
    for option in options:
        try:
            check_value(name, value, option)
            return
        except ConfigError as err:
            errors.append((option, err))
    for option, err in errors:  # a list with a bad element: say which element
        if typing.get_origin(option) is list and isinstance(value, list):
            raise err
    choices = _choices(options)
    if choices:
        words = ["null" if c is None else repr(c) for c in choices]
        raise ConfigError(
            f"{name}={value!r} is not valid; choose one of {', '.join(words[:-1])} or {words[-1]}"
        )
    described = " or ".join(_describe(o) for o in options if o is not type(None))
    null = " (or null)" if type(None) in options else ""
    raise ConfigError(f"{name} must be {described}{null}, got {value!r}")


def check_value(name: str, value: Any, annotation: Any) -> None:
    """ConfigError naming ``name`` unless ``value`` fits ``annotation`` (a Literal, a union,
    None, bool, int, float (finite), str or list[...]: the types config fields use)."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        choices = typing.get_args(annotation)
        if value not in choices:
            raise ConfigError(
                f"{name}={value!r} is not valid; choose one of {', '.join(map(repr, choices))}"
            )
        return
    if origin in (Union, types.UnionType):
        _check_union(name, value, typing.get_args(annotation))
        return
    if annotation is type(None):
        if value is not None:
            raise ConfigError(f"{name} must be null, got {value!r}")
        return
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false, got {value!r}")
        return
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        return
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{name} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{name} must be a finite number, got {value!r}")
        return
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name} must be a string, got {value!r}")
        return
    if origin is list:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{name} must be a list, got {value!r}")
        (item,) = typing.get_args(annotation) or (Any,)
        for i, element in enumerate(value):
            check_value(f"{name}[{i}]", element, item)


def field_choices(cls: type, name: str) -> tuple[Any, ...]:
    """The values field ``name`` allows when it is a ``Literal`` (None included when it may be
    null, as for ``QuantConfig.kind``); () for a free-form field."""
    return literal_choices(field_types(cls)[name])


def field_doc(cls: type, name: str) -> str:
    """The ``Attributes:`` entry of field ``name`` in ``cls``'s docstring, as one line."""
    return doc_entry(cls.__doc__ or "", "Attributes", name)


def doc_entry(doc: str, section: str, name: str) -> str:
    """Entry ``name`` of section ``section`` ("Attributes", "Args") of a Google-style
    docstring, joined into one line; "" when there is none. An entry may name several
    parameters ("batch, seq_len: ...")."""
    lines = doc.splitlines()
    starts = [i for i, line in enumerate(lines) if line.strip() == f"{section}:"]
    if not starts:
        return ""
    entry: list[str] = []
    indent = None
    for line in lines[starts[0] + 1 :]:
        if not line.strip():
            break
        depth = len(line) - len(line.lstrip())
        indent = depth if indent is None else indent
        if depth < indent:  # the section ended
            break
        if depth == indent:  # a new entry: "name: text" or "a, b: text"
            if entry:
                break
            names, _, text = line.strip().partition(": ")
            if name in [n.strip() for n in names.split(",")]:
                entry.append(text)
        elif entry:
            entry.append(line.strip())
    return " ".join(entry)
