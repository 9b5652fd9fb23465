"""The shape of the JSON qbd writes, stated once: a `Shape` says what one value may be, a `Record`
(a frozen dataclass whose fields carry their shapes) what one object holds. From that one
statement come the check qbd runs on JSON (`problems`), the typed reading of it (`from_dict`, and
back with `to_dict`) and the JSON Schema (draft 2020-12) for readers outside qbd (`json_schema`).
Torch-free, and imports nothing of qbd.

JSON's types are checked as JSON Schema has them: a bool is neither an integer nor a number, and
2.0 is an integer; and a number is finite (JSON has no NaN)."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

_PY: dict[str, tuple[type, ...]] = {"string": (str,), "integer": (int,), "number": (int, float), "boolean": (bool,),
                                    "object": (dict,), "array": (list, tuple), "null": (type(None),)}
_NAMES = {"string": "a string", "integer": "an integer", "number": "a number", "boolean": "true or false",
          "object": "an object", "array": "a list", "null": "null"}
_UNSET: Any = object()


def _same(v: Any, e: Any) -> bool:
    """JSON Schema's equality: numbers by value (2 == 2.0), never a bool for a number."""
    numbers = (int, float)
    if isinstance(v, numbers) and isinstance(e, numbers) and not isinstance(v, bool) and not isinstance(e, bool):
        return bool(v == e)
    return type(v) is type(e) and bool(v == e)


def _is(kind: str, v: Any) -> bool:
    if kind in ("integer", "number") and isinstance(v, bool):
        return False
    if kind in ("integer", "number") and isinstance(v, float) and not math.isfinite(v):
        return False
    if kind == "integer" and isinstance(v, float):  # as JSON Schema has it: 2.0 is an integer
        return v.is_integer()
    return isinstance(v, _PY[kind])


@dataclass(frozen=True)
class Shape:
    """One JSON value: its types (none: any), and the constraints JSON Schema states for them.
    `record`: a nested object of that Record type; `values`: an object's values (a map); `items`:
    a list's items; `name`: filed once under the schema's $defs; `says`: the problem's text
    (formatted with the value and the enclosing object's keys) instead of the generic one."""

    types: tuple[str, ...] = ()
    enum: tuple[Any, ...] | None = None
    const: Any = _UNSET
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: float | None = None
    min_length: int | None = None
    pattern: str | None = None
    items: Shape | None = None
    min_items: int | None = None
    max_items: int | None = None
    values: Shape | None = None
    record: type[Record] | None = None
    as_dict: bool = False  # a record's shape, read as a plain dict (a free-form measurement)
    name: str | None = None
    doc: str | None = None
    says: str | None = None

    def problems(self, v: Any, where: str, around: Mapping[str, Any] | None = None) -> list[str]:
        """What is wrong with `v` at `where` (empty when it fits)."""
        out = self._own(v, where)
        if out and self.says is not None:
            return [self.says.format_map(_Fill({**(around or {}), "value": repr(v), "where": where}))]
        return out

    def _own(self, v: Any, where: str) -> list[str]:
        kinds = self.types or (("object",) if self.record is not None else ())
        if kinds and not any(_is(k, v) for k in kinds):
            return [f"{where} must be {' or '.join(_NAMES[k] for k in kinds)}, not {_type_name(v)}"]
        if self.enum is not None and not any(_same(v, e) for e in self.enum):
            return [f"{where} must be one of {', '.join(e if isinstance(e, str) else json.dumps(e) for e in self.enum)}, got {v!r}"]
        if self.const is not _UNSET and not _same(v, self.const):
            return [f"{where} must be {json.dumps(self.const)}, got {v!r}"]
        if v is None:
            return []
        out = []
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            low, high = self.minimum, self.maximum
            if (low is not None and v < low) or (high is not None and v > high):
                bound = f"lie in [{low}, {high}]" if low is not None and high is not None else f"be >= {low}" if high is None else f"be <= {high}"
                out.append(f"{where} must {bound}, got {v}")
            if self.exclusive_minimum is not None and v <= self.exclusive_minimum:
                out.append(f"{where} must be > {self.exclusive_minimum}, got {v}")
        if isinstance(v, str):
            if self.min_length is not None and len(v) < self.min_length:
                out.append(f"{where} must not be empty" if self.min_length == 1 else f"{where} must hold {self.min_length} characters or more")
            m = None if self.pattern is None else re.search(self.pattern, v)
            if self.pattern is not None and (m is None or (self.pattern.endswith("$") and m.end() != len(v))):  # ECMA's $: no "\n" after
                out.append(f"{where} must match {self.pattern}, got {v!r}")
        if isinstance(v, (list, tuple)):
            if (self.min_items is not None and len(v) < self.min_items) or (self.max_items is not None and len(v) > self.max_items):
                out.append(f"{where} must have {self.min_items}..{self.max_items} items, got {len(v)}")
            if self.items is not None:
                for i, x in enumerate(v):
                    out += self.items.problems(x, f"{where}[{i}]")
        if isinstance(v, dict):
            if self.values is not None:
                for k, x in v.items():
                    out += self.values.problems(x, f"{where}.{k}")
            if self.record is not None:
                out += self.record.problems(v, where)
        return out

    def json_schema(self, defs: dict[str, Any]) -> dict[str, Any]:
        """This shape as JSON Schema; named shapes and records are filed in `defs` and referenced."""
        if self.record is not None:
            ref = {"$ref": f"#/$defs/{self.record.record_name()}"}
            if self.record.record_name() not in defs:
                defs[self.record.record_name()] = {}  # filed before its body: a record may refer to itself
                defs[self.record.record_name()] = self.record.json_schema(defs)
            return _described({"oneOf": [{"type": "null"}, ref]} if "null" in self.types else ref, self.doc)
        if self.name is not None:
            body = dataclasses.replace(self, name=None, doc=None).json_schema(defs)
            if defs.setdefault(self.name, body) != body:  # one name, one shape: a second, different one is a bug
                raise ValueError(f"two different shapes are named {self.name!r}: {defs[self.name]} and {body}")
            return _described({"$ref": f"#/$defs/{self.name}"}, self.doc)
        s: dict[str, Any] = {}
        if self.types:
            s["type"] = self.types[0] if len(self.types) == 1 else list(self.types)
        if self.enum is not None:
            s = {**s, "enum": list(self.enum)}
        if self.const is not _UNSET:
            s = {"const": self.const}
        for key, value in (("minimum", self.minimum), ("maximum", self.maximum), ("exclusiveMinimum", self.exclusive_minimum),
                           ("minLength", self.min_length), ("pattern", self.pattern), ("minItems", self.min_items),
                           ("maxItems", self.max_items)):
            if value is not None:
                s[key] = value
        if self.items is not None:
            s["items"] = self.items.json_schema(defs)
        if self.values is not None:
            s["additionalProperties"] = self.values.json_schema(defs)
        return _described(s, self.doc)


class _Fill(dict):  # type: ignore[type-arg]
    """A problem text's fields: a key the object lacks reads as ABSENT (its own problem says so)."""

    def __missing__(self, k: str) -> Any:
        return ABSENT


def _described(s: dict[str, Any], doc: str | None) -> dict[str, Any]:
    return {**s, "description": doc} if doc else s


def _type_name(v: Any) -> str:
    if isinstance(v, float) and not math.isfinite(v):
        return repr(v)
    return {bool: "a bool", type(None): "null"}.get(type(v), type(v).__name__)


@dataclass(frozen=True)
class When:
    """A condition between an object's keys: where `key` is one of `values`, `then` holds,
    otherwise `otherwise` (shapes of other keys of the same object)."""

    key: str
    values: tuple[Any, ...]
    then: Mapping[str, Shape] = field(default_factory=dict)
    otherwise: Mapping[str, Shape] = field(default_factory=dict)
    require: tuple[str, ...] = ()  # keys that must then be present
    lacks: str = "{where} lacks {missing!r} when {key} is {value}"  # the text for a missing one

    def problems(self, obj: Mapping[str, Any], where: str) -> list[str]:
        hit = self.key in obj and any(_same(obj[self.key], v) for v in self.values)  # as the schema's "required": [key]
        shapes = self.then if hit else self.otherwise
        out = [p for k, s in shapes.items() if k in obj for p in s.problems(obj[k], _at(where, k), obj)]
        if hit:
            out += [self.lacks.format_map(_Fill({**obj, "where": where or "the object", "missing": k, "key": self.key,
                                                 "value": repr(obj[self.key])})) for k in self.require if k not in obj]
        return out

    def json_schema(self, defs: dict[str, Any]) -> dict[str, Any]:
        then: dict[str, Any] = {}
        if self.then:
            then["properties"] = {k: v.json_schema(defs) for k, v in self.then.items()}
        if self.require:
            then["required"] = list(self.require)
        s: dict[str, Any] = {"if": {"properties": {self.key: {"enum": list(self.values)}}, "required": [self.key]}, "then": then}
        if self.otherwise:
            s["else"] = {"properties": {k: v.json_schema(defs) for k, v in self.otherwise.items()}}
        return s


def entry(shape: Shape, *, optional: bool = False, default: Any = _UNSET, factory: Any = None, given: bool = False) -> Any:
    """A Record field: its JSON key's shape. An optional key may be absent from the JSON (the field
    is then ABSENT, and stays left out when written); a required one must be present, null or not.
    The constructor's default is `default` (or `factory()`), else ABSENT for an optional key, unless
    `given`: a key a reader must tolerate missing from older JSON, but a writer must always give."""
    meta = {"shape": shape, "optional": optional}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    if default is _UNSET and optional and not given:
        default = ABSENT
    return field(metadata=meta) if default is _UNSET else field(default=default, metadata=meta)


def extra_keys() -> Any:
    """A Record's `extra` field: the keys of its JSON that no field names, kept as they were."""
    return field(default_factory=dict)


class Absent:
    """The type of ABSENT: an optional key the JSON left out (left out again when written, so a
    file reads back the same). One instance; a copy or an unpickled one is that instance."""

    def __repr__(self) -> str:
        return "ABSENT"

    def __bool__(self) -> bool:
        return False

    def __reduce__(self) -> str:
        return "ABSENT"  # pickle and copy: the module's ABSENT itself


ABSENT: Any = Absent()


class Record:
    """A JSON object as a frozen dataclass: subclasses are `@dataclass(frozen=True)` with `entry(...)`
    fields, and keys no field names are kept in `extra` (a newer qbd or a third party may add
    some), unless the class is `closed`. `rules`: conditions between its keys."""

    closed: ClassVar[bool] = False
    rules: ClassVar[tuple[When, ...]] = ()
    schema_name: ClassVar[str] = ""
    error: ClassVar[type[ValueError]] = ValueError  # what from_dict and check raise

    @classmethod
    def label(cls, obj: Any) -> str:
        """How a problem names the object (a Result names its cell)."""
        return cls.record_name()

    @classmethod
    def record_name(cls) -> str:
        return cls.schema_name or cls.__name__.lower()

    @classmethod
    def _keys(cls) -> list[dataclasses.Field[Any]]:
        return [f for f in dataclasses.fields(cls) if "shape" in f.metadata]  # type: ignore[arg-type]

    @classmethod
    def problems(cls, obj: Any, where: str = "") -> list[str]:
        """Everything wrong with `obj` as this record (empty when it fits)."""
        if not isinstance(obj, dict):
            return [f"{where or 'a ' + cls.record_name()} must be an object, not {_type_name(obj)}"]
        out = [f"{where} lacks {f.name!r}" if where else f"missing key {f.name!r}"
               for f in cls._keys() if not f.metadata["optional"] and f.name not in obj]
        for f in cls._keys():
            if f.name in obj:
                out += f.metadata["shape"].problems(obj[f.name], _at(where, f.name), obj)
        if cls.closed:
            out += [f"{where or 'a ' + cls.record_name()} has no key {k!r}" for k in obj if k not in {f.name for f in cls._keys()}]
        for rule in cls.rules:
            out += rule.problems(obj, where)
        return out

    @classmethod
    def validate(cls, obj: Any, where: str = "") -> None:
        """Raise `error` naming every problem of `obj` as this record, if it has any."""
        found = cls.problems(obj, where)
        if found:
            raise cls.error(("" if where else f"{cls.label(obj)}: ") + "; ".join(found))  # a nested one's problems name it

    @classmethod
    def from_dict(cls, obj: Any, where: str = "") -> Any:
        """The typed record of checked JSON (`error` naming every problem otherwise)."""
        cls.validate(obj, where)
        return cls._build(obj)

    @classmethod
    def _build(cls, obj: dict[str, Any]) -> Any:
        known = {f.name: f for f in cls._keys()}
        kw = {name: _typed(f.metadata["shape"], obj[name]) if name in obj else ABSENT
              for name, f in known.items() if name in obj or f.metadata["optional"]}
        if not cls.closed and any(f.name == "extra" for f in dataclasses.fields(cls)):  # type: ignore[arg-type]
            kw["extra"] = {k: _plain(v) for k, v in obj.items() if k not in known}
        record = cls(**kw)
        object.__setattr__(record, "_key_order", tuple(obj))  # written back in the order it was read
        return record

    def to_dict(self) -> dict[str, Any]:
        """The JSON object (a copy): keys in the order they were read, else in field order with
        `extra` after; absent optional keys left out."""
        out = {f.name: _plain(getattr(self, f.name)) for f in self._keys() if getattr(self, f.name) is not ABSENT}
        extra = getattr(self, "extra", None) or {}
        clash = sorted(set(extra) & {f.name for f in self._keys()})
        if clash:
            raise self.error(f"{self.record_name()}: extra keys {clash} are fields of their own")
        out.update(_plain(extra))
        order = getattr(self, "_key_order", ())
        return {k: out[k] for k in sorted(out, key=lambda k: order.index(k) if k in order else len(order))} if order else out

    @classmethod
    def json_schema(cls, defs: dict[str, Any]) -> dict[str, Any]:
        s: dict[str, Any] = {"type": "object"}
        doc = " ".join((cls.__doc__ or "").split("\n\n")[0].split())  # the first paragraph; the rest is for Python readers
        if doc:
            s["description"] = doc
        required = [f.name for f in cls._keys() if not f.metadata["optional"]]
        if required:
            s["required"] = required
        s["properties"] = {f.name: f.metadata["shape"].json_schema(defs) for f in cls._keys()}
        if cls.closed:
            s["additionalProperties"] = False
        if len(cls.rules) == 1:
            s.update(cls.rules[0].json_schema(defs))
        elif cls.rules:
            s["allOf"] = [r.json_schema(defs) for r in cls.rules]
        return s


def _at(where: str, k: str) -> str:
    return f"{where}.{k}" if where else k


def _typed(shape: Shape, v: Any) -> Any:
    """A checked JSON value as its field holds it: a nested object as its record, the rest as read
    (lists stay lists, so a record built in code and the same record read back compare equal)."""
    if v is None:
        return None
    if shape.record is not None and not shape.as_dict:
        return shape.record._build(v)
    if shape.values is not None and shape.values.record is not None:
        return {k: _typed(shape.values, x) for k, x in v.items()}
    if shape.items is not None and isinstance(v, list):
        return [_typed(shape.items, x) for x in v]
    return _plain(v)  # a copy: the record shares nothing with the JSON it was read from


def _plain(v: Any) -> Any:
    if isinstance(v, Record):
        return v.to_dict()
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v
