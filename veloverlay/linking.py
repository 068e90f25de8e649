"""Placing a file's bytes at a new name: reflink, hard link or copy, reporting which was done.

Owns the fallback chain (uv's `link_dir`, ostree's HardlinkResult): every function returns the
`LinkMode` it actually used, so callers record it and `--strict` can refuse a fallback
(`allow_copy=False` -> `Reason.FALLBACK_FORBIDDEN`). Imports only the standard library,
`veloverlay.errors` and `veloverlay._libc`.

A destination is always created exclusively and without following symlinks (O_CREAT|O_EXCL|
O_NOFOLLOW), so these functions never write through an existing name; a half-written copy is
removed before the error propagates.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import os
import stat

from veloverlay import _libc, files
from veloverlay.errors import Reason, SysError, VeloError

__all__ = [
    "LinkMode",
    "clone_or_copy",
    "copy_bytes",
    "copy_extents",
    "copy_in_kernel",
    "hardlink_or_copy",
    "write_or_skip",
]

StrPath = str | os.PathLike[str]

# errnos meaning "this way is not possible here, try the next one" rather than a real failure
_NO_REFLINK = frozenset({errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL, errno.ENOSYS})
_NO_COPY_FILE_RANGE = frozenset({errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP})
_NO_SENDFILE = frozenset({errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP})
# EMLINK: ext4 stops at 65,000 links per inode (measured); EXDEV: another filesystem; EPERM:
# an immutable (+i) source, or fs.protected_hardlinks for a file we do not own.
_NO_HARDLINK = frozenset({errno.EMLINK, errno.EXDEV, errno.EPERM})

_CHUNK = 1 << 30
_BLOCK = 4096


class LinkMode(enum.Enum):
    """How a file was placed."""

    REFLINK = "reflink"
    """A copy-on-write clone (FICLONE): a new inode sharing the source's extents."""
    HARDLINK = "hardlink"
    """A second name for the source inode: shares its mode, owner and flags."""
    COPY = "copy"
    """A new inode holding a byte copy (copy_file_range, sendfile or read/write)."""
    SYMLINK = "symlink"
    """A symbolic link to the source path; reads resolve to the source."""


def copy_bytes(src_fd: int, dst_fd: int) -> None:
    """Copy from the current offsets to EOF, by the best call the kernel accepts here; the
    source's holes stay holes (`copy_extents`)."""
    start = os.lseek(src_fd, 0, os.SEEK_CUR)
    dst_start = os.lseek(dst_fd, 0, os.SEEK_CUR)
    try:
        end = start + copy_extents(src_fd, dst_fd, start, dst_start)
        os.lseek(src_fd, end, os.SEEK_SET)
        os.lseek(dst_fd, dst_start + end - start, os.SEEK_SET)
        while os.copy_file_range(src_fd, dst_fd, _CHUNK):  # what it grew by meanwhile
            pass
        return
    except OSError as exc:
        if exc.errno not in _NO_COPY_FILE_RANGE:
            raise
    # Whatever copy_file_range moved before refusing, start again from the beginning.
    os.lseek(src_fd, 0, os.SEEK_SET)
    os.lseek(dst_fd, 0, os.SEEK_SET)
    os.ftruncate(dst_fd, 0)
    try:
        offset = 0
        while sent := os.sendfile(dst_fd, src_fd, offset, _CHUNK):
            offset += sent
        return
    except OSError as exc:
        if exc.errno not in _NO_SENDFILE:
            raise
    os.lseek(src_fd, 0, os.SEEK_SET)
    os.lseek(dst_fd, 0, os.SEEK_SET)
    os.ftruncate(dst_fd, 0)
    while chunk := os.read(src_fd, 1 << 20):
        view = memoryview(chunk)
        while view:
            view = view[os.write(dst_fd, view) :]


def copy_in_kernel(src_fd: int, dst_fd: int) -> LinkMode | None:
    """Fill the empty `dst_fd` with `src_fd`'s bytes from its current offset to EOF without
    passing them through this process: a reflink (FICLONE, only from offset 0) where the
    filesystem shares extents, else copy_file_range (itself a reflink on btrfs/XFS, an in-kernel
    copy on ext4/tmpfs). Returns how, or None when neither is possible here (another filesystem,
    an old kernel, a source copy_file_range reads short, such as procfs): then `dst_fd` is empty
    again and both offsets are back where they were, for a copy by read/write. Other errors
    (ENOSPC, EIO) propagate, `dst_fd` possibly partly written.

    What lands in `dst_fd` is a copy of the source at some moment of the copy, not a snapshot:
    a caller that must know the bytes hashes `dst_fd`, not the source."""
    start = os.lseek(src_fd, 0, os.SEEK_CUR)
    size = os.fstat(src_fd).st_size
    if start == 0:
        try:
            _libc.ficlone(dst_fd, src_fd)
            os.lseek(src_fd, 0, os.SEEK_END)
            os.lseek(dst_fd, 0, os.SEEK_END)
            return LinkMode.REFLINK
        except SysError as exc:
            if exc.errno not in _NO_REFLINK:
                raise
    try:
        copied = copy_extents(src_fd, dst_fd, start, 0)
    except OSError as exc:
        if exc.errno not in _NO_COPY_FILE_RANGE:
            raise
        copied = -1
    if copied == max(size - start, 0):
        os.lseek(src_fd, start + copied, os.SEEK_SET)
        os.lseek(dst_fd, copied, os.SEEK_SET)
        return LinkMode.COPY
    # Refused, or short of the size fstat gave (a file that copy_file_range reads as empty, or
    # one that changed: the caller's own read and stat checks then see which).
    os.lseek(src_fd, start, os.SEEK_SET)
    os.lseek(dst_fd, 0, os.SEEK_SET)
    os.ftruncate(dst_fd, 0)
    return None


def copy_extents(src_fd: int, dst_fd: int, start: int, dst_start: int) -> int:
    """Copy `src_fd` from `start` to its size (fstat, now) to `dst_fd` at `dst_start`, by
    copy_file_range of its data extents only (SEEK_DATA/SEEK_HOLE): a hole stays a hole, as
    `cp` keeps them. A disk image or database file of 10 GiB holding 100 MiB costs 100 MiB, not
    10 GiB of zeros written (and a per-boot layer cache on tmpfs: of memory). Neither
    descriptor's offset is used or moved. Returns how many bytes of the range it covered: all of
    it, or less where the source ended early (it shrank, or reads short, as procfs files do).
    Errors of copy_file_range propagate (see `_NO_COPY_FILE_RANGE` for those that mean "not
    here"); a filesystem that cannot say where its data is (EINVAL from SEEK_DATA) is copied
    as one extent."""
    end = os.fstat(src_fd).st_size
    pos = start
    while pos < end:
        try:
            data = os.lseek(src_fd, pos, os.SEEK_DATA)
            hole = min(os.lseek(src_fd, data, os.SEEK_HOLE), end)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # nothing but a hole from `pos` on
                break
            if exc.errno != errno.EINVAL:
                raise
            data, hole = pos, end
        if data >= end:
            break
        while data < hole:
            n = os.copy_file_range(src_fd, dst_fd, hole - data, data, dst_start + data - start)
            if n == 0:
                return data - start
            data += n
        pos = hole
    if end > start:
        os.ftruncate(dst_fd, dst_start + end - start)  # the hole at the end, if there is one
    return max(end - start, 0)


def write_or_skip(fd: int, data: bytes | memoryview) -> bool:
    """Write `data` at `fd`'s offset, or, when it is a run of zeros of a block or more, move the
    offset past it and write nothing: a hole (as `cp --sparse=auto` makes them). Whoever writes
    a file this way ends it with `ftruncate(fd, size)`, since a hole at the end has no bytes to
    set the size. A zero run is told by its ends first, so a chunk of data costs two byte reads.
    Returns whether it made a hole."""
    view = memoryview(data).cast("B")
    n = len(view)
    if n >= _BLOCK and not view[0] and not view[-1]:
        whole = data if isinstance(data, bytes) else view.tobytes()
        if whole.count(0) == n:
            os.lseek(fd, n, os.SEEK_CUR)
            return True
    while view:
        view = view[os.write(fd, view) :]
    return False


def clone_or_copy(
    src: StrPath,
    dst: StrPath,
    *,
    mode: int | None = None,
    allow_copy: bool = True,
) -> LinkMode:
    """Create `dst` as a reflink of regular file `src`, else as a copy; return which.

    `mode` is the new file's permission bits (default: the source's); it is applied exactly,
    whatever the umask. Raises VeloError(FALLBACK_FORBIDDEN) when only a copy is possible and
    `allow_copy` is False, and FileExistsError when `dst` exists.
    """
    try:  # (O_NONBLOCK: a FIFO in the source's place is refused, never waited on)
        src_fd = files.open_regular(src)
    except files.NotRegular:
        raise VeloError(
            f"not a regular file: {os.fspath(src)}",
            reason=Reason.SPECIAL_FILE,
            path=os.fspath(src),
        ) from None
    try:
        st = os.fstat(src_fd)
        perms = stat.S_IMODE(st.st_mode) if mode is None else mode
        dst_flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        dst_fd = os.open(dst, dst_flags, 0o600)
        try:
            used = _fill(src_fd, dst_fd, src, dst, allow_copy=allow_copy)
            os.fchmod(dst_fd, perms)
        except BaseException:
            os.close(dst_fd)
            with contextlib.suppress(OSError):
                os.unlink(dst)
            raise
        os.close(dst_fd)
        return used
    finally:
        os.close(src_fd)


def _fill(src_fd: int, dst_fd: int, src: StrPath, dst: StrPath, *, allow_copy: bool) -> LinkMode:
    try:
        _libc.ficlone(dst_fd, src_fd)
        return LinkMode.REFLINK
    except SysError as exc:
        if exc.errno not in _NO_REFLINK:
            raise SysError(exc.errno or errno.EIO, exc.syscall, src, dst) from None
        why = f"{exc.syscall}: {errno.errorcode.get(exc.errno or 0, exc.errno)}"
    if not allow_copy:
        raise VeloError(
            f"cannot reflink '{os.fspath(src)}' to '{os.fspath(dst)}' ({why}) and copying is "
            "not allowed",
            reason=Reason.FALLBACK_FORBIDDEN,
            path=os.fspath(dst),
        )
    copy_bytes(src_fd, dst_fd)
    return LinkMode.COPY


def hardlink_or_copy(src: StrPath, dst: StrPath, *, allow_copy: bool = True) -> LinkMode:
    """Hard-link `src` as `dst`; on EMLINK/EXDEV/EPERM fall back to `clone_or_copy`."""
    try:
        os.link(src, dst, follow_symlinks=False)
        return LinkMode.HARDLINK
    except OSError as exc:
        if exc.errno not in _NO_HARDLINK:
            raise
    return clone_or_copy(src, dst, allow_copy=allow_copy)
