"""Typed configuration: nested dataclasses read from dicts, TOML files and ``key=value`` overrides.

A config is a tree of dataclasses. ``from_dict`` builds one from plain data (as read from TOML)
and checks every value against the field's annotation, so a typo or a wrong type fails at start-up
with a message naming the dotted key, instead of deep inside training. Supported annotations:
``int``, ``float`` (an int is accepted and converted), ``bool``, ``str``, ``pathlib.Path``,
``Literal[...]``, ``X | None``, ``tuple[X, ...]``, ``tuple[X, Y]``, ``list[X]``, ``dict[str, X]``
and nested dataclasses.

If a dataclass defines ``validate(self)``, it is called once the object is built (children first),
so cross-field rules live next to the fields. Raise ``ConfigError`` (or ``ValueError``) there.

Typical use::

    cfg = load_config(TrainConfig, "run.toml", ["optim.lr=3e-4", "model.cell=gru"])
    print(dump_toml(cfg))

Nothing here ever calls ``eval`` or ``exec``: override values are parsed by the target field's type.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

from rnnkit.errors import ConfigError

T = TypeVar("T")

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}
_NONE = {"none", "null"}
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


# --------------------------------------------------------------------------------------------------
# dict -> dataclass


def from_dict(cls: type[T], data: Mapping[str, Any], *, section: str = "") -> T:
    """Build dataclass ``cls`` from ``data``, rejecting unknown keys and values of the wrong type."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"from_dict needs a dataclass type, got {cls!r}")
    where = f"[{section}]" if section else "the top level"
    if not isinstance(data, Mapping):
        raise ConfigError(f"{section or 'config'} must be a table of keys, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = _type_hints(cls)
    for key in data:
        if key not in fields:
            raise ConfigError(f"unknown key {key!r} in {where}{_suggest(str(key), fields)}")
    kwargs = {}
    for name, field in fields.items():
        dotted = f"{section}.{name}" if section else name
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], dotted)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required key {name!r} in {where}; add `{name} = ...`")
    obj = cls(**kwargs)
    _run_validate(obj, section)
    return obj


def to_dict(obj: Any) -> Any:
    """Turn a (nested) dataclass into plain dicts, keeping scalars, lists and tuples as they are."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(to_dict(v) for v in obj)
    return obj


def _run_validate(obj: Any, section: str) -> None:
    validate = getattr(obj, "validate", None)
    if not callable(validate):
        return
    try:
        validate()
    except ValueError as e:  # ConfigError is a ValueError too; prefix the section so the user can find it
        prefix = f"[{section}] " if section else ""
        raise ConfigError(f"{prefix}{e}") from e


def _type_hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except NameError as e:  # annotations that name something the dataclass's module cannot see
        raise TypeError(f"cannot resolve the annotations of {cls.__qualname__}: {e}") from e


def _suggest(key: str, valid: Iterable[str]) -> str:
    valid = sorted(valid)
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"{hint} Valid keys: {', '.join(valid) or '(none)'}"


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType)


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is type(None):
        return "None"
    if _is_union(tp):
        return " or ".join(_type_name(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (list, tuple):
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            return f"a list of {len(args)} values ({', '.join(_type_name(a) for a in args)})"
        return f"a list of {_type_name(args[0]) if args else 'values'}"
    if origin is dict:
        return f"a table of {_type_name(args[1]) if args else 'values'}"
    if dataclasses.is_dataclass(tp):
        return f"a table ({tp.__name__})"
    return getattr(tp, "__name__", repr(tp))


def _bad(value: Any, tp: Any, key: str) -> ConfigError:
    return ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against annotation ``tp`` and return it in the field's type."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if _is_union(tp):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError:
                continue
        raise _bad(value, tp, key)
    if origin is Literal:
        # `type(a) is type(value)` so True does not pass for Literal[1]
        if any(value == a and type(a) is type(value) for a in args):
            return value
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise _bad(value, tp, key)
        return from_dict(tp, value, section=key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _bad(value, tp, key)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _bad(value, tp, key)
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise _bad(value, tp, key)
    if tp is str:
        if isinstance(value, str):
            return value
        raise _bad(value, tp, key)
    if tp is Path:
        if isinstance(value, str | Path):
            return Path(value)
        raise _bad(value, tp, key)
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise _bad(value, tp, key)
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise _bad(value, tp, key)
            return tuple(_convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        items = [_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            raise _bad(value, tp, key)
        item = args[1] if args else Any
        return {k: _convert(v, item, f"{key}.{k}") for k, v in value.items()}
    raise TypeError(f"{key}: rnnkit.config does not support fields annotated {tp!r}")


# --------------------------------------------------------------------------------------------------
# overrides


def apply_overrides(config: T, overrides: Iterable[str]) -> T:
    """Return a copy of ``config`` with each ``"section.key=value"`` applied, parsed by the field's type."""
    cls = type(config)
    data = to_dict(config)
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"malformed override {item!r}: write it as section.key=value")
        parts = key.split(".")
        node, tp, section = data, cls, ""
        for i, part in enumerate(parts):
            where = f"[{section}]" if section else "the top level"
            if dataclasses.is_dataclass(tp):
                fields = {f.name for f in dataclasses.fields(tp) if f.init}
                if part not in fields:
                    hint = _suggest(part, fields)
                    raise ConfigError(f"override {item!r}: unknown key {part!r} in {where}{hint}")
                field_tp = _type_hints(tp)[part]
            elif typing.get_origin(tp) is dict:
                field_tp = typing.get_args(tp)[1] if typing.get_args(tp) else Any
            else:
                raise ConfigError(f"override {item!r}: {section} is a value, not a section")
            section = f"{section}.{part}" if section else part
            inner = _strip_none(field_tp)
            last = i == len(parts) - 1
            if last and (dataclasses.is_dataclass(inner) or typing.get_origin(inner) is dict):
                fix = f"set its keys as {section}.KEY=VALUE"
                raise ConfigError(f"override {item!r}: {section} is a section; {fix}")
            if last:
                node[part] = _parse(raw.strip(), field_tp, section)
            else:
                if node.get(part) is None:  # an optional section that is unset: start it empty
                    node[part] = {}
                node, tp = node[part], inner
    return from_dict(cls, data)


def _strip_none(tp: Any) -> Any:
    if _is_union(tp):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _parse(raw: str, tp: Any, key: str) -> Any:
    """Parse the text of an override into a value of type ``tp`` (no eval: by type only)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    quoted = len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\""
    if quoted:
        raw = raw[1:-1]  # shells and users often quote strings
    if _is_union(tp):
        if type(None) in args and (raw == "" or (raw.lower() in _NONE and not quoted)):  # "none" quoted is a name
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _parse(raw, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {raw!r}")
    if origin is Literal:
        for choice in args:
            if raw == str(choice) or (isinstance(choice, bool) and raw.lower() == str(choice).lower()):
                return choice
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {raw!r}")
    if origin in (list, tuple):
        body = raw[1:-1] if raw.startswith("[") and raw.endswith("]") else raw
        parts = [p.strip() for p in body.split(",")] if body.strip() else []
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(parts) != len(args):
                raise ConfigError(f"{key}: expected {_type_name(tp)}, got {raw!r}")
            return [_parse(p, a, key) for p, a in zip(parts, args)]
        item = args[0] if args else str
        return [_parse(p, item, key) for p in parts]
    try:
        if tp is bool:
            if raw.lower() in _TRUE | _FALSE:
                return raw.lower() in _TRUE
            raise ValueError
        if tp is int:
            return int(raw)
        if tp is float:
            return float(raw)
        if tp is str or tp is Any:
            return raw
        if tp is Path:
            return Path(raw)
    except ValueError:
        extra = " (true/false, yes/no, 1/0)" if tp is bool else ""
        raise ConfigError(f"{key}: expected {_type_name(tp)}{extra}, got {raw!r}") from None
    raise ConfigError(f"{key}: cannot set a field of type {_type_name(tp)} from the command line")


# --------------------------------------------------------------------------------------------------
# TOML


def _tomllib() -> Any:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib
        except ModuleNotFoundError:
            msg = "reading TOML on Python 3.10 needs the tomli package: pip install tomli"
            raise ConfigError(msg) from None
    return tomllib


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML file into a dict, with ConfigError for a missing or malformed file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist; check the path") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {path}: {e}") from e
    return parse_toml(text, str(path))


# TOML has no null: dump_toml lists the keys whose value is None in a top-level array, and
# parse_toml sets them back to None (a run's config.toml then reproduces it exactly).
UNSET = "unset"


def parse_toml(text: str, source: str = "config") -> dict[str, Any]:
    """TOML text as a dict, the keys listed in ``unset = [...]`` set to None; ConfigError when malformed."""
    tomllib = _tomllib()
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source} is not valid TOML: {e}") from e
    keys = data.pop(UNSET, [])
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise ConfigError(f"{source}: {UNSET} must be a list of dotted keys, e.g. {UNSET} = [\"train.eval_every\"]")
    for dotted in keys:
        *tables, leaf = dotted.split(".")
        node = data
        for name in tables:
            node = node.setdefault(name, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{source}: {UNSET} names {dotted!r}, but {name} is not a table")
        node.setdefault(leaf, None)  # a value written in by hand wins over the dump's None
    return data


def covers(cls: type, data: Mapping[str, Any]) -> bool:
    """Whether ``data`` gives every field of ``cls`` that cannot be None (a whole dump, as a run's
    config.toml: older ones left the None fields out), rather than a few settings to layer on a base."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            if not isinstance(data.get(f.name), Mapping) or not covers(tp, data[f.name]):
                return False
        elif not (_is_union(tp) and type(None) in typing.get_args(tp)) and f.name not in data:
            return False
    return True


def load_config(cls: type[T], path: str | Path | None = None, overrides: Iterable[str] = ()) -> T:
    """Build ``cls`` from a TOML file (or from its defaults when ``path`` is None), then apply overrides."""
    config = from_dict(cls, load_toml(path) if path is not None else {})
    return apply_overrides(config, overrides)


def dump_toml(obj: Any) -> str:
    """Write a (nested) dataclass or dict of scalars and lists of scalars as TOML; the keys whose value
    is None go into a top-level ``unset`` list (see :func:`parse_toml`)."""
    data = to_dict(obj)
    if not isinstance(data, Mapping):
        raise TypeError(f"dump_toml needs a dataclass or a dict, got {type(obj).__name__}")
    if UNSET in data:
        raise ConfigError(f"{UNSET!r} is reserved in TOML written by rnnkit (the keys set to None)")
    lines: list[str] = []
    unset = _none_keys(data, "")
    if unset:
        lines.append(f"{UNSET} = {_toml_value(unset, UNSET)}")
    _emit_table(data, [], lines)
    return "\n".join(lines).strip("\n") + "\n"


def _none_keys(table: Mapping[str, Any], prefix: str) -> list[str]:
    keys = []
    for k, v in table.items():
        if v is None:
            keys.append(f"{prefix}{k}")
        elif isinstance(v, Mapping):
            keys += _none_keys(v, f"{prefix}{k}.")
    return keys


def _emit_table(table: Mapping[str, Any], path: list[str], lines: list[str]) -> None:
    values = {k: v for k, v in table.items() if v is not None and not isinstance(v, Mapping)}
    tables = {k: v for k, v in table.items() if isinstance(v, Mapping)}
    if path and (values or not tables):  # a table holding only sub-tables is implied by their headers
        lines += ["", "[" + ".".join(_toml_key(p) for p in path) + "]"]
    for k, v in values.items():
        lines.append(f"{_toml_key(k)} = {_toml_value(v, '.'.join([*path, str(k)]))}")
    for k, v in tables.items():
        _emit_table(v, [*path, k], lines)


def _toml_key(key: Any) -> str:
    if not isinstance(key, str):
        raise ConfigError(f"TOML keys must be strings, got {key!r}")
    return key if _BARE_KEY.fullmatch(key) else _toml_string(key)


def _toml_string(s: str) -> str:
    out = []
    for ch in s:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _toml_value(v: Any, key: str) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)  # shortest text that reads back to the same float
    if isinstance(v, str | Path):
        return _toml_string(str(v))
    if isinstance(v, list | tuple):
        if any(x is None or isinstance(x, Mapping) for x in v):
            raise ConfigError(f"{key}: TOML lists here may hold only scalars or lists, got {v!r}")
        return "[" + ", ".join(_toml_value(x, key) for x in v) + "]"
    raise ConfigError(f"{key}: cannot write a value of type {type(v).__name__} to TOML")
