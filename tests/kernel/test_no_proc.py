"""Reading an xattr of a name in a directory descriptor without /proc (a mount namespace that
has none). Python has no getxattrat: posixacl.mode_at (harvest, the shim's tree sync) and the
overlay harvest's whiteout test go through /proc/self/fd/N/name. Without /proc that lookup fails
with ENOENT, which was taken for "no such xattr": an ACL's mask, shown as the group bits, was
stored as what the owning group may do, and a whiteout file was harvested as an empty file.
The xattr must be read another way, or (an ACL) the group get nothing.
"""

from __future__ import annotations

import os
import stat

import pytest

from tests.helpers.unpriv import UNPRIV_GID, UNPRIV_UID
from tests.ingest.test_acl import secret_acl
from veloverlay import _libc, mount, ns, posixacl
from veloverlay.session.overlay.harvest import is_whiteout


def _modes(
    d: str, names: list[str], proc: bool, unprivileged: bool, old_kernel: bool = True
) -> list[int]:
    """mode_at of each name in `d` (lstat's mode; 0640 for one not there), in a forked child: in
    its own mount namespace without /proc unless `proc`, as UNPRIV_UID if `unprivileged`, as on
    a kernel without getxattrat (before 6.13) if `old_kernel`."""
    _libc._getxattrat_missing = old_kernel or _libc._getxattrat_missing
    if not proc:
        ns.enter_mountns()
        mount.make_rprivate("/")
        mount.umount("/proc")
        assert not os.path.exists("/proc/self/fd")
    if unprivileged:
        ns.drop_to_user(UNPRIV_UID, UNPRIV_GID)
    dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        out = []
        for n in names:
            try:
                perm = stat.S_IMODE(os.lstat(n, dir_fd=dfd).st_mode)
            except FileNotFoundError:
                perm = 0o640
            out.append(posixacl.mode_at(dfd, os.fsencode(n), perm))
        return out
    finally:
        os.close(dfd)


@pytest.mark.needs("root")
def test_mode_at_reads_the_acl_without_proc(shm_tmp: str) -> None:
    d = os.path.join(shm_tmp, "d")
    os.mkdir(d)
    for n in ("secret", "team", "plain"):
        with open(os.path.join(d, n), "wb") as f:
            f.write(b"x")
        os.chmod(os.path.join(d, n), 0o640)
    os.mkdir(os.path.join(d, "sub"), 0o750)
    os.chmod(os.path.join(d, "sub"), 0o750)
    os.setxattr(os.path.join(d, "secret"), posixacl.ACCESS, secret_acl(6, 0, 0))  # group::---
    os.setxattr(os.path.join(d, "team"), posixacl.ACCESS, secret_acl(6, 4, 0))  # group::r--
    os.setxattr(os.path.join(d, "sub"), posixacl.ACCESS, secret_acl(7, 0, 0))
    os.symlink("secret", os.path.join(d, "link"))
    names = ["secret", "team", "plain", "sub", "link", "gone"]
    # What the kernel's ACL gives the owning group, as read with /proc (the stat shows 0640,
    # 0640, 0640, 0740: the masks).
    with_proc = ns.run_in_child(_modes, d, names, True, False)
    assert with_proc == [0o600, 0o640, 0o640, 0o700, 0o777, 0o640]
    assert ns.run_in_child(_modes, d, names, False, False) == with_proc
    # A user who may not open the files (0640, root's) cannot tell without /proc whether they
    # have an ACL: the group gets nothing (with /proc that user reads `team`'s group::r--).
    os.chmod(shm_tmp, 0o755)
    os.chmod(d, 0o755)
    three = ["secret", "team", "plain"]
    assert ns.run_in_child(_modes, d, three, True, True) == [0o600, 0o640, 0o640]
    assert ns.run_in_child(_modes, d, three, False, True) == [0o600, 0o600, 0o600]
    # getxattrat (Linux 6.13) reads them by the directory's descriptor: no /proc, no open.
    if not _has_getxattrat(d):
        pytest.skip("this kernel has no getxattrat (Linux 6.13): the fallbacks were tested")
    assert ns.run_in_child(_modes, d, names, False, False, False) == with_proc
    assert ns.run_in_child(_modes, d, three, False, True, False) == [0o600, 0o640, 0o640]


def _has_getxattrat(d: str) -> bool:
    dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        _libc.getxattr_at(dfd, b"secret", posixacl.ACCESS)  # the syscall, once: ENOSYS or not
    finally:
        os.close(dfd)
    return not _libc._getxattrat_missing


def _whiteouts(d: str, names: list[str], proc: bool, old_kernel: bool = True) -> list[bool]:
    _libc._getxattrat_missing = old_kernel or _libc._getxattrat_missing
    if not proc:
        ns.enter_mountns()
        mount.make_rprivate("/")
        mount.umount("/proc")
    dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return [is_whiteout(os.lstat(n, dir_fd=dfd), dfd, os.fsencode(n), "user") for n in names]
    finally:
        os.close(dfd)


@pytest.mark.needs("root")
def test_a_whiteout_file_is_one_without_proc(shm_tmp: str) -> None:
    """The same lookup tells harvest a whiteout file (zero-size, `user.overlay.whiteout`) from
    an empty file: without /proc a deletion must not be harvested as an empty file."""
    d = os.path.join(shm_tmp, "d")
    os.mkdir(d)
    for n in ("wh", "empty"):
        open(os.path.join(d, n), "wb").close()
    os.setxattr(os.path.join(d, "wh"), "user.overlay.whiteout", b"y")
    names = ["wh", "empty"]
    assert ns.run_in_child(_whiteouts, d, names, True) == [True, False]
    assert ns.run_in_child(_whiteouts, d, names, False) == [True, False]
    assert ns.run_in_child(_whiteouts, d, names, False, False) == [True, False]
