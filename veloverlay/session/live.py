"""What a running session has changed so far, with content: `diff --session ID --stat / -p`.

Told as the session's harvest would commit it now (`session_changes`): the old side is the top
ref's entry at its base, the new side the overlay's upper dir (a copied-up file holds the whole
new content) or the shim's live view `REF@<session>`. Nothing is staged or committed, and the
session goes on; a file the command is still writing shows the bytes it has so far.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator

from veloverlay.records import Record
from veloverlay.session import state
from veloverlay.session.state import State
from veloverlay.store.cas import Store
from veloverlay.store.changes import Change, changes
from veloverlay.store.manifest import Manifests, Txn
from veloverlay.store.patch import entry_mode, object_lines, path_lines, unified
from veloverlay.store.tree import Entry, Kind

__all__ = ["LiveChange", "live_diff", "session_changes"]


class LiveChange(Record, frozen=True):
    status: str  # M A D T
    path: bytes
    old_mode: int | None  # as `stat` gives it, type bits too; None where the side is absent
    new_mode: int | None
    old_size: int
    new_size: int
    patch: list[str] | None  # git's unified diff; None when a side is binary or too large
    masked: bool = False  # harvested as a MASK in the top ref: it hides what the refs below have


@contextlib.contextmanager
def running(
    store: Store, session_id: str, m: Manifests | None
) -> Iterator[tuple[State, Manifests]]:
    """The state of the running session `session_id` (USAGE if it is not running) and the store's
    manifests: `m` when the caller has them open (LMDB opens an environment once a process),
    else opened here and closed on exit."""
    st = state.load_running(store, session_id)
    if st.backend == "shim" and st.socket:
        from veloverlay.session.shim.daemon import request_sync

        request_sync(st.socket)  # the live view as of now (else: as of the daemon's last tick)
    if m is not None:
        yield st, m
        return
    own = Manifests(store)
    try:
        yield st, own
    finally:
        own.close()


def shim_live_root(m: Manifests, txn: Txn, st: State) -> bytes | None:
    """The root of a shim session's live view `REF@<session>`; None before its first change."""
    ref = m.get_ref(txn, st.session_ref or "")
    return None if ref is None else bytes.fromhex(m.get_commit(txn, ref.head).root)


def upper_dir(store: Store, st: State) -> tuple[bytes, str]:
    """An overlay session's upper dir and the xattr namespace its whiteouts use."""
    upper = os.fsencode(store.sessions / st.id / "upper")
    return upper, "trusted" if st.mode == "native" else "user"


def session_changes(store: Store, m: Manifests, txn: Txn, st: State) -> list[Change]:
    """What the running session `st` has changed so far, told as its harvest would commit it
    now and `diff REF@{1} REF` would then show it: the path operations of its overlay upper dir
    (`upper_ops`) or of the shim's live view against the session's view, restated on the top
    ref for a stack (`harvest.to_top_ref`, as the harvest does), applied to its base and
    compared with it (`store.changes`). `txn`: a `Manifests.what_if` transaction (the trees are
    made in memory only). Before, the live view was compared with the stacked view: a
    directory deleted whole was listed by the entries the stack showed, a lower ref's file
    changed was `M`, and an overlay session's deleted directory was one `D` of the directory
    itself, while the harvest's diff listed the top ref's own entries, `A`, and each file."""
    from veloverlay.session.harvest import to_top_ref

    view = bytes.fromhex(st.view_root)
    if st.backend == "shim":
        live = shim_live_root(m, txn, st)
        ops = m.diff(txn, view, live) if live is not None else []
    else:
        from veloverlay.session.harvest import StoreLinks
        from veloverlay.session.overlay.live import upper_ops

        upper, prefix = upper_dir(store, st)
        ops = upper_ops(m, txn, os.fsdecode(upper), view, prefix, StoreLinks(store))
    base = bytes.fromhex(m.get_commit(txn, st.bases[-1]).root)
    if st.below_root and ops:
        ops = to_top_ref(m, txn, ops, base, bytes.fromhex(st.below_root), view)
    return changes(m, txn, base, m.apply(txn, base, ops)) if ops else []


def live_diff(
    store: Store, session_id: str, *, context: int = 3, m: Manifests | None = None
) -> list[LiveChange]:
    """Each change of the running session `session_id` (`session_changes`) with its unified
    diff (`context` lines around each hunk: 0 for counting lines, as `--stat` does). The new
    side of an overlay session's regular file is read from its upper dir."""
    from veloverlay.session.overlay.live import placeholder

    out: list[LiveChange] = []
    with running(store, session_id, m) as (st, m), m.what_if() as txn:
        upper = upper_dir(store, st)[0]
        for c in session_changes(store, m, txn, st):
            if c.new is not None and c.new.digest == placeholder(c.path):
                out.append(_from_upper(store, c, upper, context))
            else:
                masked = c.new is not None and c.new.kind is Kind.MASK
                out.append(_from_entries(store, c.status, c.path, c.old, c.new, context, masked))
    return out


def _from_entries(
    store: Store,
    status: str,
    path: bytes,
    old: Entry | None,
    new: Entry | None,
    context: int,
    masked: bool = False,
) -> LiveChange:
    name = os.fsdecode(path)
    patch = unified(
        name,
        object_lines(store, old),
        object_lines(store, new),
        old_exists=entry_mode(old) is not None,  # a MASK (a lower ref's path deleted) is none
        new_exists=entry_mode(new) is not None,
        context=context,
    )
    return LiveChange(
        status,
        path,
        entry_mode(old),
        entry_mode(new),
        old.size if old is not None and old.kind is Kind.FILE else 0,
        new.size if new is not None and new.kind is Kind.FILE else 0,
        patch,
        masked,
    )


def _from_upper(store: Store, c: Change, upper: bytes, context: int) -> LiveChange:
    """`c`'s new side read from the upper dir: its lines, and the mode `c.new` has (what the
    harvest records: narrowed by its ACL, setuid/setgid bits removed, `upper_ops`)."""
    from veloverlay.session.overlay.live import open_beneath

    status, path, old = c.status, c.path, c.old

    # By descriptors, no symlink followed on the way: the session may swap one in meanwhile.
    parent, _, name = path.rpartition(b"/")
    st: os.stat_result | None = None
    new_lines: list[str] | None = None
    try:
        dfd = open_beneath(upper, parent.split(b"/") if parent else [])
    except OSError:  # gone or replaced meanwhile: the command is still at work
        dfd = -1
    try:
        if status != "D" and dfd >= 0:
            with contextlib.suppress(FileNotFoundError):
                st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        try:
            new_lines = path_lines(name, st, dfd) if dfd >= 0 else path_lines(name, None)
        except OSError:  # removed or replaced between the lstat and the read
            new_lines = None
    finally:
        if dfd >= 0:
            os.close(dfd)
    patch = unified(
        os.fsdecode(path),
        object_lines(store, old),
        new_lines,
        old_exists=old is not None,
        new_exists=st is not None,
        context=context,
    )
    return LiveChange(
        status,
        path,
        entry_mode(old),
        entry_mode(c.new) if st is not None else None,
        old.size if old is not None and old.kind is Kind.FILE else 0,
        st.st_size if st is not None and stat.S_ISREG(st.st_mode) else 0,
        patch,
    )
