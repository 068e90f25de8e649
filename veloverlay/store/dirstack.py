"""The open directories of a depth-first walk, at most a quarter of the open-files limit of them
at once (as the lower-layer build keeps: `lower/layers.py`).

A walk that holds one descriptor per level (checkout, harvest) cannot go deeper than
RLIMIT_NOFILE allows: under `ulimit -n 64` a tree of ~55 levels, which ingest stores under the
same limit, failed with a bare EMFILE. `DirStack` keeps the levels of the walk; past its budget
it closes the shallowest open ones, and opens a level again, by name from the nearest open one
below it and never through a symbolic link, when the walk comes back to it. A level opened
again must be the very directory it was (device and inode), else `TreeChanged`.
"""

from __future__ import annotations

import errno
import os
import resource

from veloverlay.files import DIRFLAGS, TreeChanged

__all__ = ["DirStack", "open_dirs_max"]

_MAX_OPEN_DIRS = 64


def open_dirs_max() -> int:
    """How many directories a walk keeps open: 64, or a quarter of the open-files limit where
    that is lower (the rest is for the files it reads and writes, and its caller's)."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        return _MAX_OPEN_DIRS
    return max(2, min(_MAX_OPEN_DIRS, soft // 4))


class DirStack:
    """The directories from `root` (a descriptor the caller keeps and closes: never closed here)
    down to the one the walk is in. `push` takes over a descriptor of a child of the current
    level; `fd()` is the current level's descriptor, valid until the next `push` or `pop`;
    `pop` closes the current level."""

    def __init__(self, root: int, budget: int | None = None) -> None:
        self.budget = budget if budget is not None else open_dirs_max()
        self._fds = [root]  # -1: a level closed to stay within the budget
        self._names = [b""]
        self._ids = [(0, 0)]
        self._open = 0  # open levels above the root

    def __len__(self) -> int:
        return len(self._fds) - 1

    def push(self, fd: int, name: bytes) -> None:
        """Enter the child `name` of the current level, opened as `fd` (taken over)."""
        try:
            st = os.fstat(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fds.append(fd)
        self._names.append(name)
        self._ids.append((st.st_dev, st.st_ino))
        self._open += 1
        level = 1
        while self._open > self.budget and level < len(self._fds) - 1:
            if self._fds[level] >= 0:  # the shallowest open one goes first
                os.close(self._fds[level])
                self._fds[level] = -1
                self._open -= 1
            level += 1

    def fd(self) -> int:
        """The current level's descriptor, opened again if it was closed."""
        top = len(self._fds) - 1
        if self._fds[top] < 0:
            self._reopen(top)
        return self._fds[top]

    def pop(self) -> None:
        """Leave the current level (closing it)."""
        if len(self._fds) == 1:
            raise IndexError("the root is not popped")
        fd = self._fds.pop()
        self._names.pop()
        self._ids.pop()
        if fd >= 0:
            self._open -= 1
            os.close(fd)

    def close(self) -> None:
        """Close every level (not the root)."""
        while len(self._fds) > 1:
            self.pop()

    def _reopen(self, level: int) -> None:
        base = level - 1
        while self._fds[base] < 0:
            base -= 1
        fd = self._fds[base]
        for at in range(base + 1, level + 1):
            try:
                nfd = os.open(self._names[at], DIRFLAGS, dir_fd=fd)
            finally:
                if at - 1 > base:  # (a level in between: opened only to look up the next)
                    os.close(fd)
            st = os.fstat(nfd)
            if (st.st_dev, st.st_ino) != self._ids[at]:
                os.close(nfd)
                raise TreeChanged(errno.ESTALE, "replaced during the walk", self._names[at])
            fd = nfd
        self._fds[level] = fd
        self._open += 1
        if self._open > self.budget:  # (the level just below: the next to be opened again)
            for below in range(1, level):
                if self._fds[below] >= 0:
                    os.close(self._fds[below])
                    self._fds[below] = -1
                    self._open -= 1
                    break
