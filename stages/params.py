"""Stage parameters declared once: each key's default, check and documentation in one field.

A stage's parameter class is a frozen dataclass whose fields are made with ``opt``. Its
``__post_init__`` calls ``check_fields(self)`` (choices of ``Literal`` types, then each field's
``check``), then any cross-key check, raising ``ParamError`` naming the key. The same object is
what ``pipeline.yaml`` builds (``pipeline.configtypes.build`` prefixes the key with its section
and names the file), what the README's key table documents and what the stage receives.

``since_default`` marks a key added after artifacts had been made without it: while it keeps its
default it is left out of versions (``version_view``), so those artifacts keep their names.
Which keys never change results (bookkeeping) is declared in ``stages.bookkeeping``.
Torch-free, so that reading a configuration stays light.
"""
from __future__ import annotations

import dataclasses
import functools
import types
import typing
from pathlib import Path
from typing import Any, Callable, Literal, Union, get_args, get_origin


class ParamError(ValueError):
    """A bad parameter value: ``str()`` is one line, ``key: problem``."""

    def __init__(self, message: str, key: str | None = None):
        self.key, self.detail = key, message
        super().__init__(f"{key}: {message}" if key else message)


def opt(default: Any = dataclasses.MISSING, *, doc: str = "", check: Callable[[Any], str | None] | None = None,
        since_default: bool = False, default_factory: Any = dataclasses.MISSING) -> Any:
    """A parameter field: ``check(value)`` returns a problem (str) or None."""
    meta = {"doc": doc, "check": check, "since_default": since_default}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


# -- reusable checks ------------------------------------------------------------------------------
def in_range(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False, hi_open: bool = False):
    def check(v):
        if v is None:
            return None
        vals = v if isinstance(v, (list, tuple)) else [v]
        for x in vals:
            if lo is not None and (x < lo or (lo_open and x == lo)):
                return f"must be {'>' if lo_open else '>='} {lo}, got {x}"
            if hi is not None and (x > hi or (hi_open and x == hi)):
                return f"must be {'<' if hi_open else '<='} {hi}, got {x}"
        return None

    return check


def non_empty(v):
    return "must not be empty" if v is not None and len(v) == 0 else None


# -- checking ---------------------------------------------------------------------------------------
@functools.cache
def _choices(cls: type) -> dict[str, tuple[tuple, bool]]:
    """Per field with ``Literal`` choices: (the choices, whether the value is a sequence of them)."""
    out = {}
    for name, tp in typing.get_type_hints(cls).items():
        many = get_origin(tp) in (list, tuple)
        inner = get_args(tp)[0] if many and get_args(tp) else tp
        options = get_args(inner) if get_origin(inner) in (Union, types.UnionType) else (inner,)
        literal = [a for a in options if get_origin(a) is Literal]
        if literal and all(get_origin(a) is Literal or a is type(None) for a in options):  # Literal choices only
            allowed = tuple(v for a in literal for v in get_args(a))
            if type(None) in options:
                allowed += (None,)
            out[name] = (allowed, many)
    return out


def check_fields(obj: Any) -> None:
    """Check each field of ``obj`` against its ``Literal`` choices and its ``check``."""
    choices = _choices(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if f.name in choices:
            allowed, many = choices[f.name]
            for v in (value if many else (value,)):
                if v not in allowed:
                    raise ParamError(f"expected one of {', '.join(repr(a) for a in allowed)}, got {v!r}", f.name)
        check = f.metadata.get("check")
        if check is not None and (problem := check(value)):
            raise ParamError(problem, f.name)


def nested(cls: type, value: Any, key: str) -> Any:
    """``value`` as a ``cls`` when given as a mapping of some of its keys (the rest at default)."""
    if isinstance(value, cls):
        return value
    unknown = sorted(set(value) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise ParamError(f"unknown keys {unknown}; expected some of {sorted(f.name for f in dataclasses.fields(cls))}",
                         key)
    try:
        return cls(**value)
    except ParamError as exc:
        raise ParamError(exc.detail, f"{key}.{exc.key}" if exc.key else key) from None


# -- plain data -------------------------------------------------------------------------------------
def to_plain(obj: Any, *, drop: Callable[[str, str], bool] | None = None, section: str = "") -> Any:
    """Dataclass tree to JSON-able data (paths as strings, tuples as lists). ``drop(section, name)``
    leaves out the fields it returns True for; ``section`` is the dotted path of ``obj``."""
    if dataclasses.is_dataclass(obj):
        out = {}
        for f in dataclasses.fields(obj):
            if drop is not None and drop(section, f.name):
                continue
            sub = f"{section}.{f.name}" if section else f.name
            out[f.name] = to_plain(getattr(obj, f.name), drop=drop, section=sub)
        return out
    if isinstance(obj, dict):
        return {k: to_plain(v, drop=drop, section=section) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v, drop=drop, section=section) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _default(f: dataclasses.Field) -> Any:
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def at_default_since(obj: Any) -> Callable[[str, str], bool]:
    """A ``to_plain`` ``drop`` that leaves out the ``since_default`` keys of ``obj``'s tree that
    keep their default (``section`` is the dotted path below ``obj``)."""
    def drop(section: str, name: str) -> bool:
        node = obj
        for part in filter(None, section.split(".")):
            node = getattr(node, part)
        f = {x.name: x for x in dataclasses.fields(node)}[name]
        return bool(f.metadata.get("since_default")) and to_plain(getattr(node, name)) == to_plain(_default(f))

    return drop
