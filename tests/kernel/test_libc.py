"""The ctypes layer: errors carry errno/call/path, wrappers reach the real syscalls."""

from __future__ import annotations

import errno
import os
import pathlib
import re
from collections.abc import Iterator

import pytest

from tests.helpers.unpriv import mount_lines, run_in_userns, run_unprivileged
from veloverlay import _libc, mount, ns
from veloverlay.errors import SysError

PKG = pathlib.Path(__file__).resolve().parents[2] / "veloverlay"


@pytest.fixture(autouse=True)
def _no_leaked_mounts() -> Iterator[None]:
    before = mount_lines()
    yield
    assert mount_lines() == before


def test_check_passes_non_negative_results_through() -> None:
    assert _libc.check(0, "x") == 0
    assert _libc.check(7, "x") == 7


def test_syserror_carries_errno_syscall_and_paths(tmp_path: pathlib.Path) -> None:
    missing = tmp_path / "missing"
    with pytest.raises(SysError) as info:
        _libc.umount2(missing)
    err = info.value
    assert isinstance(err, OSError)
    assert err.errno == errno.ENOENT
    assert err.syscall == "umount2"
    assert err.filename == os.fspath(missing)
    assert "umount2" in str(err) and "ENOENT" in str(err)


def _umount_plain_dir(path: str) -> None:
    _libc.umount2(path)


@pytest.mark.needs("userns")
def test_check_reads_errno_of_the_failed_call(tmp_path: pathlib.Path) -> None:
    # a plain directory is not a mount point: EINVAL, not a stale errno from earlier calls
    with pytest.raises(SysError) as info:
        run_in_userns(_umount_plain_dir, "/proc/self/fd", privileged=False)
    assert info.value.errno == errno.EINVAL


def _fsopen(name: str) -> None:
    os.close(_libc.fsopen(name))


@pytest.mark.needs("userns")
def test_fsopen_unknown_fs_names_it() -> None:
    with pytest.raises(SysError) as info:
        run_in_userns(_fsopen, "no-such-fs-xyz", privileged=False)
    assert info.value.errno == errno.ENODEV
    assert info.value.filename == "no-such-fs-xyz"


def _fsconfig_bad_key() -> tuple[int, str | None]:
    fd = _libc.fsopen("tmpfs")
    try:
        try:
            _libc.fsconfig(fd, _libc.FSCONFIG_SET_STRING, "no-such-key", "1")
        except SysError as exc:
            failed = (exc.errno or 0, exc.filename)
        else:
            raise AssertionError("fsconfig accepted an unknown key")
        # the context stays usable after a rejected parameter
        _libc.fsconfig(fd, _libc.FSCONFIG_SET_STRING, "size", "1m")
        return failed
    finally:
        os.close(fd)


@pytest.mark.needs("userns")
def test_fsconfig_error_names_key_and_value() -> None:
    assert run_in_userns(_fsconfig_bad_key, privileged=False) == (errno.EINVAL, "no-such-key=1")


def test_unshare_eperm_carries_the_canned_hint() -> None:
    def try_mount_ns() -> None:
        # an unprivileged process may not create a mount namespace without a user namespace
        _libc.unshare(_libc.CLONE_NEWNS)

    with pytest.raises(SysError) as info:
        run_unprivileged(try_mount_ns)
    assert info.value.errno == errno.EPERM
    assert info.value.syscall == "unshare"
    assert info.value.hint and "user namespaces" in info.value.hint


def test_openat2_resolve_beneath(tmp_path: pathlib.Path) -> None:
    (tmp_path / "inner").write_text("x")
    (tmp_path / "escape").symlink_to("/etc/passwd")
    dfd = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)
    try:
        fd = _libc.openat2(dfd, "inner", os.O_RDONLY | os.O_CLOEXEC, 0, _libc.RESOLVE_BENEATH)
        assert os.read(fd, 10) == b"x"
        os.close(fd)
        for path in ("../etc/passwd", "escape", "/etc/passwd"):
            with pytest.raises(SysError) as info:
                _libc.openat2(dfd, path, os.O_RDONLY, 0, _libc.RESOLVE_BENEATH)
            assert info.value.errno == errno.EXDEV
            assert info.value.syscall == "openat2"
    finally:
        os.close(dfd)


def test_syncfs(tmp_path: pathlib.Path) -> None:
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        _libc.syncfs(fd)
    finally:
        os.close(fd)
    with pytest.raises(SysError) as info:
        _libc.syncfs(-1)
    assert info.value.errno == errno.EBADF


def _kernel() -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", os.uname().release)
    assert m is not None, os.uname().release
    return int(m.group(1)), int(m.group(2))


def test_getflags_and_ficlone_on_tmpfs() -> None:
    path = "/dev/shm/velo-libc-test"
    with open(path, "wb") as f:
        f.write(b"data")
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            if _kernel() >= (6, 0):
                assert _libc.ioctl_getflags(fd) & _libc.FS_IMMUTABLE_FL == 0
            else:  # tmpfs has inode flags from Linux 6.0 on
                with pytest.raises(SysError) as no_flags:
                    _libc.ioctl_getflags(fd)
                assert no_flags.value.errno == errno.ENOTTY
                assert no_flags.value.syscall == "ioctl(FS_IOC_GETFLAGS)"
            dst = os.open(path + ".clone", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                with pytest.raises(SysError) as info:
                    _libc.ficlone(dst, fd)  # tmpfs has no reflink
                assert info.value.errno in (errno.EOPNOTSUPP, errno.EXDEV, errno.EINVAL)
                assert info.value.syscall == "ioctl(FICLONE)"
            finally:
                os.close(dst)
        finally:
            os.close(fd)
    finally:
        for p in (path, path + ".clone"):
            if os.path.exists(p):
                os.unlink(p)


def test_statfs_type() -> None:
    assert _libc.statfs_type("/dev/shm") == _libc.TMPFS_MAGIC
    assert _libc.statfs_type("/proc") == 0x9FA0  # PROC_SUPER_MAGIC
    with pytest.raises(SysError) as info:
        _libc.statfs_type("/nonexistent-velo-path")
    assert info.value.errno == errno.ENOENT


def test_kernel_constants_match_the_headers() -> None:
    # values from <linux/fs.h>, <linux/mount.h>, <linux/sched.h> for 64-bit Linux
    assert _libc.FS_IOC_GETFLAGS == 0x80086601
    assert _libc.FS_IOC_SETFLAGS == 0x40086602
    assert _libc.FICLONE == 0x40049409
    assert _libc.CLONE_NEWUSER == 0x10000000
    assert _libc.FSCONFIG_SET_FD == 5 and _libc.FSCONFIG_CMD_CREATE == 6
    assert _libc.MOVE_MOUNT_F_EMPTY_PATH == 4
    assert _libc.mount_attr.__dict__["_fields_"][0][0] == "attr_set"
    assert _libc.fsverity_enable_arg().__class__.__name__ == "fsverity_enable_arg"
    import ctypes  # the test may; the package may not (see below)

    assert ctypes.sizeof(_libc.mount_attr) == _libc.MOUNT_ATTR_SIZE_VER0
    assert ctypes.sizeof(_libc.open_how) == 24
    assert ctypes.sizeof(_libc.fsverity_enable_arg) == 128


def test_only_libc_imports_ctypes() -> None:
    offenders = [
        p.name
        for p in PKG.glob("*.py")
        if p.name != "_libc.py"
        and re.search(r"^\s*(import ctypes|from ctypes)", p.read_text(), re.MULTILINE)
    ]
    assert offenders == []


def _link_tmpfile(base: str, by_proc: bool) -> tuple[bool, bool, bytes]:
    """In a child: name an O_TMPFILE into a removed directory, then into a live one."""
    _libc._link_by_proc = by_proc
    live, gone = os.path.join(base, "live"), os.path.join(base, "gone")
    os.mkdir(live)
    os.mkdir(gone)
    fd = os.open(base, os.O_TMPFILE | os.O_RDWR, 0o600)
    os.write(fd, b"named")
    gone_fd = os.open(gone, os.O_RDONLY | os.O_DIRECTORY)
    os.rmdir(gone)
    live_fd = os.open(live, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            _libc.link_fd(fd, gone_fd, b"x")
            failed = False
        except SysError as exc:
            failed = exc.errno == errno.ENOENT
        switched = _libc._link_by_proc
        _libc.link_fd(fd, live_fd, b"x")
        with open(os.path.join(live, "x"), "rb") as f:
            return failed, switched, f.read()
    finally:
        for d in (fd, gone_fd, live_fd):
            os.close(d)


@pytest.mark.parametrize("by_proc", [False, True], ids=["empty-path", "proc"])
def test_link_fd_names_an_open_file_and_a_removed_directory_is_not_a_refusal(
    tmp_path: pathlib.Path, by_proc: bool
) -> None:
    # ENOENT from linkat(AT_EMPTY_PATH) is also what a directory removed meanwhile (gc took an
    # empty shard) gives: that must not switch the process to /proc links for good.
    from veloverlay import ns

    failed, switched, data = ns.run_in_child(_link_tmpfile, os.fspath(tmp_path), by_proc)
    assert failed and data == b"named"
    assert switched is by_proc


def _xattrs_at(d: str, proc: bool, old_kernel: bool) -> list[object]:
    """What getxattr_at/listxattr_at give for each case, in a forked child (mount namespace
    without /proc unless `proc`; as a kernel without getxattrat if `old_kernel`): a value, a
    list, or the errno raised with the name it carried."""
    if not proc:
        ns.enter_mountns()
        mount.make_rprivate("/")
        mount.umount("/proc")
    _libc._getxattrat_missing = old_kernel
    dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    out: list[object] = []
    for call in (
        lambda: _libc.getxattr_at(dfd, b"f", "user.small"),
        lambda: _libc.getxattr_at(dfd, b"f", "user.big"),
        lambda: sorted(_libc.listxattr_at(dfd, b"f")),
        lambda: _libc.listxattr_at(dfd, b"link"),
        lambda: _libc.getxattr_at(dfd, b"link", "user.small"),
        lambda: _libc.getxattr_at(dfd, b"f", "user.none"),
        lambda: _libc.getxattr_at(dfd, b"gone", "user.small"),
    ):
        try:
            out.append(call())
        except OSError as exc:
            out.append((exc.errno, os.fsencode(exc.filename).rsplit(b"/", 1)[-1]))
    os.close(dfd)
    return out


@pytest.mark.needs("root")
@pytest.mark.parametrize(
    "proc, old_kernel",
    [(True, False), (False, False), (False, True)],
    ids=["proc", "getxattrat", "neither"],
)
def test_getxattr_at_reads_by_the_directory_and_never_follows(
    shm_tmp: str, proc: bool, old_kernel: bool
) -> None:
    """The xattrs of a name in a directory held by descriptor (by /proc, or getxattrat where
    /proc is not mounted), compared with what os.getxattr reads by path: a symlink is never
    followed, a missing attribute is ENODATA and a missing name ENOENT, with the name. Without
    /proc before Linux 6.13 every name reads as missing (the callers fall back)."""
    d = os.path.join(shm_tmp, "d")
    os.mkdir(d)
    f = os.path.join(d, "f")
    open(f, "wb").close()
    big = bytes(range(256)) * 20  # past the first buffer (256 bytes): read again, whole
    os.setxattr(f, "user.small", b"v")
    os.setxattr(f, "user.big", big)
    os.symlink("f", os.path.join(d, "link"))
    got = ns.run_in_child(_xattrs_at, d, proc, old_kernel)
    if old_kernel:
        assert got == [
            (errno.ENOENT, n) for n in (b"f", b"f", b"f", b"link", b"link", b"f", b"gone")
        ]
        return
    if got[0] == (errno.ENOENT, b"f"):
        pytest.skip("this kernel has no getxattrat (Linux 6.13)")
    assert got == [
        os.getxattr(f, "user.small"),
        os.getxattr(f, "user.big"),
        sorted(os.listxattr(f)),
        [],
        (errno.ENODATA, b"link"),
        (errno.ENODATA, b"f"),
        (errno.ENOENT, b"gone"),
    ]
