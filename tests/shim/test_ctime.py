"""The shim's end-of-session tree sync must look at ctime: a writer the shim cannot see (a
static binary, raw syscalls) that rewrites a file in place with the same size and puts its mtime
back changes nothing but the ctime, and the session's commit must still hold the new bytes."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

from tests.helpers.unpriv import unpriv_tmpdir
from tests.session._util import as_mode, checkout_ref, new_store
from tests.shim._util import PY, run_shim

# Runs inside the session: raw write (same size: "one\n" -> "raw\n"), then the old mtime put back
# with a raw utimensat (ctypes' syscall(): no shim hook sees either).
SCRIPT = textwrap.dedent(
    r"""
    import ctypes, os, subprocess, sys
    tool, path = sys.argv[1], sys.argv[2]
    before = os.stat(path)
    subprocess.run([tool, "raw_write", path], check=True, stdout=subprocess.DEVNULL)
    class TS(ctypes.Structure):
        _fields_ = [("sec", ctypes.c_long), ("nsec", ctypes.c_long)]
    t = (TS * 2)(
        TS(before.st_atime_ns // 10**9, before.st_atime_ns % 10**9),
        TS(before.st_mtime_ns // 10**9, before.st_mtime_ns % 10**9),
    )
    libc = ctypes.CDLL(None, use_errno=True)
    SYS_utimensat = 280  # x86_64
    if libc.syscall(SYS_utimensat, -100, path.encode(), t, 0) != 0:
        sys.exit(f"utimensat: errno {ctypes.get_errno()}")
    after = os.stat(path)
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (
        before.st_ino, before.st_size, before.st_mtime_ns
    ), (before, after)
    assert after.st_ctime_ns != before.st_ctime_ns
    """
)


def _scenario(base: str, tool: str, link: bool) -> bytes:
    store, _src = new_store(base)
    proj = os.path.join(base, "proj")
    script = os.path.join(base, "rewrite.py")
    with open(script, "w") as f:
        f.write(SCRIPT)
    res = run_shim(
        store, "t", ["sh", "-c", f"cd {proj} && {PY} {script} {tool} f1"], link=link, at=proj
    )
    assert res.exit_status == 0, res
    got = os.path.join(base, "got")
    checkout_ref(store, "t", got)
    with open(os.path.join(got, "f1"), "rb") as f:
        return f.read()


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="the raw utimensat number is x86_64's")
@pytest.mark.parametrize("mode", ["root", "rootfree"])
def test_a_rewrite_in_place_with_the_mtime_put_back_is_committed(
    mode: str, try_syscall: Path
) -> None:
    with unpriv_tmpdir() as base:
        got = as_mode(mode, _scenario, base, os.fspath(try_syscall), False)
    assert got == b"raw\n"
