"""Reading one source file stably: shared flock (or a sidecar lock kept in the store), re-read
while it changes, stage the bytes one complete version of the writer produced.

The file is opened by name relative to its directory's descriptor (scan.py walks by descriptors):
never by a path from `/`, which another user owning the tree could re-point at root's files.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import time

from veloverlay import _libc, posixacl
from veloverlay.errors import Reason, VeloError
from veloverlay.files import wait_for_writes
from veloverlay.store.cas import Stage, Store
from veloverlay.store.digest import Digest, hash_fd

__all__ = ["read_stable", "Changed", "Pseudo"]


MAX_REREADS = 8
LOCK_TRIES = 200  # × 5 ms: a writer holding an exclusive lock for > 1 s makes the source unstable
_SMALL = 1 << 20
# -- reading a source file stably --------------------------------------------------------------


def _flock(fd: int, op: int) -> None:
    """fcntl.flock, as a seam for tests that inject ENOTSUP/ENOLCK."""
    fcntl.flock(fd, op)


def _lock_source(fd: int, path: bytes, store: Store) -> int:
    """Take a shared lock on the source; return a sidecar fd to release, or -1."""
    for _ in range(LOCK_TRIES):
        try:
            _flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return -1
        except BlockingIOError:
            time.sleep(0.005)
        except OSError as exc:
            if exc.errno not in (errno.ENOTSUP, errno.ENOLCK, errno.EOPNOTSUPP):
                raise
            # The filesystem cannot lock: a sidecar lock in the store, keyed by (dev, ino),
            # never a file written into the tree being ingested.
            side = _lock_sidecar(_sidecar_path(store, fd))
            if side >= 0:
                return side
            break
    raise VeloError(
        f"a writer holds {os.fsdecode(path)} locked", reason=Reason.SOURCE_UNSTABLE, path=path
    )


def _sidecar_path(store: Store, fd: int) -> str:
    st = os.fstat(fd)
    return os.fspath(store.locks / f"{st.st_dev:x}-{st.st_ino:x}.lock")


def _lock_sidecar(path: str) -> int:
    """flock(LOCK_SH) on the sidecar file at `path` (made if missing); -1 if it stays held.

    A finishing reader removes the file when it is the last holder (`_release_sidecar`), so the
    lock is good only if the file locked is still the one at `path` afterwards: else retry."""
    for _ in range(LOCK_TRIES):
        side = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(side, fcntl.LOCK_SH | fcntl.LOCK_NB)
            mine, cur = os.fstat(side), os.stat(path)
        except (BlockingIOError, FileNotFoundError):
            os.close(side)
            time.sleep(0.005)
            continue
        if (mine.st_dev, mine.st_ino) == (cur.st_dev, cur.st_ino):
            return side
        os.close(side)
    return -1


def _release_sidecar(side: int, path: str) -> None:
    """Remove the sidecar if no one else holds it (then close): locks-v1 does not grow by one
    file per file ever ingested."""
    try:
        fcntl.flock(side, fcntl.LOCK_EX | fcntl.LOCK_NB)
        mine, cur = os.fstat(side), os.stat(path)
        if (mine.st_dev, mine.st_ino) == (cur.st_dev, cur.st_ino):
            os.unlink(path)
    except (BlockingIOError, FileNotFoundError):
        pass  # another reader holds it (it removes it when done), or it is gone already
    finally:
        os.close(side)


def _same(a: os.stat_result, b: os.stat_result) -> bool:
    return (
        a.st_size == b.st_size
        and a.st_mtime_ns == b.st_mtime_ns
        and a.st_ctime_ns == b.st_ctime_ns
        and a.st_ino == b.st_ino
    )


NOT_COMMITTED = "nothing was committed; fix the source and retry"


def read_stable(
    dfd: int,
    name: bytes,
    where: bytes,
    stage: Stage,
    store: Store,
    coarse: bool = False,
    dev: int | None = None,
) -> tuple[Digest, os.stat_result, bool, bytes | None]:
    """Hash and stage one complete version of the file `name` in the directory `dfd` (shown as
    `where`/`name` in messages). Returns (digest, stat of it, racy, its access ACL: `posixacl`,
    read between the two stats, so a `setfacl` meanwhile is a change). A name that is no longer a
    regular file (a symlink now, a FIFO) is `Changed`; one that is gone, FileNotFoundError.
    `coarse`: the filesystem's ctime is as coarse as the clock's tick (`dirfd.coarse_ctime`),
    so a file changed within RACY_NS is racy even when its mtime was put back (touch -r, cp -p):
    a second such change in the same tick after this read would leave the stat as it is.
    `dev`: the directory's device; a file on another one (mounted there) that is on a kernel
    pseudo filesystem (a bind-mounted /proc file: its size does not tell its content) is
    `Pseudo`, never read."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    path = where + b"/" + name
    for _ in range(MAX_REREADS):
        try:
            fd = os.open(name, flags, dir_fd=dfd)
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # a symlink now: never followed
                raise Changed from None
            if exc.errno in (errno.EACCES, errno.EPERM):
                raise VeloError(
                    f"cannot read {os.fsdecode(path)}: {exc.strerror}",
                    reason=Reason.SOURCE_UNREADABLE,
                    path=path,
                ) from None
            raise
        side = -1
        try:
            # Lock first (O_NONBLOCK made the open safe for FIFOs), then one fstat before and
            # one after the read: any write in between changes size, mtime or ctime.
            side = _lock_source(fd, path, store)
            st1 = os.fstat(fd)
            if not stat.S_ISREG(st1.st_mode):
                raise Changed
            mounted = dev is not None and st1.st_dev != dev  # a file mounted there
            if mounted and _libc.fstatfs_type(fd) in _libc.PSEUDO_FS_MAGIC:
                raise Pseudo
            acl = posixacl.access_acl(fd, st1.st_mode & 0o777)
            changed = max(st1.st_mtime_ns, st1.st_ctime_ns) if coarse else st1.st_mtime_ns
            racy = time.time_ns() - changed < RACY_NS
            # A write(2) stamps mtime/ctime when it starts, then copies: one still copying now
            # was stamped before st1, and st2 would not see it. Wait it out first, whatever
            # the stamp's age: a writer descheduled mid-copy on a loaded machine can hold a
            # stamp older than RACY_NS (a mixed version was committed that way once).
            if st1.st_size <= _SMALL:
                wait_for_writes(fd, keep_offset=False)  # read with pread, from 0
                data = _read_all(fd, st1.st_size)
                st2 = os.fstat(fd)
                if not _same(st1, st2) or len(data) != st1.st_size:
                    continue
                # Within the timestamp's resolution a write may leave no trace in the stat:
                # for a file modified just now, a second read (after any write in flight
                # during the first has finished) must agree with the first.
                if racy:
                    wait_for_writes(fd)
                    if os.pread(fd, st1.st_size + 1, 0) != data:
                        continue
                return stage.add_bytes(data), st1, racy, acl
            wait_for_writes(fd)
            digest, size, new = stage.add_fd(fd)
            st2 = os.fstat(fd)
            ok = _same(st1, st2) and size == st1.st_size
            if ok and racy:  # the same second look for large files: hash once more
                wait_for_writes(fd)
                os.lseek(fd, 0, os.SEEK_SET)
                ok = hash_fd(fd) == (digest, size)
            if not ok:
                if new:
                    stage.discard(digest)
                continue
            return digest, st1, racy, acl
        finally:
            if side >= 0:
                _release_sidecar(side, _sidecar_path(store, fd))
            os.close(fd)
    raise VeloError(
        f"{os.fsdecode(path)} kept changing while it was read ({MAX_REREADS} tries)",
        reason=Reason.SOURCE_UNSTABLE,
        path=path,
        hint="stop the writer, or retry the ingest",
    )


class Changed(Exception):
    """The path stopped being a regular file between walk and read."""


class Pseudo(Exception):
    """The file is a mount of a kernel pseudo filesystem's file (`read_stable`'s `dev`)."""


def _read_all(fd: int, size: int) -> bytes:
    """Read `size` bytes from offset 0 (a file that grows or shrinks meanwhile shows in the
    second fstat)."""
    data = os.pread(fd, size, 0)
    if len(data) < size:  # a short read: keep going until EOF
        parts = [data]
        got = len(data)
        while got < size:
            more = os.pread(fd, size - got, got)
            if not more:
                break
            parts.append(more)
            got += len(more)
        data = b"".join(parts)
    return data


RACY_NS = 1_000_000_000
