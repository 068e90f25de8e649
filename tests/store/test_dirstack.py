"""DirStack: a walk's open directories, within a budget; a level closed to stay within it is
opened again by name, never through a symbolic link, and only if it is the same directory."""

from __future__ import annotations

import errno
import os

import pytest

from veloverlay.files import DIRFLAGS, TreeChanged
from veloverlay.store.dirstack import DirStack


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _walk_down(root: int, levels: int, budget: int) -> DirStack:
    dirs = DirStack(root, budget)
    for i in range(levels):
        dirs.push(os.open(f"d{i}", DIRFLAGS, dir_fd=dirs.fd()), f"d{i}".encode())
    return dirs


def test_levels_come_back_as_the_same_directories(shm_tmp: str) -> None:
    os.makedirs(os.path.join(shm_tmp, *[f"d{i}" for i in range(10)]))
    root = os.open(shm_tmp, DIRFLAGS)
    before = _open_fds()
    try:
        dirs = _walk_down(root, 10, 3)
        assert _open_fds() - before == 3  # the budget, not one per level
        for i in reversed(range(10)):
            want = os.stat(os.path.join(shm_tmp, *[f"d{j}" for j in range(i + 1)]))
            got = os.fstat(dirs.fd())
            assert (got.st_dev, got.st_ino) == (want.st_dev, want.st_ino)
            assert _open_fds() - before <= 3
            dirs.pop()
        assert _open_fds() == before
    finally:
        os.close(root)


@pytest.mark.parametrize("planted", ["symlink", "directory"])
def test_a_level_replaced_meanwhile_is_refused(shm_tmp: str, planted: str) -> None:
    top = os.path.join(shm_tmp, "t")
    os.makedirs(os.path.join(top, *[f"d{i}" for i in range(6)]))
    os.makedirs(os.path.join(shm_tmp, "elsewhere", "d2", "d3", "d4", "d5"))
    root = os.open(top, DIRFLAGS)
    try:
        dirs = _walk_down(root, 6, 2)  # d0..d3 are closed now
        os.rename(os.path.join(top, "d0", "d1"), os.path.join(shm_tmp, "moved"))
        if planted == "symlink":
            os.symlink(os.path.join(shm_tmp, "elsewhere"), os.path.join(top, "d0", "d1"))
        else:
            os.rename(os.path.join(shm_tmp, "elsewhere"), os.path.join(top, "d0", "d1"))
        dirs.pop()
        dirs.pop()  # back to d3: opened again through d0/d1, which is not what it was
        with pytest.raises(OSError) as ei:
            dirs.fd()
        if planted == "symlink":  # never followed
            assert ei.value.errno in (errno.ELOOP, errno.ENOTDIR), ei.value
        else:  # another directory under the name
            assert isinstance(ei.value, TreeChanged), ei.value
        dirs.close()
    finally:
        os.close(root)
