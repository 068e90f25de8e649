"""Line diffs of contents in git's unified format, for `diff -p` and `diff --stat`: of two
versions (verbs/repo.py) and of what a running session changed (session/live.py).

A side is a list of lines, or None when it is binary (a NUL in its first 8 KiB, or not UTF-8)
or larger than TEXT_LIMIT; a symlink's content is its target, a directory's and an absent
entry's is empty.
"""

from __future__ import annotations

import difflib
import os
import stat

from veloverlay.store.cas import Store
from veloverlay.store.tree import Entry, Kind

__all__ = ["TEXT_LIMIT", "entry_mode", "text_lines", "object_lines", "path_lines", "unified"]

TEXT_LIMIT = 8 << 20  # larger files are not diffed line by line (`patch` says binary)


def text_lines(data: bytes) -> list[str] | None:
    if b"\0" in data[:8192]:
        return None
    try:
        return data.decode().splitlines(keepends=True)
    except UnicodeDecodeError:
        return None


_KIND_MODE = {Kind.FILE: stat.S_IFREG, Kind.DIR: stat.S_IFDIR, Kind.SYMLINK: stat.S_IFLNK}


def entry_mode(e: Entry | None) -> int | None:
    """An entry's mode as `stat` gives it, type bits and all (what a patch header names: a new
    directory is not a new file); None for none, and for a MASK, which deletes a lower ref's
    path and has no mode or content of its own."""
    if e is None or e.kind is Kind.MASK:
        return None
    return _KIND_MODE[e.kind] | stat.S_IMODE(e.mode)


def _read(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def object_lines(store: Store, e: Entry | None) -> list[str] | None:
    """The lines of a manifest entry (its object's bytes)."""
    if e is None or e.kind in (Kind.DIR, Kind.MASK):
        return []
    if e.kind is Kind.SYMLINK:
        return [os.fsdecode(e.target)]
    if e.size > TEXT_LIMIT:
        return None
    fd = store.open_object(e.digest)
    try:
        return text_lines(_read(fd))
    finally:
        os.close(fd)


def path_lines(
    path: bytes, st: os.stat_result | None, dir_fd: int | None = None
) -> list[str] | None:
    """The lines of a file, symlink or directory on disk (`st`: its lstat; None: absent);
    `path` relative to `dir_fd` when given."""
    if st is None or stat.S_ISDIR(st.st_mode):
        return []
    if stat.S_ISLNK(st.st_mode):
        return [os.fsdecode(os.readlink(path, dir_fd=dir_fd))]
    if not stat.S_ISREG(st.st_mode) or st.st_size > TEXT_LIMIT:
        return None
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=dir_fd)
    try:
        return text_lines(_read(fd))
    finally:
        os.close(fd)


def unified(
    name: str,
    old: list[str] | None,
    new: list[str] | None,
    *,
    old_exists: bool,
    new_exists: bool,
    context: int = 3,
) -> list[str] | None:
    """git's unified diff of `old` to `new` (None when either side is binary)."""
    if old is None or new is None:
        return None
    return list(
        difflib.unified_diff(
            old,
            new,
            f"a/{name}" if old_exists else "/dev/null",
            f"b/{name}" if new_exists else "/dev/null",
            n=context,
        )
    )
