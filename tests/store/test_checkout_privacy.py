"""A checkout written into an existing directory never opens the tree's files to other users.

A tree whose top is 0700 keeps its 0644 files private by that directory alone. Written into an
existing destination in place (another user's empty directory, a mount point, the working
directory: `cd DEST && checkout REF .`), the tree's top mode was set only at the very end: until
then, and for good once the checkout was killed midway, the files lay in DEST with DEST's own
mode (0755, or the 0777 of another user's directory, whose owner could read them all). DEST is
now closed to other users (0700) while the tree is written, and one this user may not chmod is
refused before anything is written. The reader here is a real process of another uid.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from tests.helpers.cli import TOP
from tests.helpers.unpriv import UNPRIV_UID, unpriv_tmpdir

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root to act as two users (the tree's owner and another)"
)

OTHER_UID = UNPRIV_UID + 1  # a second unprivileged uid (it need not exist in /etc/passwd)


def _velo(
    uid: int, store: str, *args: str, fault: str = "", cwd: str = "/"
) -> subprocess.CompletedProcess[str]:
    """The CLI as `uid` (root: 0), with a crash point when `fault` is given."""
    env = {"PATH": "/usr/bin:/bin", "VELO_STORE": store, "PYTHONPATH": TOP, "NO_COLOR": "1"}
    if fault:
        env["VELO_INTERNAL__TEST_FAULT"] = fault
    who = [] if uid == 0 else ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
    cmd = [*who, sys.executable, "-m", "veloverlay", "--debug", *args]
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=120)


def _read_as(uid: int, path: str) -> subprocess.CompletedProcess[str]:
    cmd = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "cat", path]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30)


def _private_tree(base: str, owner: int) -> str:
    """`owner`'s store holding ref t: a 0700 top over 0644 files (the top keeps them private)."""
    src, store = os.path.join(base, "src"), os.path.join(base, "store")
    os.mkdir(src, 0o700)
    for i in range(5):
        with open(os.path.join(src, f"notes{i}"), "w") as f:
            f.write(f"private {i}\n")
        os.chmod(os.path.join(src, f"notes{i}"), 0o644)
    os.chmod(src, 0o700)
    if owner:
        os.chown(src, owner, owner)
        for i in range(5):
            os.chown(os.path.join(src, f"notes{i}"), owner, owner)
    p = _velo(owner, store, "ingest", src, "--name", "t")
    assert p.returncode == 0, p.stderr
    return store


def test_a_checkout_into_another_user_s_directory_is_refused_before_writing() -> None:
    """uid A checks out into uid B's empty 0777 directory (say, B made /tmp/out first). The old
    checkout wrote every file there, then failed on the top's chmod (EPERM); killed midway, it
    left them for B to read. Now: refused (target-invalid), nothing written."""
    with unpriv_tmpdir() as base:
        store = _private_tree(base, UNPRIV_UID)
        theirs = os.path.join(base, "out")
        os.mkdir(theirs)
        os.chown(theirs, OTHER_UID, OTHER_UID)
        os.chmod(theirs, 0o777)
        p = _velo(UNPRIV_UID, store, "checkout", "t", theirs, fault="checkout.file:1")
        assert p.returncode == 1, (p.returncode, p.stderr)  # old: -9, killed after a file
        assert "reason: target-invalid" in p.stderr, p.stderr
        assert os.listdir(theirs) == []
        assert _read_as(OTHER_UID, os.path.join(theirs, "notes0")).returncode != 0
        p = _velo(UNPRIV_UID, store, "checkout", "t", theirs)  # the same without a crash point
        assert p.returncode == 1 and "reason: target-invalid" in p.stderr, p.stderr
        assert os.listdir(theirs) == []  # old: "Operation not permitted" after writing all
        assert stat.S_IMODE(os.lstat(theirs).st_mode) == 0o777


@pytest.mark.parametrize("end", ["killed", "failed", "whole"])
def test_a_checkout_in_place_keeps_a_private_tree_private(end: str) -> None:
    """Root checks out in place (`cd DEST && checkout t .`; DEST 0755, as mkdir makes it).
    Killed after one file, the old checkout left that 0644 file readable by every local user in
    the 0755 DEST. Now DEST is 0700 while written; a failure gives it its mode back, a whole
    checkout the tree's own (0700)."""
    with unpriv_tmpdir() as base:
        store = _private_tree(base, 0)
        dest = os.path.join(base, "dest")
        os.mkdir(dest)
        os.chmod(dest, 0o755)
        if end == "failed":  # a damaged object: the checkout stops with object-corrupt
            for d, _dirs, names in os.walk(os.path.join(store, "objects-v2")):
                for n in names:
                    if n.startswith(_digest_of(b"private 3\n")):
                        subprocess.run(["chattr", "-i", os.path.join(d, n)], check=False)
                        os.chmod(os.path.join(d, n), 0o644)
                        with open(os.path.join(d, n), "r+b") as f:
                            f.write(b"P")
        fault = "checkout.file:1" if end == "killed" else ""
        p = _velo(0, store, "checkout", "t", ".", fault=fault, cwd=dest)
        if end == "killed":
            assert p.returncode == -9, p.stderr
            written = os.listdir(dest)
            assert len(written) == 1, written
            got = _read_as(UNPRIV_UID, os.path.join(dest, written[0]))
            assert got.returncode != 0, got.stdout  # old: "private N", read through the 0755 DEST
            assert "Permission denied" in got.stderr, got.stderr
            assert stat.S_IMODE(os.lstat(dest).st_mode) == 0o700
        elif end == "failed":
            assert p.returncode == 1 and "reason: object-corrupt" in p.stderr, p.stderr
            assert os.listdir(dest) == []
            assert stat.S_IMODE(os.lstat(dest).st_mode) == 0o755
        else:
            assert p.returncode == 0, p.stderr
            assert sorted(os.listdir(dest)) == [f"notes{i}" for i in range(5)]
            assert stat.S_IMODE(os.lstat(dest).st_mode) == 0o700


def _digest_of(data: bytes) -> str:
    from veloverlay.store.digest import hash_bytes

    return hash_bytes(data).hex()
