"""Strict conversion of plain YAML data into typed, frozen dataclasses.

Small on purpose: it knows the handful of types the configuration uses (bool, int, float, str,
Path, Literal, Optional, list/tuple, nested dataclasses) and reports every problem with the
dotted key and the file it came from. Fields are declared with ``stages.params.opt`` (the stage
parameter classes are sections of the config): ``check(value)`` returns an error string or None.
Which keys stay out of artifact versions (bookkeeping: worker counts, devices, the scheduler
address) is declared once, in ``stages.bookkeeping``, not here.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Callable, Literal, Union, get_args, get_origin

from stages.params import ParamError, in_range, non_empty, opt, to_plain  # noqa: F401  (the config's toolkit)


class ConfigError(ParamError):
    """Bad configuration. ``str()`` names the dotted key first, then the file (and ``--set``
    options) it came from: ``train.epochs: must be >= 0 (in pipeline.yaml with --set ...)``."""

    def __init__(self, message: str, key: str | None = None, source: str | None = None):
        self.key, self.source, self.detail = key, source, message
        if key:
            text = f"{key}: {message}" + (f" (in {source})" if source else "")
        else:
            text = f"{source}: {message}" if source else message
        ValueError.__init__(self, text)


# -- conversion -----------------------------------------------------------------------------------
def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin in (list, tuple):
        args = get_args(tp)
        return f"list of {_type_name(args[0])}" if args else "list"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def convert(tp: Any, value: Any, key: str, source: str | None, base_dir: Path | None) -> Any:
    """Convert ``value`` to ``tp`` or raise ConfigError naming ``key``."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return convert(arg, value, key, source, base_dir)
            except ConfigError as exc:
                errors.append(exc.detail)
        raise ConfigError(f"expected {_type_name(tp)}, got {value!r}", key, source)
    if origin is Literal:
        if isinstance(value, bool) and ("off" if not value else "on") in get_args(tp):
            value = "off" if not value else "on"  # YAML 1.1 reads a bare off/on/no/yes as a boolean
        if value not in get_args(tp):
            raise ConfigError(f"expected one of {', '.join(repr(a) for a in get_args(tp))}, got {value!r}", key, source)
        return value
    if origin in (list, tuple):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"expected {_type_name(tp)}, got {value!r}", key, source)
        (item_tp, *_) = get_args(tp) or (Any,)
        return tuple(convert(item_tp, v, f"{key}[{i}]", source, base_dir) for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key, source, base_dir)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"expected true or false, got {value!r}", key, source)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"expected an integer, got {value!r}", key, source)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"expected a number, got {value!r}", key, source)
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"expected a string, got {value!r}", key, source)
    if tp is Path:
        if not isinstance(value, (str, Path)) or str(value) == "":
            raise ConfigError(f"expected a path, got {value!r}", key, source)
        p = Path(value).expanduser()
        if not p.is_absolute() and base_dir is not None:
            p = base_dir / p
        return p
    raise TypeError(f"unsupported config type {tp!r} for {key}")  # a programming error, not user input


def build(cls: type, data: Any, prefix: str, source: str | None, base_dir: Path | None):
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and wrong types."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"expected a mapping, got {data!r}", prefix or None, source)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ConfigError(f"unknown key (known keys here: {', '.join(sorted(fields))})", key, source)
    kwargs = {}
    for name, f in fields.items():
        key = f"{prefix}.{name}" if prefix else name
        if name in data:
            kwargs[name] = convert(hints[name], data[name], key, source, base_dir)
        elif dataclasses.is_dataclass(hints[name]):
            kwargs[name] = build(hints[name], {}, key, source, base_dir)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError("required key is missing", key, source)
        check = f.metadata.get("check")
        if check and name in kwargs:
            err = check(kwargs[name])
            if err:
                raise ConfigError(err, key, source)
    try:
        return cls(**kwargs)
    except ParamError as exc:  # a check of the class itself (ConfigError included), naming its key
        raise ConfigError(exc.detail, f"{prefix}.{exc.key}" if prefix and exc.key else exc.key or prefix,
                          source) from None
    except ValueError as exc:
        raise ConfigError(str(exc), prefix or None, source) from exc


def field_docs(cls: type, prefix: str = "", mark: Callable[[str, str], str] | None = None
               ) -> list[tuple[str, str, Any, str]]:
    """(dotted key, type name, default, doc) for every leaf key: used by the README and ``config`` help.
    ``mark(section, name)`` returns text appended to the doc (e.g. that a key is bookkeeping)."""
    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows.extend(field_docs(tp, key, mark))
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        doc = f.metadata.get("doc", "")
        if mark is not None and (extra := mark(prefix, f.name)):
            doc = f"{doc} {extra}".strip()
        rows.append((key, _type_name(tp), to_plain(default), doc))
    return rows
