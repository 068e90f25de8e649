"""The file an export writes a bundle into before renaming it over its name (`NAME.part`):
made new, locked for the export's life, and a killed export's leftover replaced (bundle.py)."""

from __future__ import annotations

import fcntl
import os
import stat

from veloverlay.errors import Reason, VeloError

__all__ = ["MAGIC", "create_part", "sticky_kept"]

MAGIC = b"VELOBNDL"  # how a bundle starts (the format: bundle.py)


def sticky_kept(pfd: int, st: os.stat_result) -> bool:
    """Whether the file `st` in the directory `pfd` is another user's that the sticky bit keeps
    this process from renaming over (the rename would fail with EPERM after the whole bundle
    was written). Root (CAP_FOWNER) may."""
    me = os.geteuid()
    parent = os.fstat(pfd)
    return bool(
        me != 0 and st.st_uid != me and parent.st_mode & stat.S_ISVTX and parent.st_uid != me
    )


def create_part(pfd: int, tmp: str, output: str) -> int:
    """A new `tmp` (the bundle being written), held by an exclusive flock for the export's life.

    An existing `tmp` that is our own regular file and that no process holds is what a killed
    export left: it is removed and made anew, so the next export works. One held by a running
    export, or anything else (a symbolic link, another user's file), is refused and left alone.
    Who makes the file locks it and checks its name still leads to it: an export that took it
    for a leftover in between has removed it, and it is made again."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    for _ in range(5):
        try:
            fd = os.open(tmp, flags, 0o600, dir_fd=pfd)
        except FileExistsError:
            if not _remove_stale_part(pfd, tmp):
                raise VeloError(
                    f"{output}.part exists (another export is writing it, or it is not a file "
                    "a killed export of yours left)",
                    reason=Reason.EXISTS,
                    path=output + ".part",
                    hint="wait for that export, or remove the file if it is not one",
                ) from None
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.fstat(fd).st_ino == os.stat(tmp, dir_fd=pfd, follow_symlinks=False).st_ino:
                return fd
        except (BlockingIOError, FileNotFoundError):
            pass
        os.close(fd)
    raise VeloError(
        f"{output}.part keeps being made by other exports", reason=Reason.EXISTS, path=output
    )


def _remove_stale_part(pfd: int, tmp: str) -> bool:
    """Remove `tmp` when it is a killed export's leftover (see `create_part`): a regular file
    of ours that no export holds and that is empty or starts as a bundle does (a browser's
    `X.part` download is no leftover of ours)."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    try:
        fd = os.open(tmp, flags, dir_fd=pfd)
    except FileNotFoundError:
        return True  # gone meanwhile: make it
    except OSError:
        return False  # a symbolic link (ELOOP), unreadable
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            return False
        if not MAGIC.startswith(os.pread(fd, len(MAGIC), 0)[: len(MAGIC)]):
            return False  # not a bundle's start (nor empty): a file of the user's, kept
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # a running export holds it
        now = os.stat(tmp, dir_fd=pfd, follow_symlinks=False)
        if (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
            os.unlink(tmp, dir_fd=pfd)
        return True
    except FileNotFoundError:
        return True
    finally:
        os.close(fd)
