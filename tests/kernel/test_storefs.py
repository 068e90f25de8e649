"""The filesystem checks of one path (storefs): where a store may live, which xattrs it holds;
and mountinfo's fstype lookup they use."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from veloverlay import _libc, mountinfo, storefs


def test_store_fs_local_is_fine(tmp_path: os.PathLike[str]) -> None:
    assert storefs.store_fs_check(tmp_path).ok
    not_yet = os.path.join(os.fspath(tmp_path), "store", "deeper")  # need not exist yet
    feature = storefs.store_fs_check(not_yet)
    assert feature.ok and feature.reason


def test_store_fs_refuses_nfs_by_magic(
    tmp_path: os.PathLike[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_libc, "statfs_type", lambda _p: _libc.NFS_SUPER_MAGIC)
    feature = storefs.store_fs_check(tmp_path)
    assert not feature.ok and "nfs" in feature.reason


def test_store_fs_refuses_network_mounts_by_mountinfo(
    tmp_path: os.PathLike[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(mountinfo, "fstype_at", lambda _p: "cifs")
    feature = storefs.store_fs_check(tmp_path)
    assert not feature.ok and "cifs" in feature.reason


def test_fstype_at_finds_the_longest_mount_point() -> None:
    assert mountinfo.fstype_at("/dev/shm/x") == "tmpfs"
    assert mountinfo.fstype_at("/proc/self") == "proc"


def test_user_xattrs_probe_and_refusal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert storefs.user_xattrs(str(tmp_path)).ok
    assert not os.listdir(tmp_path), "the probe left its file behind"

    def refuse(*_a: object, **_k: object) -> None:
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(os, "setxattr", refuse)
    f = storefs.user_xattrs(str(tmp_path))
    assert not f.ok and "ENOTSUP" in f.reason  # errno.EOPNOTSUPP == ENOTSUP on Linux
