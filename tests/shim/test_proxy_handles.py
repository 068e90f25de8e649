"""--link: a change made through a handle that still holds a shared proxy inode — a
/proc/self/fd/N magic link, an AT_EMPTY_PATH fd, glibc's freopen(NULL) (which reopens
/proc/self/fd/N), an fd opened before the path was broken — must land in the session's tree
(compared with a plain directory that got the same calls), never in the proxy.

Found by attack: Break-Before-Write replaced the path by a private copy, then the call went on
through the caller's own handle, which the kernel resolves to the proxy: the write, truncate or
chmod changed every session's copy of that content, and the commit missed it (P0-b)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.helpers.unpriv import unpriv_tmpdir
from tests.session._util import as_mode, checkout_ref, new_store
from tests.shim._util import PY, run_shim
from veloverlay.session.shim.materialize import verify_proxies

# Each step first opens the file read-only (no write yet: the path is still the proxy link).
SCRIPT = """
import os, sys
def ro(p):
    return os.open(p, os.O_RDONLY)
w = os.open(f"/proc/self/fd/{ro('f1')}", os.O_WRONLY | os.O_APPEND)
os.write(w, b"appended\\n")
os.truncate(f"/proc/self/fd/{ro('f3')}", 2)
os.chmod(f"/proc/self/fd/{ro('f4')}", 0o640)
os.utime(f"/proc/self/fd/{ro('f5')}", (1_000_000_000, 1_000_000_000))
with open(f"/proc/self/fd/{ro('d/b')}", "r+b") as f:
    f.write(b"BE")
# fchmod of an fd whose path another open has broken since: it must not reach the proxy
fd = ro("f2")
with open("f2", "a") as f:
    f.write("two more\\n")
try:
    os.fchmod(fd, 0o600)
except OSError as e:
    print("fchmod", e.errno, file=sys.stderr)
"""


def _tree(root: str) -> dict[str, tuple[str, int, bytes]]:
    out = {}
    for dp, dns, fns in os.walk(root):
        for n in dns + fns:
            p = os.path.join(dp, n)
            st = os.lstat(p)
            if os.path.islink(p):
                out[os.path.relpath(p, root)] = ("symlink", 0, os.readlink(p).encode())
            elif os.path.isdir(p):
                out[os.path.relpath(p, root)] = ("dir", st.st_mode & 0o7777, b"")
            else:
                data = Path(p).read_bytes()
                out[os.path.relpath(p, root)] = ("file", st.st_mode & 0o7777, data)
    return out


def _run(
    base: str, exe: str, source: str = SCRIPT, calls: str = ""
) -> tuple[dict, dict, list[str], str, str, int]:
    store, src = new_store(base)
    plain = os.path.join(base, "plain")
    shutil.copytree(src, plain, symlinks=True)
    script = os.path.join(base, "s.py")
    Path(script).write_text(source)
    cmd = f"{PY} {script}" + (f" && {exe} {calls}" if calls else "")
    ran = subprocess.run(["sh", "-c", cmd], cwd=plain, capture_output=True, text=True)
    assert ran.returncode == 0, ran.stderr
    proj = os.path.join(base, "proj")
    errs = os.path.join(base, "errs")
    argv = ["sh", "-c", f"cd {proj} && {{ {cmd}; }} 2>{errs}"]
    res = run_shim(store, "t", argv, link=True, at=proj)
    assert res.exit_status == 0, (res, Path(errs).read_text())
    got = os.path.join(base, "got")
    checkout_ref(store, "t", got)
    proxies = [f"{f.kind} {os.path.basename(f.path)}" for f in verify_proxies(store)]
    f5 = os.stat(os.path.join(got, "f5")).st_mtime_ns
    return _tree(plain), _tree(got), proxies, ran.stderr, Path(errs).read_text(), f5


@pytest.mark.parametrize("mode", ["root", "rootfree"])
def test_writes_through_proxy_handles_reach_the_tree(mode: str, try_syscall: Path) -> None:
    with unpriv_tmpdir() as base:
        calls = "freopen_null f6 -- link_empty f7 f7.link -- open_append f7.link"
        plain, got, proxies, plain_err, session_err, f5_mtime = as_mode(
            mode, _run, base, os.fspath(try_syscall), SCRIPT, calls
        )
    assert proxies == [], "a shared proxy was changed"
    assert plain_err == ""
    # The stale fd's fchmod: applied to the private copy as in a plain directory, or refused
    # (EROFS) — then the session saw f2 keep its mode, and that is what is committed.
    if session_err:
        assert session_err.strip() == "fchmod 30", session_err
        assert got["f2"][1] == 0o644 and plain["f2"][1] == 0o600
        got["f2"] = plain["f2"]
    assert got == plain
    assert f5_mtime == 1_000_000_000 * 10**9  # the utime through /proc/self/fd was committed


SPAWN = """
import os
actions = [
    (os.POSIX_SPAWN_OPEN, 1, "f1", os.O_WRONLY | os.O_APPEND, 0),
    (os.POSIX_SPAWN_OPEN, 2, "d/b", os.O_WRONLY | os.O_TRUNC, 0),
]
pid = os.posix_spawn("/bin/sh", ["sh", "-c", "echo out; echo err >&2"], os.environ,
                     file_actions=actions)
assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
"""


@pytest.mark.parametrize("mode", ["root", "rootfree"])
def test_a_spawned_childs_open_action_breaks_the_proxy_first(mode: str, try_syscall: Path) -> None:
    """posix_spawn's open actions run in the child through glibc's internal open, before the
    child's shim is loaded: the proxy is broken when the action is added."""
    with unpriv_tmpdir() as base:
        plain, got, proxies, plain_err, session_err, _ = as_mode(
            mode, _run, base, os.fspath(try_syscall), SPAWN
        )
    assert proxies == [], "a spawned child wrote into a shared proxy"
    assert plain_err == "" and session_err == ""
    assert got == plain
    assert plain["f1"][2] == b"one\nout\n"


def _leave(base: str, exe: str) -> tuple[dict, dict, dict, dict, list[str]]:
    """mv a file and a directory out of the tree, exchange a file with one outside; then write
    to what left, after the session, as any program would."""
    store, src = new_store(base)
    trees = {}
    for kind in ("plain", "session"):
        out = os.path.join(base, f"out-{kind}")
        os.mkdir(out)
        Path(out, "g").write_bytes(b"from outside\n")
        trees[kind] = out
    plain = os.path.join(base, "plain")
    shutil.copytree(src, plain, symlinks=True)
    cmd = "mv f1 {o}/f1 && mv dir1 {o}/dir1 && {exe} exchange f2 {o}/g"
    ran = subprocess.run(
        ["sh", "-c", cmd.format(o=trees["plain"], exe=exe)], cwd=plain, capture_output=True
    )
    assert ran.returncode == 0, ran.stderr
    proj = os.path.join(base, "proj")
    argv = ["sh", "-c", f"cd {proj} && " + cmd.format(o=trees["session"], exe=exe)]
    res = run_shim(store, "t", argv, link=True, at=proj)
    assert res.exit_status == 0, res
    for out in trees.values():
        for rel in ("f1", "dir1/x", "g"):
            with open(os.path.join(out, rel), "ab") as f:
                f.write(b"written later\n")
    got = os.path.join(base, "got")
    checkout_ref(store, "t", got)
    proxies = [f"{f.kind} {os.path.basename(f.path)}" for f in verify_proxies(store)]
    return _tree(plain), _tree(got), _tree(trees["plain"]), _tree(trees["session"]), proxies


@pytest.mark.parametrize("mode", ["root", "rootfree"])
def test_what_leaves_the_tree_takes_no_proxy_along(mode: str, try_syscall: Path) -> None:
    with unpriv_tmpdir() as base:
        plain, got, out_plain, out_session, proxies = as_mode(
            mode, _leave, base, os.fspath(try_syscall)
        )
    assert proxies == [], "a write outside the tree changed a shared proxy"
    assert got == plain
    assert out_session == out_plain


# glibc opens these files with its internal open/fopen, past the open and fopen hooks.
GLIBC_OPENS = """
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
ut = ctypes.create_string_buffer(b"\\x07\\x00\\x00\\x00" + b"u" * 380, 384)  # one struct utmp
libc.updwtmp(b"f1", ut)
libc.updwtmpx(b"d/b", ut)
libc.setmntent.restype = ctypes.c_void_p
libc.setmntent.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
class Mnt(ctypes.Structure):
    _fields_ = [("fsname", ctypes.c_char_p), ("dir", ctypes.c_char_p), ("type", ctypes.c_char_p),
                ("opts", ctypes.c_char_p), ("freq", ctypes.c_int), ("passno", ctypes.c_int)]
for name, mode in ((b"f2", b"a"), (b"f4", b"w")):
    m = ctypes.c_void_p(libc.setmntent(name, mode))
    assert m, ctypes.get_errno()
    assert libc.addmntent(m, ctypes.byref(Mnt(b"dev", b"/mnt", b"ext4", b"rw", 0, 0))) == 0
    libc.endmntent(m)
assert libc.utmpname(b"f3") == 0
libc.setutent()
assert libc.pututline(ut)
libc.endutent()
"""


@pytest.mark.parametrize("mode", ["root", "rootfree"])
def test_files_glibc_opens_past_the_open_hooks_are_broken_first(
    mode: str, try_syscall: Path
) -> None:
    """updwtmp(x), setmntent + addmntent and utmpname + pututline wrote the shared proxy of the
    file they were given (glibc's internal open and fopen): every tree sharing it changed."""
    with unpriv_tmpdir() as base:
        plain, got, proxies, plain_err, session_err, _ = as_mode(
            mode, _run, base, os.fspath(try_syscall), GLIBC_OPENS
        )
    assert plain_err == "" and session_err == ""
    assert proxies == [], "a glibc function wrote into a shared proxy"
    assert got == plain
    assert b"/mnt ext4" in plain["f4"][2] and b"uuuu" in plain["f3"][2]


# Open actions after a chdir action are relative to that directory in the child.
SPAWN_CHDIR = """
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
def spawn(actions, cmd):
    fa = ctypes.create_string_buffer(128)  # posix_spawn_file_actions_t (80 bytes)
    assert libc.posix_spawn_file_actions_init(fa) == 0
    for act, *args in actions:
        assert getattr(libc, "posix_spawn_file_actions_" + act)(fa, *args) == 0, act
    env = [f"{k}={v}".encode() for k, v in os.environ.items()]
    envp = (ctypes.c_char_p * (len(env) + 1))(*env, None)
    argv = (ctypes.c_char_p * 4)(b"sh", b"-c", cmd, None)
    pid = ctypes.c_int()
    assert libc.posix_spawn(ctypes.byref(pid), b"/bin/sh", fa, None, argv, envp) == 0
    assert os.waitstatus_to_exitcode(os.waitpid(pid.value, 0)[1]) == 0
    libc.posix_spawn_file_actions_destroy(fa)
spawn([("addchdir_np", b"d"), ("addopen", 1, b"b", os.O_WRONLY | os.O_APPEND, 0)], b"echo one")
spawn([("addchdir_np", b"dir1"), ("addchdir_np", b"../d"),
       ("addopen", 2, b"b", os.O_WRONLY | os.O_APPEND, 0)], b"echo two >&2")
dfd = os.open("dir2", os.O_RDONLY | os.O_DIRECTORY)
names = sorted(n for n in os.listdir("dir2") if os.path.isfile(os.path.join("dir2", n)))
spawn([("addfchdir_np", dfd), ("addopen", 1, names[0].encode(), os.O_WRONLY | os.O_TRUNC, 0)],
      b"echo three")
"""


@pytest.mark.parametrize("mode", ["root", "rootfree"])
def test_a_spawned_childs_open_action_after_a_chdir_action_breaks_the_right_proxy(
    mode: str, try_syscall: Path
) -> None:
    """addchdir_np("d") + addopen("b"): the child opens d/b, which the parent resolved as ./b
    (nothing there to break): the child wrote d/b's shared proxy."""
    with unpriv_tmpdir() as base:
        plain, got, proxies, plain_err, session_err, _ = as_mode(
            mode, _run, base, os.fspath(try_syscall), SPAWN_CHDIR
        )
    assert plain_err == "" and session_err == ""
    assert proxies == [], "a spawned child wrote into a shared proxy"
    assert got == plain
    assert plain["d/b"][2].endswith(b"one\ntwo\n")


# syscall(3) is a libc function like any other: openat2 has no other entry point in glibc, and
# some programs make all their calls through it.
THROUGH_SYSCALL = """
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
def sys(nr, *args):
    r = libc.syscall(ctypes.c_long(nr), *args)
    assert r >= 0, (nr, ctypes.get_errno())
    return r
class How(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]
top = os.open(".", os.O_RDONLY | os.O_DIRECTORY)
RESOLVE_BENEATH, RESOLVE_IN_ROOT = 0x08, 0x10
# openat2 (437): beneath the tree's fd, and "/f2" taken in the tree's fd as its root
fd = sys(437, top, b"f1", ctypes.byref(How(os.O_WRONLY | os.O_APPEND, 0, RESOLVE_BENEATH)), 24)
os.write(fd, b"openat2\\n")
os.close(fd)
fd = sys(437, top, b"/f2", ctypes.byref(How(os.O_WRONLY | os.O_TRUNC, 0, RESOLVE_IN_ROOT)), 24)
os.write(fd, b"in root\\n")
os.close(fd)
fd = sys(437, top, b"new", ctypes.byref(How(os.O_WRONLY | os.O_CREAT, 0o640, RESOLVE_BENEATH)), 24)
os.close(fd)
sys(76, b"f3", ctypes.c_long(2))  # truncate
ro = os.open("f4", os.O_RDONLY)
sys(91, ro, 0o600)  # fchmod of a read-only fd
sys(452, os.open("f6", os.O_RDONLY), b"", 0o640, 0x1000)  # fchmodat2(fd, "", AT_EMPTY_PATH)
times = (ctypes.c_long * 4)(1_000_000_000, 0, 1_000_000_000, 0)
sys(280, -100, b"f5", times, 0)  # utimensat
fd = sys(257, -100, b"d/b", os.O_WRONLY | os.O_APPEND)  # openat
os.write(fd, b"openat\\n")
os.close(fd)
"""


@pytest.mark.parametrize("mode", ["root", "rootfree"])
def test_calls_made_through_syscall_break_the_proxy_first(mode: str, try_syscall: Path) -> None:
    """openat2 (RESOLVE_BENEATH, RESOLVE_IN_ROOT), truncate, fchmod, fchmodat2, utimensat and
    openat made with syscall(3) changed the shared proxy in place: every tree with that content
    saw it."""
    with unpriv_tmpdir() as base:
        plain, got, proxies, plain_err, session_err, f5_mtime = as_mode(
            mode, _run, base, os.fspath(try_syscall), THROUGH_SYSCALL
        )
    assert plain_err == "" and session_err == ""
    assert proxies == [], "a call made through syscall() wrote into a shared proxy"
    assert got == plain
    assert plain["f2"][2] == b"in root\n" and plain["f4"][1] == 0o600 and plain["f6"][1] == 0o640
    assert f5_mtime == 1_000_000_000 * 10**9
