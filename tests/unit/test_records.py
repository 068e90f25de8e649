"""veloverlay.records: the dataclass subset the product uses, without importing dataclasses."""

from __future__ import annotations

import pickle
import subprocess
import sys

import pytest

from veloverlay.records import FrozenRecordError, Record, field


class Point(Record, frozen=True):
    x: int
    y: int = 0
    tags: tuple[str, ...] = ()


class Bag(Record):
    name: str
    items: list[int] = field(default_factory=list)


def test_init_defaults_and_factories() -> None:
    assert Point(1) == Point(1, 0, ()) == Point(x=1, y=0)
    assert (Point(1, 2).x, Point(1, 2).y) == (1, 2)
    a, b = Bag("a"), Bag("b")
    a.items.append(1)
    assert b.items == [] and a.items == [1]  # a fresh list per instance
    with pytest.raises(TypeError):
        Point()  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        Point(1, z=2)  # type: ignore[call-arg]


def test_frozen_eq_hash_and_mutable_records() -> None:
    p = Point(1, 2)
    with pytest.raises(FrozenRecordError):
        p.x = 3  # type: ignore[misc]
    with pytest.raises(FrozenRecordError):
        del p.x  # type: ignore[misc]
    assert hash(p) == hash(Point(1, 2)) and p != Point(2, 1)
    assert len({p, Point(1, 2)}) == 1
    assert p != (1, 2, ())  # a record equals only records of its class
    bag = Bag("b")
    bag.name = "c"
    assert bag == Bag("c")
    with pytest.raises(TypeError):
        hash(bag)  # mutable and compared by value: unhashable
    assert not hasattr(p, "__dict__")  # slots
    with pytest.raises(AttributeError):
        bag.other = 1  # type: ignore[attr-defined]


def test_equality_compares_every_field() -> None:
    # __eq__ is generated field by field: a field left out of it would make unequal records equal.
    base = Point(1, 2, ("a",))
    for change in ({"x": 9}, {"y": 9}, {"tags": ("b",)}):
        other = base.replace(**change)
        assert other != base and base != other and (other == base) is False
    assert base == Point(1, 2, ("a",)) and (base != Point(1, 2, ("a",))) is False

    class Empty(Record, frozen=True):
        pass

    assert Empty() == Empty() and hash(Empty()) == hash(Empty()) and Empty()._values() == ()


def test_replace_repr_pickle() -> None:
    p = Point(1, 2, ("a",))
    assert p.replace(y=5) == Point(1, 5, ("a",)) and p.y == 2
    assert p.field_dict() == {"x": 1, "y": 2, "tags": ("a",)}
    with pytest.raises(TypeError, match="no field 'z'"):
        p.replace(z=1)
    assert repr(p) == "Point(x=1, y=2, tags=('a',))"
    assert pickle.loads(pickle.dumps(p)) == p
    assert pickle.loads(pickle.dumps(Bag("x", [1]))) == Bag("x", [1])


def test_declaration_errors() -> None:
    with pytest.raises(TypeError, match="without a default"):

        class Bad(Record):
            a: int = 0
            b: int

    with pytest.raises(TypeError, match="do not inherit"):

        class Child(Point):  # type: ignore[misc]
            z: int = 0


def test_session_start_path_does_not_import_dataclasses() -> None:
    # The library's session path; the CLI adds typer (and with it inspect and dataclasses).
    code = (
        "import sys; from veloverlay import session; "
        "bad = {'dataclasses', 'inspect', 'typer', 'click', 'prctl'} & set(sys.modules); "
        "print(sorted(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


@pytest.mark.parametrize("first", ["eq", "ne", "hash", "pickle", "replace", "bad-init", "init"])
def test_methods_compiled_on_first_use_behave_from_the_first_call(first: str) -> None:
    # A record's __init__ and _values/__eq__ are compiled on their first call: whichever
    # operation comes first must already behave as it does afterwards.
    class Pair(Record, frozen=True):
        a: int
        b: tuple[int, ...] = ()

    class Box(Record):
        a: int
        b: list[int] = field(default_factory=list)

    if first == "bad-init":
        with pytest.raises(TypeError):
            Pair()  # type: ignore[call-arg]
        with pytest.raises(TypeError):
            Box(1, [2], 3)  # type: ignore[call-arg]
    p, q = Pair(1, (2,)), Pair(1, (2,))
    x = Box(1)
    if first == "eq":
        assert p == q and (p == Pair(2)) is False and x == Box(1) and x != Box(1, [0])
    elif first == "ne":
        assert p != Pair(1) and (p != q) is False and p != (1, (2,))
    elif first == "hash":
        assert hash(p) == hash(q) == hash((1, (2,)))
    elif first == "pickle":
        assert p.__reduce__() == (Pair, (1, (2,))) and x.__reduce__() == (Box, (1, []))
    elif first == "replace":
        assert p.replace(a=3) == Pair(3, (2,)) and x.replace(a=2).b == []
    # and everything afterwards, whatever came first
    assert p == q and p != Pair(1) and hash(p) == hash(q) and {p, q} == {p}
    assert Pair(a=5).b == () and Box(1).b is not Box(1).b and Box(1) == Box(1)
    with pytest.raises(FrozenRecordError):
        p.a = 2  # type: ignore[misc]
    with pytest.raises(TypeError):
        hash(x)
    assert repr(p).endswith("Pair(a=1, b=(2,))") and p.__reduce__() == (Pair, (1, (2,)))
