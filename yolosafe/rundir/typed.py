"""Typed JSON records: known keys as typed fields, every other key kept for the round trip, a damaged file as one
line (:class:`RecordError`). The base of every record of the run directory (:mod:`yolosafe.rundir.records`)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import MISSING, Field, dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar

from yolosafe.errors import YolosafeError

R = TypeVar("R", bound="Record")


_TYPES: Mapping[str, tuple[type, ...]] = MappingProxyType({
    "int": (int,), "float": (int, float), "str": (str,), "bool": (bool,), "None": (type(None),), "dict": (dict,),
    "list": (list,),
})


def _check_type(key: str, value: Any, annotation: str) -> None:
    """``value`` against a field's annotation as written (``int | None``, ``dict[str, Any]``...)."""
    allowed = tuple(t for part in annotation.split(" | ") for t in _TYPES.get(part.split("[")[0].strip(), (object,)))
    if not isinstance(value, allowed):
        raise TypeError(f"{key!r} is {value!r}, expected {annotation}")


def _default(f: Field[Any]) -> Any:
    if f.default is not MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not MISSING else MISSING


class RecordError(YolosafeError, ValueError):
    """A run file that cannot be read; ``str()`` is one line naming the file and what is wrong."""


@dataclass
class Record:
    """Known keys as typed fields; every other key of the JSON object kept, in ``extra``, for the round trip."""

    extra: dict[str, Any] = field(default_factory=dict, kw_only=True)
    keys: tuple[str, ...] = field(default=(), kw_only=True, repr=False, compare=False)  # the source's key order

    @classmethod
    def from_dict(cls: type[R], data: dict[str, Any]) -> R:
        """Raises TypeError (one line) for a known key of the wrong type: readers can then trust the fields."""
        known = {f.name: f for f in fields(cls)}
        for name in ("extra", "keys", "name"):
            known.pop(name, None)
        values = {k: v for k, v in data.items() if k in known}
        for key, value in values.items():
            _check_type(key, value, str(known[key].type))
        return cls(**cls._convert(values), extra={k: v for k, v in data.items() if k not in known},
                   keys=tuple(data))

    @classmethod
    def _convert(cls, values: dict[str, Any]) -> dict[str, Any]:
        """Nested records from their dicts (overridden where a field holds records)."""
        return values

    @classmethod
    def new(cls: type[R], **values: Any) -> R:
        """A record as yolosafe writes it: every field in the file, in field order, ``null`` for "not known"."""
        names = tuple(f.name for f in fields(cls) if f.name not in ("extra", "keys", "name"))
        return cls(**values, keys=names)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object, keys in the order they were read: a field is written when it was there or is not at its
        default."""
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name in ("extra", "keys", "name"):
                continue
            value = getattr(self, f.name)
            if isinstance(value, list):
                value = [v.to_dict() if isinstance(v, Record) else v for v in value]
            if f.name in self.keys or value != _default(f):
                out[f.name] = value
        out.update(self.extra)
        order = {key: i for i, key in enumerate(self.keys)}
        return dict(sorted(out.items(), key=lambda item: order.get(item[0], len(order))))


def read_json(path: Path, what: str = "") -> Any:
    """The JSON value of the file ``path`` (yolosafe writes its files as UTF-8); one :class:`RecordError` line,
    beginning with ``what`` and the path, when it cannot be read or is not JSON."""
    shown = f"{what} {path}" if what else str(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise RecordError(f"{shown}: cannot read ({exc.strerror or exc})") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise RecordError(f"{shown}: damaged, not JSON ({' '.join(str(exc).split())})") from None


def _typed(cls: type[R], path: Path, data: Any) -> R:
    if not isinstance(data, dict):
        raise RecordError(f"{path}: damaged, expected a JSON object, found {type(data).__name__}")
    try:
        return cls.from_dict(data)
    except TypeError as exc:
        raise RecordError(f"{path}: damaged ({exc})") from None


def exact_fields(cls: type, data: Any, what: str) -> dict[str, Any]:
    """The fields of the dataclass ``cls`` read from ``data``, a JSON object that holds exactly them: each checked
    against its annotation, a required field missing or a key no field has refused. For the records written and read
    by the same code (a message between two processes, a cache entry), where anything else is damage.
    Raises :class:`RecordError` with one line naming ``what``."""
    if not isinstance(data, dict):
        raise RecordError(f"{what}: damaged, expected a JSON object, found {type(data).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    missing = [name for name, f in known.items() if name not in data and _default(f) is MISSING]
    if unknown or missing:
        raise RecordError(f"{what}: damaged ({'unknown ' + ', '.join(map(repr, unknown)) if unknown else ''}"
                          f"{'; ' if unknown and missing else ''}"
                          f"{'missing ' + ', '.join(map(repr, missing)) if missing else ''})")
    try:
        for key, value in data.items():
            _check_type(key, value, str(known[key].type))
    except TypeError as exc:
        raise RecordError(f"{what}: damaged ({exc})") from None
    return dict(data)
