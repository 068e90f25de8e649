"""The C library's less common entry points: libc functions that change the tree through glibc's
internal calls (so past the hooks of the calls they make), compat symbols, AT_EMPTY_PATH forms,
and children made without glibc's fork. Each was found unjournaled (or writing through a shared
--link proxy) by trying it under the shim; the checks are against the directory itself.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from tests.shim.test_c_shim import Lab, _proxy_lab
from veloverlay.session.shim.library import Phase, RecType


@pytest.fixture
def lab(tmp_path: Path, shim_build: Path, try_syscall: Path) -> Lab:
    return Lab(tmp_path, shim_build / "libveloshim.so", try_syscall)


def test_remove_of_a_file_and_of_a_directory_is_journaled(lab: Lab) -> None:
    # glibc's remove() unlinks through its internal unlinkat: nothing was journaled
    out, recs = lab.run("remove", "a", "--", "remove", "sub")
    assert out == ["remove 0 0", "remove 0 0"]
    assert not (lab.proj / "a").exists() and not (lab.proj / "sub").exists()
    done = [(RecType(r.type), r.path1) for r in recs if r.phase == Phase.DONE and r.ret == 0]
    assert done == [(RecType.UNLINK, lab.p("a")), (RecType.RMDIR, lab.p("sub"))]


def test_remove_in_the_store_is_refused(lab: Lab) -> None:
    obj = lab.store / "objects-v1" / "obj"
    obj.write_bytes(b"object\n")
    out, recs = lab.run("remove", os.fspath(obj))
    assert out == ["remove -1 30"]  # EROFS, as unlink() says
    assert obj.read_bytes() == b"object\n"
    assert [r for r in recs if r.type == RecType.DENIED]


def test_lchmod_is_journaled(lab: Lab) -> None:
    # glibc's lchmod calls its internal fchmodat
    out, recs = lab.run("lchmod", "a")
    assert out == ["lchmod 0 0"]
    assert stat.S_IMODE((lab.proj / "a").stat().st_mode) == 0o600
    chmods = [(Phase(r.phase), r.path1) for r in recs if r.type == RecType.CHMOD]
    assert chmods == [(Phase.INTENT, lab.p("a")), (Phase.DONE, lab.p("a"))]


def test_xmknod_compat_entry_point_is_journaled(lab: Lab) -> None:
    # binaries built against glibc < 2.33 call __xmknod (mknod was a macro over it)
    out, recs = lab.run("xmknod", "ff")
    if out == ["xmknod -2 0"]:
        pytest.skip("this libc has no __xmknod")
    assert out == ["xmknod 0 0"]
    assert stat.S_ISFIFO((lab.proj / "ff").lstat().st_mode)
    mk = [(Phase(r.phase), r.path1) for r in recs if r.type == RecType.MKNOD]
    assert mk == [(Phase.INTENT, lab.p("ff")), (Phase.DONE, lab.p("ff"))]


def test_lchmod_breaks_a_proxy_first(lab: Lab) -> None:
    proxy = _proxy_lab(lab)
    mode = stat.S_IMODE(proxy.stat().st_mode)
    out, _recs = lab.run("lchmod", "p1")
    assert out == ["lchmod 0 0"]
    assert stat.S_IMODE(proxy.stat().st_mode) == mode != 0o600
    assert stat.S_IMODE((lab.proj / "p1").stat().st_mode) == 0o600
    assert (lab.proj / "p1").stat().st_ino != proxy.stat().st_ino
    assert (lab.proj / "p1").read_bytes() == b"shared\n"


# glibc >= 2.39's fchmodat passes AT_EMPTY_PATH on to fchmodat2; this host's glibc says EINVAL.
# A library preloaded after the shim stands in for the newer libc. Like glibc's, its call reaches
# the kernel past the shim's hook of syscall(3): libc's own syscall, found with RTLD_NEXT.
NEWER_FCHMODAT = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <sys/stat.h>
int fchmodat(int dirfd, const char *path, mode_t mode, int flags)
{
        long (*sys)(long, ...) = (long (*)(long, ...))dlsym(RTLD_NEXT, "syscall");
        return (int)sys(452 /* fchmodat2 */, dirfd, path, mode, flags);
}
"""


def test_fchmodat_empty_path_breaks_the_proxy_the_fd_holds(lab: Lab, tmp_path: Path) -> None:
    src = tmp_path / "newer.c"
    src.write_text(NEWER_FCHMODAT)
    newer = tmp_path / "libnewer.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", newer, src], check=True)
    proxy = _proxy_lab(lab)
    mode = stat.S_IMODE(proxy.stat().st_mode)
    lab.export()
    env = lab.env()
    env["LD_PRELOAD"] = f"{lab.lib} {newer}"
    proc = subprocess.run(
        [os.fspath(lab.exe), "fchmodat_empty", "p1"],
        env=env,
        cwd=lab.proj,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.stdout == "fchmodat_empty 0 0\n", proc
    assert stat.S_IMODE(proxy.stat().st_mode) == mode != 0o600  # the shared inode kept its mode
    assert stat.S_IMODE((lab.proj / "p1").stat().st_mode) == 0o600
    assert (lab.proj / "p1").stat().st_ino != proxy.stat().st_ino
    chmods = [r.path1 for r in lab.reader.read(final=True) if r.type == RecType.CHMOD]
    assert chmods == [lab.p("p1"), lab.p("p1")]  # the file, not "p1/"


def test_a_raw_clone_child_owns_its_fd_table(lab: Lab) -> None:
    # a child made by clone(2) without glibc's fork runs no atfork handler: it was taken for a
    # vfork child for its whole life, so its written fd was never marked and its close never
    # journaled
    out, recs = lab.run("rawclone_w", "cl")
    assert out == ["rawclone_w 0 0"]
    assert (lab.proj / "cl").read_bytes() == b"clone\n"
    parent = recs[0].pid
    opens = [r for r in recs if r.type == RecType.OPEN and r.phase == Phase.DONE]
    assert len(opens) == 1 and opens[0].pid != parent
    closes = [(r.pid, r.path1) for r in recs if r.type == RecType.CLOSE]
    assert closes == [(opens[0].pid, lab.p("cl"))]


def test_at_the_fd_limit_a_proxy_is_never_changed_in_place(lab: Lab) -> None:
    # With no fd free the shim could not open the target to name it: the text was all it had,
    # so it never saw the proxy, and chmod/truncate/utimes/setxattr (which need no fd) went
    # through the shared inode: every tree sharing it lost its bytes to a truncate
    proxy = _proxy_lab(lab)
    before = proxy.stat()
    (lab.proj / "sub" / "pl").symlink_to("../p1")
    ops = [("chmod", "p1"), ("truncate", "sub/pl"), ("utime", "sub/../p1"), ("setxattr", "p1")]
    out, _recs = lab.run("exhaust", *(w for op in ops for w in ("--", *op)), "--", "chmod", "a")
    # the break needs fds: EMFILE, as when a break fails; the others behave as before
    assert out[1:] == [f"{op} -1 24" for op, _ in ops] + ["chmod 0 0"]
    for path in (proxy, lab.proj / "p1"):
        st = path.stat()
        assert (st.st_ino, st.st_mode, st.st_size, st.st_mtime_ns) == (
            before.st_ino,
            before.st_mode,
            before.st_size,
            before.st_mtime_ns,
        )
        assert os.listxattr(path) == []
    assert proxy.read_bytes() == b"shared\n"
    assert stat.S_IMODE((lab.proj / "a").stat().st_mode) == 0o600


def test_at_the_fd_limit_the_store_is_still_refused(lab: Lab) -> None:
    # the same blindness let a chmod + truncate through a tier-1 symlink change a store object
    obj = lab.store / "objects-v1" / "obj"
    obj.write_bytes(b"object\n")
    obj.chmod(0o444)
    (lab.proj / "tier1").symlink_to(obj)
    (lab.proj / "sub" / "objs").symlink_to(os.path.relpath(obj.parent, lab.proj / "sub"))
    (lab.proj / "sub" / "t1").symlink_to("../tier1")
    ops = [("chmod", "tier1"), ("truncate", "sub/t1"), ("chmod", "sub/objs/obj")]
    out, _recs = lab.run(
        "exhaust",
        *(w for op in ops for w in ("--", *op)),
        "--",
        "chmod",
        "sub/../a",
        "--",
        "mkdir",
        "sub/new",
        cwd=lab.proj,
    )
    assert out[1:] == [f"{op} -1 30" for op, _ in ops] + ["chmod 0 0", "mkdir 0 0"]  # EROFS
    assert obj.read_bytes() == b"object\n"
    assert stat.S_IMODE(obj.stat().st_mode) == 0o444
    assert stat.S_IMODE((lab.proj / "a").stat().st_mode) == 0o600
    assert (lab.proj / "sub" / "new").is_dir()


@pytest.mark.parametrize("free", [1, 2])
def test_a_break_short_of_fds_fails_and_leaves_nothing_behind(lab: Lab, free: int) -> None:
    proxy = _proxy_lab(lab)
    out, _recs = lab.run("exhaust_but", str(free), "--", "truncate", "p1")
    assert out[1:] == ["truncate -1 24"]
    assert proxy.read_bytes() == b"shared\n"
    assert (lab.proj / "p1").stat().st_ino == proxy.stat().st_ino
    assert sorted(os.listdir(lab.proj)) == ["a", "p1", "p2", "sub"]


def test_open_by_handle_is_journaled_and_refused_on_a_proxy_or_in_the_store(lab: Lab) -> None:
    # open_by_handle_at went past the shim whole: a --link proxy was appended to in place (every
    # tree sharing it saw the bytes), the store was not refused, nothing was journaled
    proxy = _proxy_lab(lab)
    obj = lab.store / "objects-v1" / "obj"
    obj.write_bytes(b"object\n")
    obj.chmod(0o444)
    out, recs = lab.run("handle_append", "a")
    if out != ["handle_append 10 0"]:
        pytest.skip(f"no file handles here: {out}")  # needs CAP_DAC_READ_SEARCH and fs support
    opens = [(Phase(r.phase), r.path1) for r in recs if r.type == RecType.OPEN]
    assert opens == [(Phase.INTENT, lab.p("a")), (Phase.DONE, lab.p("a"))]
    assert [r.path1 for r in recs if r.type == RecType.CLOSE] == [lab.p("a")]
    assert (lab.proj / "a").read_bytes() == b"hello\nby handle\n"
    out, recs = lab.run("handle_append", "p1", "--", "handle_append", os.fspath(obj))
    assert out == ["handle_append -1 30", "handle_append -1 30"]  # EROFS
    assert proxy.read_bytes() == b"shared\n"
    assert (lab.proj / "p1").read_bytes() == (lab.proj / "p2").read_bytes() == b"shared\n"
    assert obj.read_bytes() == b"object\n"
    assert len([r for r in recs if r.type == RecType.DENIED]) == 2


def _flags(path: Path) -> str:
    out = subprocess.run(["lsattr", "-d", path], capture_output=True, text=True, check=True)
    return out.stdout.split()[0]


@pytest.mark.skipif(shutil.which("chattr") is None, reason="no chattr")
def test_chattr_breaks_a_proxy_first_and_is_refused_in_the_store(lab: Lab) -> None:
    # chattr sets inode flags by ioctl on a read-only fd: the shared proxy got them (as root,
    # +i or +a on it would stop every other tree's break), a store object too, nothing journaled
    proxy = _proxy_lab(lab)
    obj = lab.store / "objects-v1" / "obj"
    obj.write_bytes(b"object\n")
    before = _flags(proxy)
    if "d" in before:
        pytest.skip("the file system set +d already")
    lab.export()
    env = lab.env()
    done = subprocess.run(["chattr", "+d", "p1"], env=env, cwd=lab.proj, capture_output=True)
    if done.returncode != 0 and b"Operation not supported" in done.stderr:
        pytest.skip("no inode flags on this file system")
    assert done.returncode == 0, done.stderr
    assert "d" in _flags(lab.proj / "p1")
    assert _flags(proxy) == _flags(lab.proj / "p2") == before
    assert (lab.proj / "p1").stat().st_ino != proxy.stat().st_ino
    refused = subprocess.run(["chattr", "+d", obj], env=env, cwd=lab.proj, capture_output=True)
    assert refused.returncode != 0 and b"Read-only file system" in refused.stderr
    assert _flags(obj) == before
    recs = lab.reader.read(final=True)
    xattr = [(Phase(r.phase), r.path1) for r in recs if r.type == RecType.XATTR]
    assert xattr == [(Phase.INTENT, lab.p("p1")), (Phase.DONE, lab.p("p1"))]
    assert [r.type for r in recs].count(RecType.DENIED) == 1


# glibc's other exported names of fopen/fclose, setmntent/endmntent, close, dup2 and fcntl:
# called by those names (old binaries, dlsym), they went past the hooks.
ALIASES = """
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
for name in ("_IO_fopen", "__setmntent"):
    getattr(libc, name).restype = ctypes.c_void_p
f = ctypes.c_void_p(libc._IO_fopen(b"p1", b"a"))
assert f and libc.fputs(b"via _IO_fopen\\n", f) >= 0 and libc._IO_fclose(f) == 0
m = ctypes.c_void_p(libc.__setmntent(b"p2", b"a"))
assert m and libc.fputs(b"via __setmntent\\n", m) >= 0 and libc.__endmntent(m) == 1
fd = os.open("a", os.O_WRONLY | os.O_APPEND)
assert libc.__fcntl(fd, 0, 50) == 50  # F_DUPFD: fd 50 writes a too
assert libc.__close(fd) == 0
null = os.open("/dev/null", os.O_RDONLY)
assert libc.__dup2(null, 50) == 50  # a's last fd replaced: closed
"""


def test_glibcs_other_names_of_hooked_functions_are_hooked(lab: Lab) -> None:
    proxy = _proxy_lab(lab)
    lab.export()
    proc = subprocess.run(
        ["/usr/bin/python3", "-c", ALIASES],
        env=lab.env(),
        cwd=lab.proj,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proxy.read_bytes() == b"shared\n"  # every tree's copy kept its bytes
    assert (lab.proj / "p1").read_bytes() == b"shared\nvia _IO_fopen\n"
    assert (lab.proj / "p2").read_bytes() == b"shared\nvia __setmntent\n"
    recs = lab.reader.read(final=True)
    closes = [(r.path1, r.ret) for r in recs if r.type == RecType.CLOSE]
    # both streams at their close, and a's fd at __close and its duplicate (50) at __dup2
    assert sorted(p for p, _fd in closes) == sorted(
        [lab.p("p1"), lab.p("p2"), lab.p("a"), lab.p("a")]
    )
    assert (lab.p("a"), 50) in closes, closes


OPENAT2 = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
class How(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]
def openat2(dirfd, path, flags, resolve):
    how = How(flags, 0o644 if flags & os.O_CREAT else 0, resolve)
    fd = libc.syscall(ctypes.c_long(437), dirfd, path, ctypes.byref(how), 24)
    print(fd if fd < 0 else 0, ctypes.get_errno() if fd < 0 else 0)
    if fd >= 0:
        os.write(fd, b"x")
        os.close(fd)
IN_ROOT = 0x10
top = os.open(".", os.O_RDONLY | os.O_DIRECTORY)
openat2(top, b"/a", os.O_WRONLY | os.O_APPEND, IN_ROOT)  # the tree's a, not /a
openat2(top, b"/sub/../sub/n", os.O_WRONLY | os.O_CREAT, IN_ROOT)  # a new file, in the tree
store = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY)
openat2(store, b"/objects-v1/obj", os.O_WRONLY | os.O_APPEND, IN_ROOT)  # refused: EROFS
"""


def test_openat2_is_journaled_where_the_kernel_resolves_it(lab: Lab) -> None:
    # openat2 has no glibc wrapper: through syscall(3) it went past the shim whole. With
    # RESOLVE_IN_ROOT its "/" is the dirfd: resolved by text from the real root, a write-open
    # of the tree's files would be taken for one outside it.
    obj = lab.store / "objects-v1" / "obj"
    obj.write_bytes(b"object\n")
    lab.export()
    proc = subprocess.run(
        ["/usr/bin/python3", "-c", OPENAT2, os.fspath(lab.store)],
        env=lab.env(),
        cwd=lab.proj,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["0 0", "0 0", "-1 30"]
    assert (lab.proj / "a").read_bytes() == b"hello\nx"
    assert (lab.proj / "sub" / "n").read_bytes() == b"x"
    assert obj.read_bytes() == b"object\n"
    recs = lab.reader.read(final=True)
    opens = [(Phase(r.phase), r.path1) for r in recs if r.type == RecType.OPEN]
    assert opens == [
        (Phase.INTENT, lab.p("a")),
        (Phase.DONE, lab.p("a")),
        (Phase.INTENT, lab.p("sub/n")),
        (Phase.DONE, lab.p("sub/n")),
    ]
    assert [r.path1 for r in recs if r.type == RecType.DENIED] == [os.fsencode(obj)]
    closes = [r.path1 for r in recs if r.type == RecType.CLOSE]
    assert closes == [lab.p("a"), lab.p("sub/n")]
