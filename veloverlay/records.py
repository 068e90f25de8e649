"""Record classes for the start-up path: the part of `@dataclass` this project uses, cheaply.

`class Entry(Record, frozen=True): name: bytes; mode: int = 0` gives `__slots__`, an `__init__`
(positional or keyword, defaults, `field(default_factory=...)`), `__repr__`, `__eq__`, `__hash__`
(frozen records only), immutability (frozen), pickling and `replace(**changes)`. Type checkers see
a dataclass (PEP 681 `dataclass_transform`). `field_dict()` gives the fields by name.

Why not `dataclasses`: importing it pulls in `inspect` (and `ast`, `dis`, `tokenize`), and each
dataclass costs ~0.4 ms to create (it compiles several methods); the 16 records a session needs
cost ~11 ms of a start-up budget of 50 ms (measured). Here a record's `__init__` and its
`_values`/`__eq__` are compiled on their first call, not when the class is made: compiling them
for the 20 record classes a session imports took ~5.8 ms of its start-up (measured, 0.29 ms a
class), and a warm session instantiates 12 of them and compares few. No inheritance between
records, no ordering, no `InitVar`/`ClassVar` — nothing here uses them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, TypeVar, dataclass_transform

__all__ = ["Record", "field", "FrozenRecordError"]

_T = TypeVar("_T")
_R = TypeVar("_R", bound="Record")
_MISSING: Any = object()


class FrozenRecordError(AttributeError):
    """Assignment to a field of a frozen record."""


class _Factory:
    __slots__ = ("make",)

    def __init__(self, make: Callable[[], object]) -> None:
        self.make = make


def field(*, default_factory: Callable[[], _T]) -> _T:
    """A default made per instance: `tags: list[str] = field(default_factory=list)`."""
    return _Factory(default_factory)  # type: ignore[return-value]


def _values_source(fields: tuple[str, ...]) -> str:
    """`_values` and `__eq__` spelt out field by field: diffs of large trees compare entries
    by the thousand, and a generator over `_fields` costs three times as much."""
    values = "(" + "".join(f"self.{f}, " for f in fields) + ")"
    other = "(" + "".join(f"other.{f}, " for f in fields) + ")"
    return (
        f"def _values(self):\n    return {values}\n"
        "def __eq__(self, other):\n"
        "    if other.__class__ is not self.__class__:\n"
        "        return NotImplemented\n"
        f"    return {values} == {other}\n"
    )


def _init_source(fields: tuple[str, ...], defaults: dict[str, object], frozen: bool) -> str:
    params, body = [], []
    # A frozen record's fields are set through their slots' own descriptors: what
    # object.__setattr__ would find after looking the name up, for ~2/3 of its cost (an Entry
    # with 8 fields: 0.67 against 1.03 us, measured; a tree's decode makes one per entry).
    assign = "_s_{0}(self, {1})" if frozen else "self.{0} = {1}"
    for name in fields:
        d = defaults.get(name, _MISSING)
        if d is _MISSING:
            params.append(name)
            value = name
        elif isinstance(d, _Factory):
            params.append(f"{name}=_MISSING")
            value = f"_d_{name}.make() if {name} is _MISSING else {name}"
        else:
            params.append(f"{name}=_d_{name}")
            value = name
        body.append(assign.format(name, value))
    return f"def __init__(self, {', '.join(params)}):\n    " + "\n    ".join(body or ["pass"])


@dataclass_transform(field_specifiers=(field,))
class _Meta(type):
    def __new__(
        mcs, name: str, bases: tuple[type, ...], ns: dict[str, Any], *, frozen: bool = False
    ) -> _Meta:
        if not any(isinstance(b, _Meta) for b in bases):  # `Record` itself
            return super().__new__(mcs, name, bases, ns)
        if any(b is not Record for b in bases):
            raise TypeError(f"record {name}: records do not inherit from other classes")
        annotations = ns.get("__annotations__", {})
        fields = tuple(f for f, t in annotations.items() if "ClassVar" not in str(t))
        defaults = {f: ns.pop(f) for f in fields if f in ns}
        seen_default = False
        for f in fields:
            if f in defaults:
                seen_default = True
            elif seen_default:
                raise TypeError(f"record {name}: field {f} without a default follows one with")
        ns["__slots__"] = fields
        ns["_fields"] = fields
        ns["_defaults"] = defaults
        ns["_frozen"] = frozen
        # Placeholders that compile the real methods on their first call (see the docstring)
        ns["__init__"] = _first_init
        ns["_values"] = _first_values
        ns["__eq__"] = _first_eq
        if frozen:
            # A class that defines __eq__ loses its inherited __hash__ unless it names one.
            ns["__hash__"] = bases[0].__hash__
            ns["__setattr__"] = _refuse_set
            ns["__delattr__"] = _refuse_delete
        else:
            ns["__hash__"] = None  # mutable and compared by value: unhashable, as a dataclass
        return super().__new__(mcs, name, bases, ns)


def _compile(cls: Any, source: str, methods: tuple[str, ...]) -> None:
    """Compile `source` for record class `cls` and put its `methods` on the class (a race
    between two threads compiles twice and installs equal methods)."""
    scope: dict[str, object] = {"_MISSING": _MISSING}
    scope.update({f"_d_{f}": d for f, d in cls._defaults.items()})
    scope.update({f"_s_{f}": cls.__dict__[f].__set__ for f in cls._fields})  # the slots
    exec(source, scope)  # noqa: S102 - our own source
    for method in methods:
        fn = scope[method]
        fn.__qualname__ = f"{cls.__qualname__}.{method}"  # type: ignore[attr-defined]
        setattr(cls, method, fn)


def _first_init(self: Any, *args: object, **kwargs: object) -> None:
    cls = type(self)
    _compile(cls, _init_source(cls._fields, cls._defaults, cls._frozen), ("__init__",))
    self.__init__(*args, **kwargs)


def _first_values(self: Any) -> tuple[object, ...]:
    cls = type(self)
    _compile(cls, _values_source(cls._fields), ("_values", "__eq__"))
    return self._values()  # type: ignore[no-any-return]


def _first_eq(self: Any, other: object) -> bool:
    cls = type(self)
    _compile(cls, _values_source(cls._fields), ("_values", "__eq__"))
    return self.__eq__(other)  # type: ignore[no-any-return]


def _refuse_set(self: object, name: str, value: object) -> None:
    raise FrozenRecordError(f"cannot assign to field {name!r} of a frozen record")


def _refuse_delete(self: object, name: str) -> None:
    raise FrozenRecordError(f"cannot delete field {name!r} of a frozen record")


class Record(metaclass=_Meta):
    __slots__ = ()
    _fields: ClassVar[tuple[str, ...]] = ()
    _defaults: ClassVar[dict[str, object]] = {}
    _frozen: ClassVar[bool] = False

    def _values(self) -> tuple[object, ...]:  # generated per record class, with __eq__
        raise NotImplementedError

    def __repr__(self) -> str:
        inner = ", ".join(f"{f}={getattr(self, f)!r}" for f in self._fields)
        return f"{type(self).__qualname__}({inner})"

    def __hash__(self) -> int:
        return hash(self._values())

    def __reduce__(self) -> tuple[type, tuple[object, ...]]:
        return type(self), self._values()

    def field_dict(self) -> dict[str, Any]:
        """The fields by name (shallow: values are not copied)."""
        return {f: getattr(self, f) for f in self._fields}

    def replace(self: _R, **changes: object) -> _R:
        """A copy with some fields changed (`dataclasses.replace`)."""
        values = {f: getattr(self, f) for f in self._fields}
        for name in changes:
            if name not in values:
                raise TypeError(f"{type(self).__qualname__} has no field {name!r}")
        values.update(changes)
        return type(self)(**values)
