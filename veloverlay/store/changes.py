"""What changed between two trees, as a user reads it: added, modified, deleted, type changed.

`Manifests.diff` gives the path operations that turn one tree into another (what a commit
stores); `changes` turns them into what `diff`, `status` and a session's end line show: one change
per file, symlink or empty directory (a subtree added or deleted whole is listed entry by entry).
A mode change counts; a directory's own mtime does not, nor a file's mtime alone (its content and
mode unchanged), as in git. A MASK entry (a stack's top ref deleting a lower ref's path) that
comes is a deletion, one that goes an addition, with the mask as the entry on its side (a file
replaced by one: its D; a directory replaced by one: its entries' D and the mask's own D; and
back: a file replacing one, its A; a directory, its entries' A and the mask's own A).
"""

from __future__ import annotations

from veloverlay.records import Record
from veloverlay.store.manifest import Manifests, Txn
from veloverlay.store.tree import Entry, Kind, OpKind

__all__ = ["Change", "changes", "STATUS"]

STATUS = {"A": "added", "M": "modified", "D": "deleted", "T": "type changed"}


class Change(Record, frozen=True):
    status: str  # a key of STATUS
    path: bytes
    old: Entry | None  # in the old tree (directories with their node's mode and mtime)
    new: Entry | None  # in the new tree


def _entry(m: Manifests, txn: Txn, root: bytes, path: bytes) -> Entry | None:
    e = m.lookup(txn, root, path)
    if e is None or e.kind is Kind.MASK:
        return None
    if e.kind is Kind.DIR:
        node = m.get_node(txn, e.digest)
        e = e.replace(mode=node.mode, mtime_ns=node.mtime_ns)
    return e


def _subtree(m: Manifests, txn: Txn, e: Entry, path: bytes, status: str) -> list[Change]:
    """Every file, symlink and empty directory of the directory `e` at `path`."""
    out = []
    for p, ent, node in m.walk(txn, e.digest, path):
        if ent.kind is Kind.MASK or (node is not None and node.entries):
            continue
        out.append(
            Change(status, p, ent if status == "D" else None, ent if status == "A" else None)
        )
    return out


def _mask(m: Manifests, txn: Txn, root: bytes, path: bytes) -> Entry | None:
    e = m.lookup(txn, root, path)
    return e if e is not None and e.kind is Kind.MASK else None


def _mask_change(m: Manifests, txn: Txn, a: bytes, b: bytes, path: bytes) -> list[Change]:
    """A MASK that came or went where neither tree has anything else: the top ref of a stack
    deleted (or gave back) a path of a lower ref. Shown as that: D with the mask as the new
    entry, A with the mask as the old one (`diff app@{1} app` after a stacked session showed
    nothing for the files it deleted)."""
    old, new = _mask(m, txn, a, path), _mask(m, txn, b, path)
    if new is not None and old is None:
        return [Change("D", path, None, new)]
    if old is not None and new is None:
        return [Change("A", path, old, None)]
    return []


def changes(m: Manifests, txn: Txn, a: bytes, b: bytes) -> list[Change]:
    """The changes that turn tree `a` into tree `b`, sorted by path."""
    out: list[Change] = []
    for op in m.diff(txn, a, b):
        old = _entry(m, txn, a, op.path)
        if op.kind is OpKind.META:
            if old is not None and old.mode != op.mode:
                out.append(Change("M", op.path, old, _entry(m, txn, b, op.path)))
            continue
        new = None if op.kind is OpKind.DELETE else _entry(m, txn, b, op.path)
        if old is None and new is None:
            out += _mask_change(m, txn, a, b, op.path)
            continue
        if old is not None and new is None and old.kind is not Kind.DIR:
            # the top ref's own file deleted where a lower ref has one too: the MASK that
            # replaces it hides that one as well, which the D says with the mask as its new side
            out.append(Change("D", op.path, old, _mask(m, txn, b, op.path)))
            continue
        if old is None and new is not None and new.kind is not Kind.DIR:
            # the other way (`diff hi hi@{1}`): a file where a MASK was is an A with the mask
            # as its old side (it said nothing of the mask going)
            out.append(Change("A", op.path, _mask(m, txn, a, op.path), new))
            continue
        if old is not None and new is not None and Kind.DIR not in (old.kind, new.kind):
            out.append(Change("M" if old.kind is new.kind else "T", op.path, old, new))
            continue
        for e, status in ((old, "D"), (new, "A")):
            if e is None:
                continue
            if e.kind is Kind.DIR:
                out += _subtree(m, txn, e, op.path, status)
            else:
                out.append(
                    Change(
                        status, op.path, e if status == "D" else None, e if status == "A" else None
                    )
                )
        if old is not None and old.kind is Kind.DIR and new is None:
            # A directory of the top ref replaced by a mask hides the lower refs' entries there
            # too, which its entries' D do not say: the mask is a D of its own, as where the top
            # ref had nothing there (a directory replacing a mask masks what it does not have
            # inside, `harvest.to_top_ref`: nothing of theirs shows through again)
            out += _mask_change(m, txn, a, b, op.path)
        if new is not None and new.kind is Kind.DIR and old is None:
            # and back: a directory replacing a mask, its entries' A and the mask's own A
            out += _mask_change(m, txn, a, b, op.path)
    out.sort(key=lambda c: (c.path, c.status != "D"))
    return out
