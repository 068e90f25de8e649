"""Opening the directories of a source tree by descriptor, never through a symbolic link.

Root ingests trees that other users own and can change while they are read: a path root walks
again after a listing may lead somewhere else by then (a directory on the way swapped for a
symlink to root's own files). So nothing below the top is reached by a path from `/`. Each
directory is opened relative to its parent's descriptor, with O_NOFOLLOW|O_DIRECTORY, and must be
the directory (dev, ino) that the parent's listing saw; its files and symlinks are then read
relative to it. The top is opened once, from the path the caller resolved, with no symlink
followed anywhere on the way (openat2 RESOLVE_NO_SYMLINKS). A subtree handed to another worker by
its path is opened from the top's descriptor, beneath it, again with no symlink followed
(openat2 RESOLVE_BENEATH; component by component, each O_NOFOLLOW, where openat2 is refused).

`Replaced` says the name leads to something other than the directory listed: a symlink, a file,
another directory; the caller reports it as SOURCE_UNSTABLE.
"""

from __future__ import annotations

import errno
import os

from veloverlay import _libc, files

__all__ = ["DIR", "Replaced", "open_path", "open_child", "open_beneath", "fs_magic", "coarse_ctime"]

DIR = files.DIRFLAGS
_NO_LINKS = _libc.RESOLVE_NO_SYMLINKS | _libc.RESOLVE_NO_MAGICLINKS
# openat2 itself refused: an old kernel or a seccomp filter (ENOSYS, or EPERM from older
# container profiles), a struct or flag it does not know (E2BIG, EINVAL).
_REFUSED = (errno.ENOSYS, errno.EPERM, errno.E2BIG, errno.EINVAL)
# The name is a symlink (ELOOP), not a directory (ENOTDIR), or resolved outside (EXDEV).
_NOT_IT = (errno.ELOOP, errno.ENOTDIR, errno.EXDEV)


class Replaced(Exception):
    """A name no longer leads to the directory that was listed there."""


def _openat2(dfd: int, path: bytes, resolve: int) -> int | None:
    """openat2 of the directory `path`, or None when the kernel refuses the call itself."""
    for _ in range(16):  # EAGAIN: a rename elsewhere raced a scoped lookup; it says retry
        try:
            return _libc.openat2(dfd, path, DIR, 0, resolve)
        except OSError as exc:
            if exc.errno == errno.EAGAIN:
                continue
            if exc.errno in _REFUSED:
                return None
            if exc.errno in _NOT_IT:
                raise Replaced from None
            if exc.errno == errno.ENOENT:
                raise FileNotFoundError(exc.errno, exc.strerror, os.fsdecode(path)) from None
            if exc.errno == errno.EACCES:
                raise PermissionError(exc.errno, exc.strerror, os.fsdecode(path)) from None
            raise
    return None


def _walk(dfd: int, parts: list[bytes]) -> int:
    """Open the directory `parts` below `dfd` one component at a time, none followed if it is
    a symlink (`files.open_below`; a link or a non-directory on the way is `Replaced`)."""
    try:
        return files.open_below(dfd, parts)
    except OSError as exc:
        if exc.errno in _NOT_IT:
            raise Replaced from None
        raise


def _check(fd: int, dev: int | None, ino: int) -> int:
    # "." resolved in it, not fstat: that also needs the search permission every lookup of its
    # entries will (a 0600 directory opens, then no entry in it could be stat-ed)
    try:
        st = os.stat(b".", dir_fd=fd, follow_symlinks=False)
    except BaseException:
        os.close(fd)
        raise
    if st.st_ino != ino or (dev is not None and st.st_dev != dev):
        os.close(fd)
        raise Replaced
    return fd


def open_path(path: bytes) -> int:
    """The directory at the absolute `path` (symlinks resolved by the caller), opened with no
    symlink followed on the way: one that appeared since the resolution is `Replaced`."""
    fd = _openat2(_libc.AT_FDCWD, path, _NO_LINKS)
    if fd is not None:
        return fd
    root = os.open(b"/", DIR)
    try:
        return _walk(root, [p for p in path.split(b"/") if p]) if path.strip(b"/") else os.dup(root)
    finally:
        os.close(root)


def open_child(dfd: int, name: bytes, dev: int | None, ino: int) -> int:
    """The subdirectory `name` of the directory `dfd`, which must be (dev, ino) as listed."""
    return _check(_walk(dfd, [name]), dev, ino)


def open_beneath(top: int, rel: bytes, dev: int | None, ino: int) -> int:
    """The directory `rel` (relative, b"" for `top` itself) beneath the directory `top`, with no
    symlink followed on the way; it must be (dev, ino) as listed. A new open file description
    even for `top` itself (`top` may be shared with other processes: listing it moves its
    offset)."""
    if not rel:
        fd = os.open(b".", DIR, dir_fd=top)
    else:
        got = _openat2(top, rel, _NO_LINKS | _libc.RESOLVE_BENEATH)
        fd = got if got is not None else _walk(top, rel.split(b"/"))
    return _check(fd, dev, ino)


def fs_magic(fd: int, dev: int, known: dict[int, int]) -> int:
    """statfs's f_type of the filesystem the file `fd` (on device `dev`) is on: asked once per
    device, then kept in `known`."""
    magic = known.get(dev)
    if magic is None:
        magic = known[dev] = _libc.fstatfs_type(fd)
    return magic


def _release() -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in os.uname().release.split("-")[0].split(".")[:2])
    except ValueError:
        return (0,)


_MGTIME = _release() >= (6, 13)


def coarse_ctime(magic: int) -> bool:
    """Whether a change right after a stat may keep the ctime that stat saw (the timestamp's
    tick): everywhere but on filesystems with multigrain timestamps (ext4, xfs, btrfs, tmpfs
    since Linux 6.13)."""
    return not _MGTIME or magic not in _libc.MGTIME_FS_MAGIC
