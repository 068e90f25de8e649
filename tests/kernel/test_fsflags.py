"""FS_IMMUTABLE_FL through FS_IOC_GETFLAGS/SETFLAGS: effects, errors and their hints."""

from __future__ import annotations

import errno
import os
import pathlib
from collections.abc import Iterator

import pytest

from tests.helpers.unpriv import (
    UNPRIV_GID,
    UNPRIV_UID,
    mount_lines,
    run_unprivileged,
    unpriv_tmpdir,
)
from veloverlay import fsflags, ns
from veloverlay.errors import SysError


@pytest.fixture(autouse=True)
def _no_leaked_mounts() -> Iterator[None]:
    before = mount_lines()
    yield
    assert mount_lines() == before


@pytest.fixture
def victim(tmp_path: pathlib.Path) -> Iterator[pathlib.Path]:
    path = tmp_path / "victim"
    path.write_bytes(b"original")
    yield path
    # teardown clears +i whatever the test did, or pytest could never delete tmp_path
    for p in (path, tmp_path / "dir"):
        if p.exists() and fsflags.is_immutable(p):
            fsflags.set_immutable(p, False)


@pytest.mark.needs("chattr")
def test_immutable_file_cannot_be_written_or_unlinked(victim: pathlib.Path) -> None:
    fsflags.set_immutable(victim, True)
    assert fsflags.is_immutable(victim)
    assert fsflags.get_flags(victim) & fsflags.FS_IMMUTABLE_FL
    for attempt in (
        lambda: open(victim, "ab"),
        lambda: os.unlink(victim),
        lambda: os.rename(victim, victim.with_name("moved")),
        lambda: os.chmod(victim, 0o600),
        lambda: os.link(victim, victim.with_name("link")),
    ):
        with pytest.raises(PermissionError):
            attempt()
    assert victim.read_bytes() == b"original"  # reading still works
    fsflags.set_immutable(victim, True)  # idempotent
    fsflags.set_immutable(victim, False)
    assert not fsflags.is_immutable(victim)
    victim.write_bytes(b"changed")
    victim.unlink()


@pytest.mark.needs("chattr")
def test_immutable_directory_refuses_new_entries(tmp_path: pathlib.Path) -> None:
    d = tmp_path / "dir"
    d.mkdir()
    fsflags.set_immutable(d, True)
    try:
        with pytest.raises(PermissionError):
            (d / "new").write_bytes(b"x")
    finally:
        fsflags.set_immutable(d, False)
    (d / "new").write_bytes(b"x")


def test_symlinks_are_not_followed(tmp_path: pathlib.Path, victim: pathlib.Path) -> None:
    link = tmp_path / "link"
    link.symlink_to(victim)
    with pytest.raises(OSError) as info:
        fsflags.set_immutable(link, True)
    assert info.value.errno == errno.ELOOP
    assert not fsflags.is_immutable(victim)


def test_unsupported_filesystem_raises_syserror() -> None:
    with pytest.raises(SysError) as info:
        fsflags.get_flags("/proc/self/status")
    assert info.value.errno in (errno.ENOTTY, errno.EOPNOTSUPP)
    assert info.value.syscall == "ioctl(FS_IOC_GETFLAGS)"
    assert info.value.filename == "/proc/self/status"


def _try_immutable(path: str, *, in_userns: bool) -> None:
    if in_userns:
        ns.enter_userns(map_root=True)
    fsflags.set_immutable(path, True)


@pytest.mark.parametrize("in_userns", [False, True], ids=["plain", "userns-root"])
def test_eperm_without_cap_linux_immutable_carries_the_hint(in_userns: bool) -> None:
    with unpriv_tmpdir() as base:
        own = os.path.join(base, "own")
        with open(own, "wb"):
            pass
        os.chown(own, UNPRIV_UID, UNPRIV_GID)  # the uid owns the file, yet may not set +i
        with pytest.raises(SysError) as info:
            run_unprivileged(_try_immutable, own, in_userns=in_userns)
        assert info.value.errno == errno.EPERM
        assert info.value.syscall == "ioctl(FS_IOC_SETFLAGS)"
        assert info.value.filename == own
        assert info.value.hint and "CAP_LINUX_IMMUTABLE" in info.value.hint
        assert not fsflags.is_immutable(own)
