"""Materialise a manifest as a real directory tree (bytes, modes, mtimes, symlinks, empty dirs).

Writes only inside the destination: the destination itself is made (or found empty) and opened
through its parent, pinned, and must still be where its path says (`claim_dir`: a directory on
the way may be another user's, who can swap it for a symlink to one of root's); every directory
below is created by us (0700) and entered by a fd opened with O_NOFOLLOW, every file created
with O_EXCL|O_NOFOLLOW relative to it (0600), so no symlink is ever followed (names were
validated when the node was decoded). Modes and mtimes of directories are set last, deepest
first; an existing destination written in place is closed to other users until then.

The whole tree or nothing (`dest.Place`, where the destination and its partial directory are
claimed and the finished tree renamed into place): an interrupted checkout leaves nothing at the
destination.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator

from veloverlay import faults, linking
from veloverlay.errors import Reason, SysError, VeloError
from veloverlay.files import DIRFLAGS, given_path
from veloverlay.progress import Progress
from veloverlay.store.access import refuse_kernel_fs, refuse_overlap
from veloverlay.store.cas import Store, verified_chunks
from veloverlay.store.dest import InPlace, Place, resolve_dest
from veloverlay.store.dirstack import DirStack
from veloverlay.store.manifest import Manifests, Txn
from veloverlay.store.tree import Entry, Kind, shape, totals_of

__all__ = ["checkout", "tree_totals"]

_SETID = stat.S_ISUID | stat.S_ISGID


REPORT_BYTES = 8 << 20  # a progress report at least this often while big files are written


def tree_totals(m: Manifests, txn: Txn, root: bytes) -> tuple[int, int]:
    """(entries, file bytes) of the tree `root` as checkout and materialisation walk it: every
    entry below the root (masks too) and the sizes of its files. Reads the nodes only, each
    distinct node once (`tree.totals_of`)."""
    _depth, _length, count, size = totals_of(root, lambda d: shape(m.get_node(txn, d)))
    return count, size


def checkout(
    store: Store,
    m: Manifests,
    txn: Txn,
    root: bytes,
    dest: str,
    *,
    progress: Progress | None = None,
    keep_setid: bool = False,
) -> int:
    """Write the tree `root` into `dest` (new or empty). Returns the number of entries written.
    With `progress`, the totals are counted first (`tree_totals`: the nodes only, no object is
    read), then `progress(entries, total, bytes, total bytes)` follows every 1,000 entries or
    `REPORT_BYTES` of file data.

    setuid/setgid bits are not written unless `keep_setid` (a root checkout of a bundle from
    elsewhere must not mint a setuid-root program), as ingest and harvest do."""
    real = resolve_dest(given_path(dest, "the checkout destination"))
    refuse_overlap(real, store.root, what="the destination", hint="check out outside the store")
    refuse_kernel_fs(real, what="the destination", hint="check out into an ordinary directory")
    place = Place(dest, real)
    try:
        try:
            count = _write_tree(store, m, txn, root, place, dest, progress, keep_setid)
            place.commit()
        except InPlace:
            place.abort()
            place.close()
            place.top = place._in_place()
            count = _write_tree(store, m, txn, root, place, dest, progress, keep_setid)
    except BaseException:
        place.abort()
        raise
    finally:
        place.close()
    return count


def _write_tree(
    store: Store,
    m: Manifests,
    txn: Txn,
    root: bytes,
    place: Place,
    dest: str,
    progress: Progress | None,
    keep_setid: bool,
) -> int:
    """Write the tree `root` into the directory `place.top` (a descriptor it takes over),
    naming in `place.made` each entry it creates there."""
    top, made = place.top, place.made
    count = written = reported = 0
    try:
        total, total_bytes = tree_totals(m, txn, root) if progress is not None else (0, 0)
        node = m.get_node(txn, root)
    except BaseException:
        os.close(top)
        raise
    # Depth first, one directory per level (never one per directory: a tree with more
    # directories than RLIMIT_NOFILE must check out too), at most a quarter of that limit of
    # them open (`DirStack`: a tree deeper than that must too). A directory's own mode and
    # mtime are set when everything below it is written, and it is closed then.
    stack: list[tuple[Iterator[Entry], int, int]] = [(iter(node.entries), node.mode, node.mtime_ns)]
    dirs = DirStack(top)
    try:
        while stack:
            entries, mode, mtime = stack[-1]
            dfd = dirs.fd()
            e = next(entries, None)
            if e is None:
                stack.pop()
                os.utime(dfd, ns=(mtime, mtime))
                os.chmod(dfd, mode)
                if dirs:
                    dirs.pop()
                continue
            name = e.name
            top_level = len(stack) == 1
            if e.kind is Kind.DIR:
                os.mkdir(name, 0o700, dir_fd=dfd)
                if top_level:
                    _note(made, dfd, name)
                child = m.get_node(txn, e.digest)
                dirs.push(os.open(name, DIRFLAGS, dir_fd=dfd), name)
                stack.append((iter(child.entries), child.mode, child.mtime_ns))
            elif e.kind is Kind.SYMLINK:
                os.symlink(e.target, name, dir_fd=dfd)
                if top_level:
                    _note(made, dfd, name)
                os.utime(name, ns=(e.mtime_ns, e.mtime_ns), dir_fd=dfd, follow_symlinks=False)
            elif e.kind is Kind.FILE:
                fmode = e.mode if keep_setid else e.mode & ~_SETID
                _write_file(store, dfd, name, e.digest, e.size, fmode, e.mtime_ns)
                if top_level:
                    _note(made, dfd, name)
                written += e.size
                faults.point("checkout.file")
            # MASK entries are deletions for stacked refs: nothing to write
            count += 1
            if progress is not None and (count % 1000 == 0 or written - reported >= REPORT_BYTES):
                reported = written
                progress(count, total, written, total_bytes)
        if progress is not None:
            progress(count, total, written, total_bytes)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise VeloError(
                f"no space left while checking out into {dest}", reason=Reason.STORE_FULL
            ) from exc
        raise SysError(exc.errno or errno.EIO, "checkout", dest) from exc
    finally:
        dirs.close()
        os.close(top)
    return count


def _note(made: list[tuple[str, tuple[int, int]]], dfd: int, name: bytes) -> None:
    """Name in `made` the entry `name` of `dfd` just created, with its (dev, ino)."""
    st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
    made.append((os.fsdecode(name), (st.st_dev, st.st_ino)))


def _write_file(
    store: Store, dfd: int, name: bytes, digest: bytes, size: int, mode: int, mtime: int
) -> None:
    """Copy one object into a new file, verifying its size and BLAKE3 as the bytes go by (they
    are read anyway): a damaged object leaves no file behind and raises OBJECT_CORRUPT."""
    src = store.open_object(digest)
    try:
        fd = os.open(
            name,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
            dir_fd=dfd,
        )
        try:
            for chunk in verified_chunks(src, digest, size):
                linking.write_or_skip(fd, chunk)  # a run of zeros becomes a hole
            os.ftruncate(fd, size)
            os.fchmod(fd, mode)
            os.utime(fd, ns=(mtime, mtime))
        except BaseException:
            os.close(fd)
            os.unlink(name, dir_fd=dfd)
            raise
        os.close(fd)
    finally:
        os.close(src)
