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
    "real_root",
    "untrusted_on_path",
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


def real_root() -> bool:
    """Whether this process acts as root outside any user namespace: its effective uid maps to
    uid 0 of the initial namespace (root of a user namespace made by another user does not)."""
    uid = os.geteuid()
    try:
        with open("/proc/self/uid_map", encoding="ascii") as f:
            for line in f:
                inside, outside, count = (int(x) for x in line.split())
                if inside <= uid < inside + count:
                    return outside + uid - inside == 0
    except (OSError, ValueError):
        pass
    return uid == 0  # no /proc: this process's own word


_MAX_LINKS = 40  # as the kernel's path walk


def _writable_by_others(path: str, st: os.stat_result) -> bool:
    """Whether users other than the owner (and root) may add, remove or rename entries of the
    directory `path`: world-writable, or group-writable by a group other than root's, or by
    whoever an access ACL names (the group bits are then the ACL's mask)."""
    if st.st_mode & stat.S_IWOTH:
        return True
    if not st.st_mode & stat.S_IWGRP:
        return False
    if st.st_gid != 0:
        return True
    try:
        os.getxattr(path, "system.posix_acl_access", follow_symlinks=False)
    except OSError:
        return False  # no ACL (ENODATA), or a filesystem without them
    return True


def _judge_dir(path: str, st: os.stat_result, trusted: set[int]) -> str | None:
    if not stat.S_ISDIR(st.st_mode):
        return f"{path} is not a directory"
    if st.st_uid not in trusted:
        return f"{path} belongs to uid {st.st_uid}"
    if not st.st_mode & stat.S_ISVTX and _writable_by_others(path, st):
        mode = stat.S_IMODE(st.st_mode)
        return f"{path} is writable by others than its owner (mode {mode:04o}, group {st.st_gid})"
    return None


def untrusted_on_path(path: str | os.PathLike[str], trusted: set[int]) -> tuple[str, str | None]:
    """Walk the absolute `path` one component at a time, as the kernel resolves it (symbolic
    links followed), and say whether anyone but the users `trusted` could change where it
    leads: (its real path, None), or (the component at fault, why).

    Every directory looked into must belong to a trusted user and be writable by nobody else
    (group-writable only by root's group, with no ACL), except a sticky one (/tmp, /dev/shm),
    whose entry the walk takes must then belong to a trusted user (its owner alone may rename
    or remove it). Every symbolic link followed must belong to a trusted user. The last
    component itself is not judged (only its link, if it is one, and its owner in a sticky
    directory): its caller knows what it needs of it. The walk stops at the first component
    that does not exist (nothing below it can be judged yet)."""
    text = os.fspath(path)
    if not text.startswith("/"):
        raise ValueError(f"not an absolute path: {text}")
    todo = [c for c in reversed(text.split("/")) if c not in ("", ".")]
    cur = "/"
    st = os.lstat(cur)
    why = _judge_dir(cur, st, trusted) if todo else None
    if why is not None:
        return cur, why
    sticky = [bool(st.st_mode & stat.S_ISVTX)]  # per directory of `cur`, from / down
    links = 0
    while todo:
        name = todo.pop()
        if name == "..":
            if cur != "/":
                cur = os.path.dirname(cur)
                sticky.pop()
            continue
        child = os.path.join(cur, name)
        try:
            st = os.lstat(child)
        except FileNotFoundError:
            return child, None
        if sticky[-1] and st.st_uid not in trusted:
            return child, (
                f"{child} belongs to uid {st.st_uid}, in the sticky directory {cur} "
                "(its owner may rename or replace it)"
            )
        if stat.S_ISLNK(st.st_mode):
            if st.st_uid not in trusted:
                return child, f"{child} is a symbolic link that belongs to uid {st.st_uid}"
            links += 1
            if links > _MAX_LINKS:
                return child, f"{text}: too many levels of symbolic links"
            target = os.readlink(child)
            todo.extend(c for c in reversed(target.split("/")) if c not in ("", "."))
            if target.startswith("/"):
                cur, sticky = "/", sticky[:1]
            continue
        cur = child
        if not todo:
            break
        why = _judge_dir(cur, st, trusted)
        if why is not None:
            return cur, why
        sticky.append(bool(st.st_mode & stat.S_ISVTX))
    return cur, None
