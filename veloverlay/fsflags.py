"""Inode flags: read them, and set or clear FS_IMMUTABLE_FL (`chattr +i`).

Owns FS_IOC_GETFLAGS/FS_IOC_SETFLAGS. Imports only the standard library, `veloverlay.errors` and
`veloverlay._libc`. Setting or clearing +i needs CAP_LINUX_IMMUTABLE in the initial user namespace:
it is EPERM for everyone else, root inside a user namespace included (measured), and the raised
`SysError` carries that hint. ENOTTY/EOPNOTSUPP (a filesystem without inode flags) are raised too;
callers treat them as "unsupported" and record it (never a silent best effort, STYLE B6).
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator

from veloverlay import _libc
from veloverlay.errors import SysError

__all__ = [
    "FS_IMMUTABLE_FL",
    "get_flags",
    "set_immutable",
    "set_immutable_at",
    "set_immutable_fd",
    "is_immutable",
    "make_mutable",
    "may_set_immutable",
    "dir_attrs",
]

FS_IMMUTABLE_FL = _libc.FS_IMMUTABLE_FL

StrPath = str | bytes | os.PathLike[str]


@contextlib.contextmanager
def _open_for_flags(path: StrPath, dir_fd: int | None = None) -> Iterator[int]:
    # Read-only is enough for both ioctls and works on directories; O_NONBLOCK keeps a FIFO from
    # blocking; O_NOFOLLOW acts on the link itself (then ELOOP), never on what it points to.
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(path, flags, dir_fd=dir_fd)
    try:
        yield fd
    finally:
        os.close(fd)


def _named(path: StrPath, exc: SysError) -> SysError:
    """The ioctl only knew an fd; name the path (the hint is recomputed from syscall+errno)."""
    return SysError(exc.errno or errno.EIO, exc.syscall, path)


def get_flags(path: StrPath) -> int:
    """The inode's FS_*_FL flags (as `lsattr` shows them)."""
    with _open_for_flags(path) as fd:
        try:
            return _libc.ioctl_getflags(fd)
        except SysError as exc:
            raise _named(path, exc) from None


def set_immutable(path: StrPath, on: bool = True) -> None:
    """Set (or clear, with `on=False`) the immutable flag; a no-op when it already is so."""
    set_immutable_at(None, path, on)


def set_immutable_at(dir_fd: int | None, name: StrPath, on: bool = True) -> None:
    """`set_immutable` of `name` in the directory `dir_fd` (no symbolic link followed)."""
    with _open_for_flags(name, dir_fd) as fd:
        set_immutable_fd(fd, name, on)


def set_immutable_fd(fd: int, name: StrPath, on: bool = True) -> None:
    """`set_immutable` of the open file `fd` (`name` in errors)."""
    try:
        flags = _libc.ioctl_getflags(fd)
        wanted = flags | FS_IMMUTABLE_FL if on else flags & ~FS_IMMUTABLE_FL
        if wanted != flags:
            _libc.ioctl_setflags(fd, wanted)
    except SysError as exc:
        raise _named(name, exc) from None


def make_mutable(fd: int) -> None:
    """Clear immutable and append-only on the open file or directory `fd` (opened for reading,
    not O_PATH): what `files.force_rmtree(unflag=...)` calls on an entry it may not remove.
    Acts on that inode alone, never on a name."""
    flags = _libc.ioctl_getflags(fd)
    wanted = flags & ~(FS_IMMUTABLE_FL | _libc.FS_APPEND_FL)
    if wanted != flags:
        _libc.ioctl_setflags(fd, wanted)


# What a user sets on a directory for what is made in it (lsattr letters): A noatime, c compress,
# d nodump, j data journalling, m no compression, C no copy-on-write, D dirsync, S sync,
# T top of a hierarchy, P project inheritance, F casefold.
_DIR_FLAGS = 0x80 | 0x4 | 0x40 | 0x4000 | 0x400 | 0x00800000 | 0x10000 | 0x8 | 0x20000
_DIR_FLAGS |= 0x20000000 | 0x40000000


def dir_attrs(fd: int) -> tuple[int, int]:
    """(the flags of `_DIR_FLAGS` the directory `fd` (not O_PATH) carries, its project id), each
    0 where the filesystem has none: what a directory made beside it may lack."""
    out = []
    for get in (_libc.ioctl_getflags, _libc.ioctl_getprojid):
        try:
            out.append(get(fd))
        except SysError:
            out.append(0)  # ENOTTY, EOPNOTSUPP, EINVAL: not on this filesystem
    return out[0] & _DIR_FLAGS, out[1]


def is_immutable(path: StrPath) -> bool:
    return bool(get_flags(path) & FS_IMMUTABLE_FL)


_may: bool | None = None


def may_set_immutable() -> bool:
    """Whether this process is real root: uid 0 in the initial user namespace (its uid_map
    maps the whole range onto itself), the only place +i can be set. Decided once per process;
    a failure where this holds is an anomaly to record, not the expected EPERM."""
    global _may
    if _may is None:
        try:
            with open("/proc/self/uid_map", "rb") as f:
                whole = f.read().split() == [b"0", b"0", b"4294967295"]
        except OSError:
            whole = False
        _may = os.geteuid() == 0 and whole
    return _may
