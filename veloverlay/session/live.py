"""What a running session has changed so far, with content: `diff --session ID --stat / -p`.

The old side is the session's view (its manifest); the new side is the overlay's upper dir (a
copied-up file holds the whole new content) or the shim's live view `REF@<session>`. Nothing is
staged or committed, and the session goes on; a file the command is still writing shows the
bytes it has so far.
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
from veloverlay.store.manifest import Manifests, Txn
from veloverlay.store.patch import entry_mode, object_lines, path_lines, unified
from veloverlay.store.tree import Entry, Kind

__all__ = ["LiveChange", "live_diff", "masked_dir"]


class LiveChange(Record, frozen=True):
    status: str  # M A D T
    path: bytes
    old_mode: int | None  # as `stat` gives it, type bits too; None where the side is absent
    new_mode: int | None
    old_size: int
    new_size: int
    patch: list[str] | None  # git's unified diff; None when a side is binary or too large
    masked: bool = False  # harvested as a MASK in the top ref: it hides what the refs below have


def _entry(m: Manifests, txn: Txn, root: bytes, path: bytes) -> Entry | None:
    e = m.lookup(txn, root, path)
    if e is None or e.kind is Kind.MASK:
        return None
    if e.kind is Kind.DIR:
        node = m.get_node(txn, e.digest)
        e = e.replace(mode=node.mode)
    return e


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


def live_diff(
    store: Store, session_id: str, *, context: int = 3, m: Manifests | None = None
) -> list[LiveChange]:
    """Each change of the running session `session_id` with its unified diff (`context` lines
    around each hunk: 0 for counting lines, as `--stat` does)."""
    out: list[LiveChange] = []
    with running(store, session_id, m) as (st, m), m.read() as txn:
        view = bytes.fromhex(st.view_root)
        if st.backend == "shim":
            from veloverlay.store.changes import changes

            live = shim_live_root(m, txn, st)
            if live is None:
                return []
            for c in changes(m, txn, view, live):
                out.append(_from_entries(store, c.status, c.path, c.old, c.new, context))
            now: bytes | None = live
        else:
            now = None  # (the upper dir names a deleted directory, not each of its entries)
            from veloverlay.session.overlay.live import upper_changes_raw

            upper, prefix = upper_dir(store, st)
            for status, path in upper_changes_raw(m, os.fsdecode(upper), view, prefix):
                old = _entry(m, txn, view, path)
                out.append(_from_upper(store, status, path, old, upper, context))
        if st.below_root:
            out = _as_masks(store, m, txn, st, out, context, now)
    return out


def _as_masks(
    store: Store,
    m: Manifests,
    txn: Txn,
    st: State,
    out: list[LiveChange],
    context: int,
    now: bytes | None,
) -> list[LiveChange]:
    """A stacked session's deletions of what the refs below provide, as `diff` of the top ref's
    versions shows them once harvested (a MASK in the top ref, `masked`): the old side is the
    top ref's own entry there (none where only the refs below have the path: no content is
    deleted from the top ref). Before, `diff --session` showed the lower ref's content deleted
    and no mask, and `diff REF@{1} REF` then said something else. (Where the top ref has a
    directory, its `diff` lists that directory's own entries deleted: left as the view shows.)
    `now`: the root of the live view, where a deleted directory is listed entry by entry (the
    shim's): one mask on the directory gone whole, as the harvest records it."""
    below = bytes.fromhex(st.below_root or "")
    top = bytes.fromhex(m.get_commit(txn, st.bases[-1]).root)
    shown: dict[tuple[bytes, str], LiveChange] = {}
    for c in out:
        path = c.path
        if c.status == "D" and now is not None:
            path = masked_dir(m, txn, st, now, path)
        if c.status == "D" and _entry(m, txn, below, path) is not None:
            own = _entry(m, txn, top, path)
            if own is None or own.kind is not Kind.DIR:
                c = _from_entries(store, "D", path, own, None, context, masked=True)
        shown.setdefault((c.path, c.status), c)
    return list(shown.values())


def masked_dir(m: Manifests, txn: Txn, st: State, now: bytes, path: bytes) -> bytes:
    """For the deletion of `path` in a stacked session's live view `now` (listed entry by
    entry where a directory went whole): the outermost directory above it that went whole and
    that only the refs below provide, which its harvest masks as one entry; else `path`."""
    below = bytes.fromhex(st.below_root or "")
    top = bytes.fromhex(m.get_commit(txn, st.bases[-1]).root)
    parts = path.split(b"/")
    for i in range(1, len(parts)):
        up = b"/".join(parts[:i])
        gone = _entry(m, txn, now, up) is None
        if gone and _entry(m, txn, top, up) is None and _entry(m, txn, below, up) is not None:
            return up
    return path


def _from_entries(
    store: Store,
    status: str,
    path: bytes,
    old: Entry | None,
    new: Entry | None,
    context: int,
    *,
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


def _from_upper(
    store: Store, status: str, path: bytes, old: Entry | None, upper: bytes, context: int
) -> LiveChange:
    from veloverlay.session.overlay.live import open_beneath

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
        st.st_mode if st is not None else None,
        old.size if old is not None and old.kind is Kind.FILE else 0,
        st.st_size if st is not None and stat.S_ISREG(st.st_mode) else 0,
        patch,
    )
