"""Three-way merge of trees, per path, against a common base.

Disjoint changes merge. Both sides making the identical change is not a conflict, nor is both
sides writing a file (or symlink) the same, bytes, mode and tier, at different times: the later
mtime stands, as in a directory both had written to (two builds producing one output). A
directory's own
mode/mtime never conflicts: each is the side's that changed it, the later side's (`ours`) where
both did (a chmod on one side stands when the other only wrote inside). A real conflict is both
sides changing one path differently, or one side replacing/deleting a directory inside which the
other changed something. The caller keeps a conflicting side under its own ref, or
(`drop_conflicts`, for `ingest --force`) lets `theirs` win the conflicting paths while the rest of
`ours` still applies; the dropped side stays in the ref's history."""

from __future__ import annotations

import bisect

from veloverlay.records import Record
from veloverlay.store.manifest import Manifests, Txn
from veloverlay.store.tree import Entry, Kind, Op, OpKind

__all__ = ["MergeResult", "three_way"]


class MergeResult(Record, frozen=True):
    root: bytes | None  # None when there are conflicts
    conflicts: tuple[bytes, ...]
    applied: tuple[Op, ...]


def _is_dir_meta(m: Manifests, txn: Txn, root: bytes, op: Op) -> bool:
    if op.kind is not OpKind.META:
        return False
    e = m.lookup(txn, root, op.path)
    return e is not None and e.kind is Kind.DIR


def _dir_meta(m: Manifests, txn: Txn, base: bytes, op: Op, o: Op, *, ours_win: bool) -> Op | None:
    """Both sides changed the directory's own attributes (`op` ours, `o` theirs): they never
    conflict. Each of mode and mtime is the side's that changed it, the winning side's where
    both did (ours, the later one; theirs with `drop_conflicts`): a chmod on one side is not
    undone by the other writing inside. None: theirs stand as they are."""
    e = m.lookup(txn, base, op.path)
    was = m.node_attrs(txn, e.digest) if e is not None and e.kind is Kind.DIR else (None, None)
    win, lose = (op, o) if ours_win else (o, op)
    mode = lose.mode if win.mode == was[0] else win.mode
    mtime = lose.mtime_ns if win.mtime_ns == was[1] else win.mtime_ns
    if (mode, mtime) == (o.mode, o.mtime_ns):
        return None
    return Op(OpKind.META, op.path, mode=mode, mtime_ns=mtime)


def _mtime(op: Op) -> int:
    return op.entry.mtime_ns if op.entry is not None else op.mtime_ns


def _same_but_mtime(op: Op, o: Op) -> bool:
    """Whether `op` and `o` (one path, not a directory's own attributes) leave the same file or
    symlink but for its mtime: same bytes (or target), mode and tier; a chmod/touch to one mode."""
    if op.kind is not o.kind or op.kind is OpKind.DELETE:
        return False
    if op.kind is OpKind.META:
        return op.mode == o.mode
    a, b = op.entry, o.entry
    return (
        a is not None
        and b is not None
        and a.kind is b.kind
        and a.kind is not Kind.DIR
        and (a.mode, a.size, a.payload, a.tier) == (b.mode, b.size, b.payload, b.tier)
    )


def _new_dirs(m: Manifests, txn: Txn, base: bytes, ops: list[Op]) -> dict[bytes, bytes]:
    """{path: node} of the directories `ops` make where `base` has nothing."""
    return {
        op.path: op.entry.digest
        for op in ops
        if op.kind is OpKind.PUT
        and op.entry is not None
        and op.entry.kind is Kind.DIR
        and m.lookup(txn, base, op.path) is None
    }


def _diffs(
    m: Manifests, txn: Txn, base: bytes, ours: bytes, theirs: bytes
) -> tuple[bytes, list[Op], list[Op]]:
    """(base, base→ours, base→theirs), where the base gets an empty directory (mode 0, mtime 0:
    both sides changed its attributes) wherever both sides made a new directory, so that their
    contents merge path by path (two sessions that each wrote a file into a new `build/`, or into
    a directory of a lower ref of a stack, which the top ref gets as a new one) instead of
    conflicting as two whole directories."""
    mine, other = m.diff(txn, base, ours), m.diff(txn, base, theirs)
    while True:
        a, b = _new_dirs(m, txn, base, mine), _new_dirs(m, txn, base, other)
        both = sorted(p for p in a.keys() & b.keys() if a[p] != b[p])  # (the same: no conflict)
        if not both:
            return base, mine, other
        empty = m.put_node(txn, 0, 0, [])
        made = [
            Op(OpKind.PUT, p, Entry(p.rsplit(b"/", 1)[-1], Kind.DIR, digest=empty)) for p in both
        ]
        base = m.apply(txn, base, made)
        mine, other = m.diff(txn, base, ours), m.diff(txn, base, theirs)


def _ancestors(path: bytes) -> list[bytes]:
    out = [b""]
    i = path.find(b"/")
    while i >= 0:
        out.append(path[:i])
        i = path.find(b"/", i + 1)
    return out


def three_way(
    m: Manifests, txn: Txn, base: bytes, ours: bytes, theirs: bytes, *, drop_conflicts: bool = False
) -> MergeResult:
    """Merge `ours` (base→ours) into `theirs` (base→theirs). On conflicts the root is None, unless
    `drop_conflicts`: then our conflicting changes are left out (theirs stand there), the others
    are applied, and `conflicts` lists what was left out."""
    if theirs == base:
        return MergeResult(ours, (), tuple(m.diff(txn, base, ours)))
    if ours in (base, theirs):
        return MergeResult(theirs, (), ())
    base, mine, other = _diffs(m, txn, base, ours, theirs)
    other_at = {op.path: op for op in other}
    # Paths the other side replaced or deleted (a change below them conflicts).
    replaced = {op.path for op in other if op.kind is not OpKind.META}
    touched = sorted(op.path for op in other if not _is_dir_meta(m, txn, theirs, op))
    conflicts: list[bytes] = []
    apply: list[Op] = []
    for op in mine:
        o = other_at.get(op.path)
        if o is not None:
            if o == op:
                continue
            if o.kind is OpKind.DELETE and _is_dir_meta(m, txn, ours, op):
                continue  # they removed the directory; our touching its mtime does not matter
            if _is_dir_meta(m, txn, ours, op) and _is_dir_meta(m, txn, theirs, o):
                both = _dir_meta(m, txn, base, op, o, ours_win=not drop_conflicts)
                if both is not None:
                    apply.append(both)
                continue
            if _same_but_mtime(op, o) and not _is_dir_meta(m, txn, theirs, o):
                if _mtime(op) > _mtime(o):
                    apply.append(op)  # ours is the later: its mtime stands
                continue
            if op.kind is OpKind.META or not _is_dir_meta(m, txn, theirs, o):
                conflicts.append(op.path)
                continue
            # They only touched the directory's own mtime/mode, which never conflicts: our delete
            # or replacement of it is checked below like any other change (against what they
            # changed inside it).
        if any(a in replaced for a in _ancestors(op.path) if a != op.path):
            conflicts.append(op.path)
            continue
        if op.kind is not OpKind.META:
            prefix = op.path + b"/" if op.path else b""
            i = bisect.bisect_left(touched, prefix)
            if i < len(touched) and touched[i].startswith(prefix):
                conflicts.append(op.path)
                continue
        elif _is_dir_meta(m, txn, ours, op) and m.lookup(txn, theirs, op.path) is None:
            continue  # the directory is gone on their side; its mtime does not matter
        apply.append(op)
    if conflicts and not drop_conflicts:
        return MergeResult(None, tuple(conflicts), ())
    return MergeResult(m.apply(txn, theirs, apply), tuple(conflicts), tuple(apply))
