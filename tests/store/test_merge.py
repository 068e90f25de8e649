"""Three-way merge per path (merge.py): what merges, what conflicts, and that nothing is dropped."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings

from tests.store.test_manifest import CONTENTS, D, F, L, build, build_root, store_objects, trees
from veloverlay.store.merge import MergeResult, three_way
from veloverlay.store.tree import Kind
from veloverlay.verbs.repo import Repo


def merge(repo: Repo, base: D, ours: D, theirs: D) -> tuple[MergeResult, dict[bytes, object]]:
    """Merge and return the result plus a {path: (kind, payload, mode, mtime)} view of it."""
    b, o, t = (build_root(repo, x) for x in (base, ours, theirs))
    with repo.m.write() as txn:
        res = three_way(repo.m, txn, b, o, t)
        view: dict[bytes, object] = {}
        if res.root is not None:
            for p, e, _n in repo.m.walk(txn, res.root):
                view[p] = (e.kind, e.payload, e.mode, e.mtime_ns)
    return res, view


def content(view: dict[bytes, object], path: bytes) -> bytes | None:
    from veloverlay.store.digest import hash_bytes

    item = view.get(path)
    if item is None:
        return None
    kind, payload, _mode, _mtime = item  # type: ignore[misc]
    assert kind is Kind.FILE
    for c in (b"0", b"1", b"2", b"3", b"x", b"y"):
        if hash_bytes(c) == payload:
            return c
    raise AssertionError(f"unknown content at {path!r}")


def test_disjoint_changes_in_one_directory_merge(repo: Repo) -> None:
    base = D({b"d": D({b"a": F(b"0"), b"b": F(b"0"), b"c": F(b"0")})})
    ours = D({b"d": D({b"a": F(b"1"), b"b": F(b"0"), b"c": F(b"0"), b"new": F(b"x")}, mtime=5)})
    theirs = D({b"d": D({b"a": F(b"0"), b"b": F(b"2")}, mtime=6)})  # also deletes c
    res, view = merge(repo, base, ours, theirs)
    assert res.conflicts == ()
    assert content(view, b"d/a") == b"1"
    assert content(view, b"d/b") == b"2"
    assert content(view, b"d/new") == b"x"
    assert b"d/c" not in view
    # A directory's own mtime never conflicts: ours (the later side) wins.
    assert view[b"d"] == (Kind.DIR, view[b"d"][1], 0o755, 5)  # type: ignore[index]


def test_identical_changes_are_not_a_conflict(repo: Repo) -> None:
    base = D({b"a": F(b"0"), b"gone": F(b"0"), b"m": F(b"0")})
    both = D({b"a": F(b"1"), b"added": L(b"/t"), b"m": F(b"0", mode=0o600)})
    res, view = merge(repo, base, both, both)
    assert res.conflicts == ()
    assert content(view, b"a") == b"1"
    assert b"gone" not in view and b"added" in view
    assert view[b"m"][2] == 0o600  # type: ignore[index]


@pytest.mark.parametrize("ours_later", [True, False])
def test_the_same_bytes_and_mode_at_different_times_merge_with_the_later_mtime(
    repo: Repo, ours_later: bool
) -> None:
    """A file written (or only touched) on both sides to the same bytes, mode and tier differs in
    its mtime alone: no conflict, the later mtime stands. Another mode still conflicts."""
    early, late = (7, 9) if ours_later else (9, 7)
    base = D({b"w": F(b"0"), b"t": F(b"0")})
    ours = D({b"w": F(b"1", mtime=late if ours_later else early), b"t": F(b"0", mtime=late)})
    theirs = D({b"w": F(b"1", mtime=early if ours_later else late), b"t": F(b"0", mtime=early)})
    res, view = merge(repo, base, ours, theirs)
    assert res.conflicts == ()
    assert content(view, b"w") == b"1"
    assert view[b"w"][3] == 9 and view[b"t"][3] == max(early, late)  # type: ignore[index]
    res, _view = merge(repo, base, D({b"w": F(b"1", mode=0o600, mtime=9)}), theirs)
    assert b"w" in res.conflicts


def test_directory_metadata_never_conflicts(repo: Repo) -> None:
    base = D({b"d": D({b"f": F(b"0")}, mode=0o755, mtime=1)}, mtime=1)
    ours = D({b"d": D({b"f": F(b"0")}, mode=0o700, mtime=7)}, mtime=7)
    theirs = D({b"d": D({b"f": F(b"0")}, mode=0o750, mtime=9)}, mtime=9)
    res, view = merge(repo, base, ours, theirs)
    assert res.conflicts == ()
    assert view[b""][3] == 7 and view[b"d"][2:] == (0o700, 7)  # type: ignore[index]


def test_a_directory_mode_one_side_changed_stands(repo: Repo) -> None:
    """One side chmods a directory, the other only writes inside it (its mtime): the chmod
    stands, whichever side merges last (it was undone by the later side's whole mode+mtime)."""
    base = D({b"d": D({b"f": F(b"0")}, mode=0o755, mtime=1)}, mtime=1)
    chmod = D({b"d": D({b"f": F(b"0")}, mode=0o700, mtime=1)}, mtime=1)
    write = D({b"d": D({b"f": F(b"1")}, mode=0o755, mtime=9)}, mtime=9)
    res, view = merge(repo, base, write, chmod)
    assert res.conflicts == () and content(view, b"d/f") == b"1"
    assert view[b"d"][2:] == (0o700, 9)  # type: ignore[index]
    res, view = merge(repo, base, chmod, write)
    assert res.conflicts == () and content(view, b"d/f") == b"1"
    assert view[b"d"][2:] == (0o700, 9)  # type: ignore[index]
    # ingest --force: theirs win where both changed; a mode only ours changed still stands
    b, o, t = (build_root(repo, x) for x in (base, chmod, write))
    with repo.m.write() as txn:
        forced = three_way(repo.m, txn, b, o, t, drop_conflicts=True)
        assert forced.root is not None
        d = repo.m.lookup(txn, forced.root, b"d")
        assert d is not None and repo.m.node_attrs(txn, d.digest) == (0o700, 9)


def test_a_new_directory_made_on_both_sides_merges_inside(repo: Repo) -> None:
    """Both sides made `n/` (two builds writing into a new output directory): its contents merge
    path by path, deeper new directories too; only a file both made differently conflicts."""
    base = D({b"keep": F(b"0")})
    ours = D({b"keep": F(b"0"), b"n": D({b"f": F(b"1"), b"q": D({b"x": F(b"1")})}, mtime=5)})
    theirs = D({b"keep": F(b"0"), b"n": D({b"g": F(b"2"), b"q": D({b"y": F(b"2")})}, mtime=6)})
    res, view = merge(repo, base, ours, theirs)
    assert res.conflicts == ()
    assert {p: content(view, p) for p in (b"n/f", b"n/g", b"n/q/x", b"n/q/y")} == {
        b"n/f": b"1",
        b"n/g": b"2",
        b"n/q/x": b"1",
        b"n/q/y": b"2",
    }
    assert view[b"n"][3] == 5  # type: ignore[index]  # a directory's mtime: ours, the later
    clash = D({b"keep": F(b"0"), b"n": D({b"f": F(b"2")})})
    res, _ = merge(repo, base, ours, clash)
    assert res.root is None and res.conflicts == (b"n/f",)


def test_same_path_changed_differently_conflicts(repo: Repo) -> None:
    base = D({b"d": D({b"a": F(b"0"), b"b": F(b"0")})})
    ours = D({b"d": D({b"a": F(b"1"), b"b": F(b"1")})})
    theirs = D({b"d": D({b"a": F(b"2"), b"b": F(b"1")})})
    res, _view = merge(repo, base, ours, theirs)
    assert res.root is None
    assert res.conflicts == (b"d/a",)


@pytest.mark.parametrize(
    "ours_change, theirs_change",
    [
        ({b"a": F(b"0", mode=0o600)}, {b"a": F(b"0", mode=0o700)}),  # mode vs mode
        ({b"a": F(b"0", mode=0o600)}, {b"a": F(b"2")}),  # mode vs content
        ({b"a": F(b"1")}, {}),  # change vs delete
        ({}, {b"a": F(b"1")}),  # delete vs change
        ({b"a": L(b"x")}, {b"a": F(b"2")}),  # kind change vs content
        ({b"a": D()}, {b"a": F(b"2")}),  # file -> dir vs content
    ],
)
def test_file_conflicts(
    repo: Repo, ours_change: dict[bytes, object], theirs_change: dict[bytes, object]
) -> None:
    base = D({b"a": F(b"0"), b"keep": F(b"0")})
    ours = D({b"keep": F(b"0"), **ours_change})
    theirs = D({b"keep": F(b"0"), **theirs_change})
    res, _ = merge(repo, base, ours, theirs)
    assert res.root is None and res.conflicts == (b"a",)


def test_added_on_both_sides_differently_conflicts(repo: Repo) -> None:
    res, _ = merge(repo, D(), D({b"n": F(b"1")}), D({b"n": F(b"2")}))
    assert res.conflicts == (b"n",)


def test_delete_of_a_directory_vs_a_change_inside_conflicts(repo: Repo) -> None:
    base = D({b"d": D({b"sub": D({b"f": F(b"0")}), b"g": F(b"0")}), b"x": F(b"0")})
    deleted = D({b"x": F(b"0")})
    changed_inside = D({b"d": D({b"sub": D({b"f": F(b"1")}), b"g": F(b"0")}), b"x": F(b"0")})
    res, _ = merge(repo, base, deleted, changed_inside)
    assert res.root is None and res.conflicts == (b"d",)
    res, _ = merge(repo, base, changed_inside, deleted)
    assert res.root is None and res.conflicts == (b"d/sub/f",)
    # Replacing the directory by a file is the same kind of conflict.
    replaced = D({b"d": F(b"2"), b"x": F(b"0")})
    res, _ = merge(repo, base, replaced, changed_inside)
    assert res.conflicts == (b"d",)
    res, _ = merge(repo, base, changed_inside, replaced)
    assert res.conflicts == (b"d/sub/f",)


def test_delete_of_a_directory_vs_its_mtime_is_no_conflict(repo: Repo) -> None:
    base = D({b"d": D({b"f": F(b"0")}, mtime=1), b"x": F(b"0")})
    deleted = D({b"x": F(b"0")})
    touched = D({b"d": D({b"f": F(b"0")}, mtime=5), b"x": F(b"0")})
    for ours, theirs in ((deleted, touched), (touched, deleted)):
        res, view = merge(repo, base, ours, theirs)
        assert res.conflicts == () and b"d" not in view


def test_one_side_unchanged_takes_the_other(repo: Repo) -> None:
    base = D({b"a": F(b"0")})
    changed = D({b"a": F(b"1"), b"b": F(b"2")})
    for ours, theirs in ((base, changed), (changed, base)):
        res, view = merge(repo, base, ours, theirs)
        assert res.conflicts == ()
        assert content(view, b"a") == b"1" and content(view, b"b") == b"2"


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(x0=trees, x1=trees, y0=trees, y1=trees)
def test_changes_to_disjoint_subtrees_always_merge(repo: Repo, x0: D, x1: D, y0: D, y1: D) -> None:
    """Property: ours changes only x/, theirs only y/ → the merge is exactly {x: x1, y: y1}."""
    store_objects(repo, CONTENTS)
    m = repo.m
    with m.write() as txn:
        base = build(m, txn, D({b"x": x0, b"y": y0}))
        ours = build(m, txn, D({b"x": x1, b"y": y0}))
        theirs = build(m, txn, D({b"x": x0, b"y": y1}))
        want = build(m, txn, D({b"x": x1, b"y": y1}))
        res = three_way(m, txn, base, ours, theirs)
        assert res.conflicts == ()
        assert res.root == want
        # and the other way round
        assert three_way(m, txn, base, theirs, ours).root == want


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(base=trees, ours=trees, theirs=trees)
def test_a_merge_never_drops_a_change_silently(repo: Repo, base: D, ours: D, theirs: D) -> None:
    """Property: every path one side changed is, in the result, what that side made it — or the
    merge reports a conflict. (Directory metadata excepted: ours wins, by design.)"""
    store_objects(repo, CONTENTS)
    m = repo.m
    with m.write() as txn:
        b, o, t = build(m, txn, base), build(m, txn, ours), build(m, txn, theirs)
        res = three_way(m, txn, b, o, t)
        if res.root is None:
            assert res.conflicts
            return
        for side in (o, t):
            for op in m.diff(txn, b, side):
                got = m.lookup(txn, res.root, op.path)
                want = m.lookup(txn, side, op.path)
                if want is not None and want.kind is Kind.DIR:
                    continue  # a directory's content is checked through its own paths
                if op.kind.value == "meta" and side == t:
                    other = m.lookup(txn, o, op.path)
                    if other is not None and other.kind is Kind.DIR:
                        continue
                assert got == want, (op, got, want)


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(base=trees, ours=trees, theirs=trees)
def test_dropping_conflicts_keeps_theirs_and_the_rest_of_ours(
    repo: Repo, base: D, ours: D, theirs: D
) -> None:
    """Property (`ingest --force`): with drop_conflicts there is always a result, with the plain
    merge's conflicts; every change of theirs is in it as they made it (a directory's own mode
    and mtime too, unless we deleted or replaced it: theirs is the winning side); every change of
    ours is in it as we made it,
    unless its path is reported in `conflicts` or it is a directory's metadata theirs changed."""
    store_objects(repo, CONTENTS)
    m = repo.m

    def meta(root: bytes, path: bytes) -> tuple[int, int] | None:
        e = m.lookup(txn, root, path)
        return None if e is None else (e.mode, e.mtime_ns)

    with m.write() as txn:
        b, o, t = build(m, txn, base), build(m, txn, ours), build(m, txn, theirs)
        plain = three_way(m, txn, b, o, t)
        res = three_way(m, txn, b, o, t, drop_conflicts=True)
        assert res.root is not None
        assert res.conflicts == plain.conflicts
        theirs_at = {op.path for op in m.diff(txn, b, t)}
        ours_replaced = {op.path for op in m.diff(txn, b, o) if op.kind.value != "meta"}
        for op in m.diff(txn, b, t):
            want = m.lookup(txn, t, op.path)
            if want is not None and want.kind is Kind.DIR:
                # A directory's own metadata never conflicts with our deleting or replacing it.
                if op.kind.value == "meta" and op.path not in ours_replaced:
                    assert meta(res.root, op.path) == meta(t, op.path), op
                continue  # a directory's content is checked through its own paths
            assert m.lookup(txn, res.root, op.path) == want, op
        for op in m.diff(txn, b, o):
            if op.path in res.conflicts:
                continue
            want = m.lookup(txn, o, op.path)
            if want is not None and want.kind is Kind.DIR:
                if op.kind.value == "meta" and op.path not in theirs_at:
                    assert meta(res.root, op.path) == meta(o, op.path), op
                continue
            assert m.lookup(txn, res.root, op.path) == want, (op, res.conflicts)
