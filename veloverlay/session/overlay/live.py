"""What a running overlay session has changed so far, read from its upper directory.

A peek for `veloverlay status` and `diff --session`: nothing is staged or committed and the
session goes on. The upper dir is read as the harvester reads it (`upper_ops`: the same path
operations, but no file's content), so that `session.live` can tell the change as the harvest
will commit it. A file copied up counts as changed (a chmod, or an open for writing that wrote
nothing yet, too: the content is compared only when the session ends), with the mode the
harvester records for it; a Tier-1 store link copied up or copied is that file again. Markers
are read with the session's xattr prefix (`user`, or `trusted` root-native), as the harvester
does.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
from collections.abc import Iterator

from veloverlay import files, paths, posixacl
from veloverlay.session.harvest import StoreLinks, leaf_op, without_minted_setid
from veloverlay.session.overlay.harvest import is_whiteout
from veloverlay.store.manifest import Manifests, Txn
from veloverlay.store.tree import Entry, Kind, Node, Op, OpKind

__all__ = ["upper_ops", "placeholder", "open_beneath"]

_DIR = files.DIRFLAGS
_SETID = stat.S_ISUID | stat.S_ISGID


def open_beneath(top: bytes, parts: list[bytes]) -> int:
    """The directory `top`/`parts...`, no symlink followed below `top` (OSError ELOOP/ENOTDIR
    then, `files.open_below`): the session may swap one in while it is read."""
    fd = os.open(top, _DIR)
    if not parts:
        return fd
    try:
        return files.open_below(fd, parts)
    finally:
        os.close(fd)


def placeholder(path: bytes) -> bytes:
    """The digest `upper_ops` gives the regular file at `path` of the upper dir: no object's
    (its content is not read while the session runs)."""
    return hashlib.blake2b(b"veloverlay-live\0" + path, digest_size=32).digest()


def upper_ops(
    m: Manifests,
    txn: Txn,
    upper: str,
    view_root: bytes,
    prefix: str = "user",
    links: StoreLinks | None = None,
) -> list[Op]:
    """The path operations the upper dir `upper` makes to the tree `view_root`, in the form the
    harvester (overlay/harvest.py) records them, without reading a file's content: a whiteout
    deletes what the view has; a file or symlink is put (a regular file with `placeholder`'s
    digest: changed, whatever it holds); a directory the view has merges (a META where its mode
    changed), a new or opaque one, or one renamed root-native (a redirect: its origin's entries
    under the upper's), is put whole, its nodes written in `txn` (a `Manifests.what_if`
    transaction). A symlink into the store (`links`) that is a copied-up or copied Tier-1 file
    is that file again, as the harvester records it. What the session removes or replaces
    meanwhile is skipped."""
    ops: list[Op] = []

    def view_node(path: bytes) -> Node | None:
        if path == b"":
            return m.get_node(txn, view_root)
        e = m.lookup(txn, view_root, path)
        return m.get_node(txn, e.digest) if e is not None and e.kind is Kind.DIR else None

    def leaf(
        dfd: int, name: bytes, st: os.stat_result, p: bytes, low: Entry | None
    ) -> Entry | None:
        tier = low.tier if low is not None and low.kind is Kind.FILE else 2  # (not shown)
        if stat.S_ISLNK(st.st_mode):
            target = os.readlink(name, dir_fd=dfd)
            if links is not None:  # a Tier-1 store link copied up (chown -h, touch -h, cp -a)
                mtime = st.st_mtime_ns
                copied = links.entry(m, txn, view_root, name, target, mtime, low, lambda: tier)
                if copied is not None:
                    return without_minted_setid(copied, low)[0]  # as the harvester records it
            return Entry(name, Kind.SYMLINK, 0o777, len(target), st.st_mtime_ns, b"", target)
        if not stat.S_ISREG(st.st_mode):
            return None  # a fifo, socket or device: not modelled (the harvest skips it too)
        # the mode the harvester records (overlay/harvest.py `_file`): as its ACL allows, and
        # setuid/setgid bits removed unless the view's file had the same
        mode = posixacl.mode_at(dfd, name, stat.S_IMODE(st.st_mode))
        had = low.mode & _SETID if low is not None and low.kind is Kind.FILE else -1
        if mode & _SETID and mode & _SETID != had:
            mode &= ~_SETID
        return Entry(name, Kind.FILE, mode, st.st_size, st.st_mtime_ns, placeholder(p), b"", tier)

    def redirect(sub: int, origin: bytes) -> bytes | None:
        value = _xattr(sub, "trusted.overlay.redirect") if prefix == "trusted" else None
        if value is None:
            return None
        return value.strip(b"/") if value.startswith(b"/") else paths.join(origin, value)

    def whole(dfd: int, st: os.stat_result, rel: bytes, origin: Node | None, at: bytes) -> bytes:
        entries = {e.name: e for e in origin.entries if e.kind is not Kind.MASK} if origin else {}
        for name, cst in _listed(dfd):
            p = paths.join(rel, name)
            if is_whiteout(cst, dfd, name, prefix):
                entries.pop(name, None)
                continue
            if not stat.S_ISDIR(cst.st_mode):
                try:
                    e = leaf(dfd, name, cst, p, entries.get(name))
                except OSError:  # a symlink removed or replaced since the listing
                    continue
                if e is None:
                    entries.pop(name, None)
                else:
                    entries[name] = e
                continue
            with _opened(dfd, name) as sub:
                if sub < 0:
                    continue
                low = entries.get(name)
                moved = redirect(sub, at)
                if moved is not None:
                    node, sub_at = view_node(moved), moved
                elif low is not None and low.kind is Kind.DIR and not _opaque(sub, prefix):
                    node, sub_at = m.get_node(txn, low.digest), paths.join(at, name)
                else:
                    node, sub_at = None, paths.join(at, name)
                digest = whole(sub, cst, p, node, sub_at)
                entries[name] = Entry(name, Kind.DIR, digest=digest)
        return m.put_node(txn, stat.S_IMODE(st.st_mode), st.st_mtime_ns, entries.values())

    def merged(dfd: int, rel: bytes, lower: Node) -> None:
        for name, st in _listed(dfd):
            p = paths.join(rel, name)
            low = lower.lookup(name)
            if low is not None and low.kind is Kind.MASK:
                low = None
            if is_whiteout(st, dfd, name, prefix):
                if low is not None:
                    ops.append(Op(OpKind.DELETE, p))
                continue
            if not stat.S_ISDIR(st.st_mode):
                try:
                    e = leaf(dfd, name, st, p, low)
                except OSError:  # a symlink removed or replaced since the listing
                    continue
                op = leaf_op(p, low, e) if e is not None else None
                if e is None and low is not None:
                    op = Op(OpKind.DELETE, p)
                if op is not None:
                    ops.append(op)
                continue
            with _opened(dfd, name) as sub:
                if sub < 0:
                    continue
                moved = redirect(sub, rel)
                if moved is not None:
                    digest = whole(sub, st, p, view_node(moved), moved)
                    ops.append(Op(OpKind.PUT, p, Entry(name, Kind.DIR, digest=digest)))
                elif low is not None and low.kind is Kind.DIR and not _opaque(sub, prefix):
                    child, mode = m.get_node(txn, low.digest), stat.S_IMODE(st.st_mode)
                    if mode != child.mode:
                        ops.append(Op(OpKind.META, p, mode=mode, mtime_ns=st.st_mtime_ns))
                    merged(sub, p, child)
                else:
                    digest = whole(sub, st, p, None, p)
                    ops.append(Op(OpKind.PUT, p, Entry(name, Kind.DIR, digest=digest)))

    try:
        top = os.open(os.fsencode(upper), _DIR)
    except OSError:
        return ops
    try:
        merged(top, b"", m.get_node(txn, view_root))
    finally:
        os.close(top)
    return ops


def _listed(dfd: int) -> list[tuple[bytes, os.stat_result]]:
    """The entries of the directory `dfd` by name, with their lstat: by descriptor (the session
    writes it while it is read); one gone meanwhile is left out, as is all of an unreadable
    directory."""
    try:
        names = sorted(os.fsencode(n) for n in os.listdir(dfd))
    except OSError:
        return []
    out = []
    for name in names:
        with contextlib.suppress(OSError):
            out.append((name, os.stat(name, dir_fd=dfd, follow_symlinks=False)))
    return out


@contextlib.contextmanager
def _opened(dfd: int, name: bytes) -> Iterator[int]:
    """The directory `name` of `dfd`, never through a symlink swapped in; -1 when it is gone
    or replaced meanwhile."""
    try:
        fd = os.open(name, _DIR, dir_fd=dfd)
    except OSError:
        yield -1
        return
    try:
        yield fd
    finally:
        os.close(fd)


def _opaque(fd: int, prefix: str) -> bool:
    return _xattr(fd, f"{prefix}.overlay.opaque") == b"y"


def _xattr(fd: int, name: str) -> bytes | None:
    try:
        return os.getxattr(fd, name)
    except OSError:
        return None
