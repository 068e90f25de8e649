"""Materialise a manifest as a real directory tree (bytes, modes, mtimes, symlinks, empty dirs).

Writes only inside the destination: the destination itself is made (or found empty) and opened
through its parent, pinned, and must still be where its path says (`claim_dir`: a directory on
the way may be another user's, who can swap it for a symlink to one of root's); every directory
below is created by us and entered through a directory fd opened with O_NOFOLLOW, every file is
created with O_EXCL|O_NOFOLLOW relative to it, so no symlink (from the manifest or planted
concurrently) is ever followed, and names were validated when the node was decoded. Directory
modes and mtimes are set last, deepest first.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator

from veloverlay import files, linking, pathtrust
from veloverlay.errors import Reason, SysError, VeloError
from veloverlay.files import DIRFLAGS
from veloverlay.mount import pin_dir
from veloverlay.progress import Progress
from veloverlay.store.access import refuse_overlap
from veloverlay.store.cas import Store, verified_chunks
from veloverlay.store.manifest import Manifests, Txn
from veloverlay.store.tree import Entry, Kind

__all__ = ["checkout", "claim_dir", "resolve_dest", "tree_totals"]

_SETID = stat.S_ISUID | stat.S_ISGID


def resolve_dest(path: str) -> str:
    """`path` made absolute, its parent resolved once (realpath); the last component is kept as
    given, never followed (a symbolic link there is not a directory to write into)."""
    parent, name = os.path.split(os.path.abspath(path))
    return os.path.join(pathtrust.realpath_safe(parent, Reason.TARGET_INVALID), name)


def claim_dir(real: str, mode: int) -> tuple[int, bool]:
    """(descriptor, created) of the directory at `real` (absolute, resolved: `resolve_dest`),
    made with `mode` if missing. Everything goes by descriptor from the parent on: the parent is
    pinned (`mount.pin_dir`: a symlink on the way since the resolution is refused), the last
    component made and opened relative to it, never followed (DIRFLAGS). A user who owns a
    directory on the way can rename it, or swap it for a symlink to one of root's, at any
    moment; root then never writes into, nor takes the identity of, what the path leads to
    instead. The directory opened must still be at `real` (else TARGET_INVALID; one made here
    is removed again): a tree written where its parent was moved is not where it was asked.

    FileNotFoundError: the parent is missing; NotADirectoryError: the entry exists and is no
    directory (a symlink included); TARGET_INVALID: the path changed on the way."""
    parent, name = os.path.split(real)
    if not name or name in (".", ".."):
        raise NotADirectoryError(errno.EISDIR, "not a name to make", real)
    try:
        pfd = pin_dir(parent or "/")
    except VeloError as exc:
        if exc.reason is Reason.NOT_FOUND:
            raise FileNotFoundError(errno.ENOENT, "no such directory", parent) from None
        raise
    try:
        try:
            os.mkdir(name, mode, dir_fd=pfd)
            created = True
        except FileExistsError:
            created = False
        except OSError as exc:
            raise _unmade(exc, "mkdir", real) from None
        try:
            fd = os.open(name, DIRFLAGS, dir_fd=pfd)
        except OSError as exc:
            if exc.errno not in (errno.ELOOP, errno.ENOTDIR, errno.ENOENT):
                raise _unmade(exc, "open", real) from None
            if created:  # ours, and since replaced or moved by whoever owns the parent
                raise _moved(real, "the directory made there was replaced") from None
            if exc.errno == errno.ENOENT:
                raise
            raise NotADirectoryError(exc.errno, "not a directory", real) from None
        try:
            where = os.readlink(f"/proc/self/fd/{fd}")  # as `pin_dir`: where the kernel says
        except OSError:
            where = "?"
        if where != real:
            st = os.fstat(fd)
            os.close(fd)
            if created:
                with contextlib.suppress(OSError):
                    files.rmdir_at(pfd, name, expect=(st.st_dev, st.st_ino))
            what = "made" if created else "found"
            raise _moved(real, f"the directory {what} there is now at {where}")
    finally:
        os.close(pfd)
    return fd, created


def _unmade(exc: OSError, syscall: str, real: str) -> Exception:
    """The failure to make or open the directory `real`, naming all of it (the OSError names
    only its last component): a name too long is the user's path (BAD_PATH), not a syscall's
    fault. FileNotFoundError stays as it is (callers: the parent is missing)."""
    if isinstance(exc, FileNotFoundError):
        return exc
    if exc.errno == errno.ENAMETOOLONG:
        return VeloError(
            f"{real}: a name on the way is longer than 255 bytes",
            reason=Reason.BAD_PATH,
            path=real,
        )
    return SysError(exc.errno or errno.EIO, syscall, real)


def _moved(real: str, what: str) -> VeloError:
    return VeloError(
        f"{real} changed while it was opened: {what}",
        reason=Reason.TARGET_INVALID,
        path=real,
        hint="a directory on the way was replaced (by a symlink, or renamed); use a path "
        "that no other user can change",
    )


def _prepare_dest(dest: str) -> int:
    try:
        fd, created = claim_dir(resolve_dest(dest), 0o700)
    except NotADirectoryError:
        raise VeloError(
            f"{dest} exists and is not a directory", reason=Reason.EXISTS, path=dest
        ) from None
    except FileNotFoundError:
        raise VeloError(
            f"the parent of {dest} does not exist", reason=Reason.NOT_FOUND, path=dest
        ) from None
    try:
        if not created and os.listdir(fd):
            raise VeloError(
                f"{dest} is not empty",
                reason=Reason.EXISTS,
                path=dest,
                hint="check out into a new or empty directory",
            )
    except BaseException:
        os.close(fd)
        raise
    return fd


REPORT_BYTES = 8 << 20  # a progress report at least this often while big files are written


def tree_totals(m: Manifests, txn: Txn, root: bytes) -> tuple[int, int]:
    """(entries, file bytes) of the tree `root` as checkout and materialisation walk it: every
    entry below the root (masks too) and the sizes of its files. Reads the nodes only, each
    distinct node once, bottom-up by an explicit stack (trees may be 256 levels deep)."""
    memo: dict[bytes, tuple[int, int]] = {}
    stack: list[bytes] = [root]
    while stack:
        d = stack[-1]
        if d in memo:
            stack.pop()
            continue
        node = m.get_node(txn, d)
        subdirs = [e.digest for e in node.entries if e.kind is Kind.DIR]
        todo = [s for s in subdirs if s not in memo]
        if todo:
            stack.extend(todo)
            continue
        stack.pop()
        count = len(node.entries) + sum(memo[s][0] for s in subdirs)
        size = sum(e.size for e in node.entries if e.kind is Kind.FILE)
        memo[d] = (count, size + sum(memo[s][1] for s in subdirs))
    return memo[root]


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
    refuse_overlap(
        resolve_dest(dest), store.root, what="the destination", hint="check out outside the store"
    )
    top = _prepare_dest(dest)
    count = written = reported = 0
    total, total_bytes = tree_totals(m, txn, root) if progress is not None else (0, 0)
    # Depth first, one open directory fd per level (never one per directory: a tree with more
    # directories than RLIMIT_NOFILE must check out too). A directory's own mode and mtime are
    # set when everything below it is written, and its fd is closed then.
    stack: list[tuple[int, Iterator[Entry], int, int]] = []

    def enter(dfd: int, digest: bytes) -> None:
        node = m.get_node(txn, digest)
        stack.append((dfd, iter(node.entries), node.mode, node.mtime_ns))

    try:
        enter(top, root)
        while stack:
            dfd, entries, mode, mtime = stack[-1]
            e = next(entries, None)
            if e is None:
                stack.pop()
                os.utime(dfd, ns=(mtime, mtime))
                os.chmod(dfd, mode)
                os.close(dfd)
                continue
            name = e.name
            if e.kind is Kind.DIR:
                os.mkdir(name, 0o700, dir_fd=dfd)
                enter(os.open(name, DIRFLAGS, dir_fd=dfd), e.digest)
            elif e.kind is Kind.SYMLINK:
                os.symlink(e.target, name, dir_fd=dfd)
                os.utime(name, ns=(e.mtime_ns, e.mtime_ns), dir_fd=dfd, follow_symlinks=False)
            elif e.kind is Kind.FILE:
                fmode = e.mode if keep_setid else e.mode & ~_SETID
                _write_file(store, dfd, name, e.digest, e.size, fmode, e.mtime_ns)
                written += e.size
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
        for dfd, _e, _m, _t in stack:
            os.close(dfd)
    return count


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
