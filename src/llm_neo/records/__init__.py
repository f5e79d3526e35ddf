"""Typed records and their JSON form: the one way a result crosses a module boundary or a file.

A record is a dataclass (nested dataclasses, lists, dicts, enums, paths and ``X | None`` inside).
``to_json`` turns it into plain JSON values; ``from_json`` builds it back from them, checking each key
against the type it is declared with, so a misspelled key fails in mypy at the reader and a damaged file
fails at load with the key's path (``arms[2].stats.accuracy.mean``), not as a ``KeyError`` in a report.
Readers then use attributes: ``group.stats.accuracy.mean``, not ``g["stats"]["accuracy"]["mean"]``.

Two conventions every record follows:
- a top-level record written to a file carries ``schema_version`` (an int, bumped when a field changes
  meaning or goes away; new optional fields keep the version);
- a field named ``extra`` (a ``dict[str, Any]``) keeps keys a newer llm-neo wrote, so re-saving an older
  reader's copy loses nothing.

A key a file holds only sometimes (``probe`` when there were probes) is a field declared
``field(default=None, metadata=OPTIONAL_KEY)``: absent from the JSON while it is None, None when the
key is missing, so re-saving a file keeps its shape.

The engine is this package's ``__init__``; the records themselves live beside it, one module a producer
(``records.compare``, ``records.probe``, ``records.sweep``, ``records.bench``, ``records.pair``), so every
layer above can read them and none of them imports a report or a command.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar, get_args, get_origin, get_type_hints

from llm_neo.errors import LlmNeoError

T = TypeVar("T")
EXTRA = "extra"
_ABSENT_WHEN_NONE = "llm_neo.records.absent_when_none"
# A field's metadata for a key a file holds only sometimes (``bias: X | None = field(default=None,
# metadata=OPTIONAL_KEY)``): while the value is None ``to_json`` leaves the key out rather than writing
# null, so a file that never had the key reads and writes back unchanged.
OPTIONAL_KEY = types.MappingProxyType({_ABSENT_WHEN_NONE: True})


class RecordError(LlmNeoError, ValueError):
    """A JSON record does not have the shape its reader declares; the message names the key's path."""


def to_json(value: Any) -> Any:
    """Plain JSON values (dict, list, str, int, float, bool, None) of a record and what it holds."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        data = {
            f.name: to_json(getattr(value, f.name))
            for f in dataclasses.fields(value)
            if f.name != EXTRA and not (f.metadata.get(_ABSENT_WHEN_NONE) and getattr(value, f.name) is None)
        }
        return {**data, **getattr(value, EXTRA, {})}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_json(v) for v in value]
    return value


def from_json(cls: type[T], data: Any, where: str = "") -> T:
    """``cls`` built from ``data`` (what ``to_json`` wrote), checked key by key; RecordError names the
    path of the first key that is missing or of the wrong type."""
    return typing.cast(T, _build(cls, data, where or cls.__name__))


def dumps(record: Any) -> str:
    """The record as indented JSON text, the form records are written to files in."""
    return json.dumps(to_json(record), indent=2, allow_nan=True) + "\n"


def load(cls: type[T], path: str | Path) -> T:
    """The record of type ``cls`` in the JSON file ``path``; damage is named with the file."""
    file = Path(path)
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RecordError(f"{file}: cannot read it as JSON ({err}).") from err
    try:
        return from_json(cls, data)
    except RecordError as err:
        raise RecordError(f"{file}: {err}") from err


def _build(tp: Any, data: Any, where: str) -> Any:
    if tp is Any or tp is object:
        return data
    origin = get_origin(tp)
    if origin is typing.Union or origin is types.UnionType:
        return _build_union(get_args(tp), data, where)
    if origin is typing.Literal:
        if data not in get_args(tp):
            raise RecordError(f"{where}: {data!r} is not one of {list(get_args(tp))}")
        return data
    if dataclasses.is_dataclass(tp):
        return _build_dataclass(tp, data, where)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(data)
        except ValueError:
            allowed = [m.value for m in tp]
            raise RecordError(f"{where}: {data!r} is not one of {allowed}") from None
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(data, list | tuple):
            raise RecordError(f"{where}: expected a list, found {type(data).__name__}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(data):
                raise RecordError(f"{where}: expected {len(args)} items, found {len(data)}")
            return tuple(
                _build(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, data, strict=True))
            )
        item = args[0] if args else Any
        built = [_build(item, v, f"{where}[{i}]") for i, v in enumerate(data)]
        return tuple(built) if origin is tuple or tp is tuple else built
    if origin is dict or tp is dict:
        if not isinstance(data, dict):
            raise RecordError(f"{where}: expected an object, found {type(data).__name__}")
        value_type = get_args(tp)[1] if get_args(tp) else Any
        return {k: _build(value_type, v, f"{where}.{k}") for k, v in data.items()}
    if tp is Path:
        if not isinstance(data, str):
            raise RecordError(f"{where}: expected a path string, found {type(data).__name__}")
        return Path(data)
    if tp is float:
        # JSON writes 2.0 as 2 when a producer computed it as an int; NaN and infinities pass as floats.
        if isinstance(data, bool) or not isinstance(data, int | float):
            raise RecordError(f"{where}: expected a number, found {type(data).__name__}")
        return float(data)
    if tp in (int, str, bool):
        if not isinstance(data, tp) or (tp is int and isinstance(data, bool)):
            raise RecordError(f"{where}: expected {tp.__name__}, found {type(data).__name__}")
        return data
    raise TypeError(f"{where}: records cannot hold {tp!r}")  # a programming error, not bad data


def _build_union(args: tuple[Any, ...], data: Any, where: str) -> Any:
    if data is None:
        if type(None) in args:
            return None
        raise RecordError(f"{where}: is null")
    problems = []
    for arg in (a for a in args if a is not type(None)):
        try:
            return _build(arg, data, where)
        except RecordError as err:
            problems.append(str(err))
    raise RecordError(problems[0] if len(problems) == 1 else f"{where}: matches none of {problems}")


def _build_dataclass(cls: Any, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise RecordError(f"{where}: expected an object, found {type(data).__name__}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    values: dict[str, Any] = {}
    for name, f in fields.items():
        if name == EXTRA:
            continue
        if name in data:
            values[name] = _build(hints[name], data[name], f"{where}.{name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise RecordError(f"{where}: missing key {name!r}")
    unknown = {k: v for k, v in data.items() if k not in fields}
    if EXTRA in fields:
        values[EXTRA] = unknown
    return cls(**values)
