"""Small filesystem helpers every layer uses: remove a tree whatever its modes, write JSON
atomically, hold an exclusive flock.

A leaf: imports only the standard library.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
from collections.abc import Iterator
from pathlib import Path

__all__ = ["DIRFLAGS", "NEWFILE", "force_rmtree", "write_json_atomic", "flock"]

# Open a directory we walk or write into without following a symlink; create a file exclusively.
DIRFLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
NEWFILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


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
                os.chmod(sub, 0o700)  # overlay leaves work/work at 000
            os.rmdir(sub)
        os.rmdir(p)
        return True
    except OSError:
        return False


def force_rmtree(path: str | os.PathLike[str]) -> None:
    """Remove a tree we own whatever its modes (0555/000 dirs, overlay's work/work)."""
    p = os.fspath(path)
    if not os.path.lexists(p):
        return
    if _rmdir_shallow(p):
        return
    import shutil  # here: a session's usual upper and work dirs go without it (start-up time)

    retried: set[str] = set()

    def onerror(_fn: object, failed: str, exc: object) -> None:
        # Open the path (and its parent) up and try once more; the same failure again is final.
        # Without that limit an unremovable entry (+i) recursed without end on Python >= 3.13,
        # whose rmtree reports this handler's own failure as a failure of the parent directory.
        if failed in retried:
            err = exc[1] if isinstance(exc, tuple) else exc
            if isinstance(err, BaseException):
                raise err
            raise OSError(errno.EPERM, "cannot remove", failed)
        retried.add(failed)
        for target in (os.path.dirname(failed), failed):
            with contextlib.suppress(OSError):
                if not os.path.islink(target):
                    os.chmod(target, 0o700)
        with contextlib.suppress(FileNotFoundError):
            if os.path.isdir(failed) and not os.path.islink(failed):
                shutil.rmtree(failed, onerror=onerror)
            else:
                os.unlink(failed)

    if os.path.isdir(p) and not os.path.islink(p):
        with contextlib.suppress(OSError):
            os.chmod(p, 0o700)
        for root, dirs, _files in os.walk(p):
            for d in dirs:
                full = os.path.join(root, d)
                with contextlib.suppress(OSError):
                    if not os.path.islink(full):
                        os.chmod(full, 0o700)
        shutil.rmtree(p, onerror=onerror)
    else:
        os.unlink(p)


@contextlib.contextmanager
def flock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def write_json_atomic(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}")
    tmp.write_text(json.dumps(data, sort_keys=True))
    os.rename(tmp, path)
