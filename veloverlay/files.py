"""Small filesystem helpers every layer uses: remove a tree whatever its modes, write JSON
atomically, hold an exclusive flock.

A leaf: imports only the standard library and `errors`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from veloverlay.errors import Reason, VeloError

__all__ = [
    "DIRFLAGS",
    "NEWFILE",
    "force_rmtree",
    "makedirs",
    "write_json_atomic",
    "write_bytes_atomic",
    "flock",
    "wait_for_writes",
]

# Open a directory we walk or write into without following a symlink; create a file exclusively.
DIRFLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
NEWFILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def makedirs(path: str | bytes | os.PathLike[str], mode: int = 0o755) -> None:
    """`mkdir -p` giving every directory it makes `mode` (masked by the umask), not only the
    last: os.makedirs makes the parents 0777 & ~umask, and a layer build runs with umask 0, where
    that is a directory of the store anyone can write."""
    try:
        os.mkdir(path, mode)
    except FileExistsError:
        return
    except FileNotFoundError:
        parent = os.path.dirname(os.fspath(path))
        if not parent or parent == os.fspath(path):
            raise
        makedirs(parent, mode)
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, mode)


def _rmdir_shallow(p: str) -> bool:
    """Remove `p` if it is an empty directory or holds only empty directories (an untouched
    session's upper and work dirs); False if it holds anything else."""
    try:
        os.rmdir(p)
        return True
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            return False
    try:
        with os.scandir(p) as it:
            entries = list(it)
        if not all(e.is_dir(follow_symlinks=False) for e in entries):
            return False  # files or symlinks (never chmod through a symlink): the full walk
        for sub in (e.path for e in entries):
            with contextlib.suppress(OSError):
                os.close(_open_dir_opened_up(sub, None))  # overlay leaves work/work at 000
            os.rmdir(sub)
        os.rmdir(p)
        return True
    except OSError:
        return False


def force_rmtree(path: str | os.PathLike[str]) -> None:
    """Remove a tree we own whatever its modes (0555/000 dirs, overlay's work/work) and whatever
    its depth: an explicit stack of names under one open directory fd, never recursion (shutil
    recurses once per level: a tree deeper than Python's recursion limit could never go) and
    never a long path (deeper than PATH_MAX is ENAMETOOLONG). Symbolic links are removed,
    never followed."""
    p = os.fspath(path)
    if not os.path.lexists(p):
        return
    if _rmdir_shallow(p):
        return
    if not stat.S_ISDIR(os.lstat(p).st_mode):
        os.unlink(p)
        return
    with contextlib.suppress(OSError):
        os.chmod(p, 0o700)
    fd = os.open(p, DIRFLAGS)
    try:
        names: list[str] = []  # the directory fd is at p/names...
        pending = [_empty_files(fd)]  # per level: subdirectories still to remove
        while True:
            if pending[-1]:
                sub = pending[-1].pop()
                child = _open_dir_opened_up(sub, fd)
                os.close(fd)
                fd = child
                names.append(sub)
                pending.append(_empty_files(fd))
                continue
            pending.pop()
            if not names:
                break
            parent = os.open("..", DIRFLAGS, dir_fd=fd)
            os.close(fd)
            fd = parent
            os.rmdir(names.pop(), dir_fd=fd)
    finally:
        os.close(fd)
    os.rmdir(p)


def _open_dir_opened_up(name: str, dfd: int | None) -> int:
    """A descriptor of the directory `name` in `dfd`, made 0700 first (a 0000 or 0555
    directory of a tree being removed). The mode is changed through a descriptor of that very
    directory (O_PATH, no link followed), never by name: a name swapped for a symbolic link in
    between would chmod whatever the link names."""
    flags = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    pfd = os.open(name, flags, dir_fd=dfd)
    try:
        with contextlib.suppress(OSError):  # not ours to change: the open below says so
            os.chmod(f"/proc/self/fd/{pfd}", 0o700)
        try:
            return os.open(f"/proc/self/fd/{pfd}", DIRFLAGS & ~os.O_NOFOLLOW)
        except FileNotFoundError:  # no /proc here: by name, still never through a link
            return os.open(name, DIRFLAGS, dir_fd=dfd)
    finally:
        os.close(pfd)


def _empty_files(dfd: int) -> list[str]:
    """Unlink every non-directory in the directory `dfd`; return its subdirectories' names."""
    subdirs = []
    for e in os.scandir(dfd):
        if e.is_dir(follow_symlinks=False):
            subdirs.append(e.name)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(e.name, dir_fd=dfd)
    return subdirs


@contextlib.contextmanager
def flock(path: Path) -> Iterator[None]:
    makedirs(path.parent)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def write_json_atomic(path: Path, data: object) -> None:
    """Replace `path` with `data` as JSON, atomically (see `write_bytes_atomic`)."""
    write_bytes_atomic(path, json.dumps(data, sort_keys=True).encode())


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes, mode: int = 0o644) -> None:
    """Replace `path` with `data`, atomically: a new file (created exclusively, never through a
    symbolic link, with `mode` whatever the umask) renamed over it. A full filesystem is
    STORE_FULL and leaves no temporary file; the old content stays."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}")
    try:
        makedirs(path.parent)
        fd = os.open(tmp, NEWFILE, mode)
        try:
            os.fchmod(fd, mode)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.rename(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise VeloError(
                f"the filesystem of {path.parent} is full",
                reason=Reason.STORE_FULL,
                hint="free space (e.g. 'veloverlay gc') and retry; what was committed is kept",
                path=path,
            ) from exc
        raise


def wait_for_writes(fd: int) -> None:
    """Wait until no write(2) to this file is in flight.

    Buffered writes hold the inode's i_rwsem for their whole copy on tmpfs, ext4 and btrfs, and
    lseek(SEEK_DATA) takes it there too, so this returns only once a concurrent write has
    finished (elsewhere it is a cheap no-op: the double read still narrows the window). Without
    it an unlocked in-place writer could be read half-old, half-new with identical stats
    before and after (measured on tmpfs: ~half the reads of a 1-3 MiB file under a writer
    that pwrite()s without a lock).
    """
    try:
        os.lseek(fd, 0, os.SEEK_DATA)
    except OSError:
        pass  # ENXIO (empty file), or a filesystem without SEEK_DATA
