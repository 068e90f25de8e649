"""A verb that meets a directory of another user says whose it is and what to do, instead of
only "Operation not permitted" (init into another user's empty directory, checkout DEST and
export output under one). Run as the unprivileged test uid against directories root made: the
real thing, another owner. And a directory of one's own that cannot take a tree (a read-only
mount point, `chattr +i`) is named as it is, not as another user's or a bare errno."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers.unpriv import run_unprivileged, unpriv_tmpdir
from veloverlay import fsflags, mount

pytestmark = pytest.mark.skipif(os.getuid() != 0, reason="needs root to make another's dirs")


def _velo(store: str, *args: str) -> dict[str, object]:
    env = {**os.environ, "NO_COLOR": "1"}
    p = subprocess.run(
        [sys.executable, "-m", "veloverlay", "--json", "--store", store, *args],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert p.returncode == 1, (p.stdout, p.stderr)
    doc: dict[str, object] = json.loads(p.stdout)
    return doc


def _as_user(base: str) -> dict[str, dict[str, object]]:
    own = os.path.join(base, "own")
    src = os.path.join(base, "src")
    os.mkdir(src)
    with open(os.path.join(src, "f"), "w") as f:
        f.write("x")
    for argv in (["init"], ["ingest", src, "--name", "t"]):
        subprocess.run(
            [sys.executable, "-m", "veloverlay", "--store", own, *argv],
            check=True,
            capture_output=True,
        )
    theirs = os.path.join(base, "theirs")
    return {
        "init": _velo(theirs, "init"),
        "init-below": _velo(os.path.join(theirs, "new", "store"), "init"),
        "checkout": _velo(own, "checkout", "t", os.path.join(theirs, "out")),
        "checkout-into": _velo(own, "checkout", "t", theirs),
        "export": _velo(own, "export", "t", "-o", os.path.join(theirs, "t.velo")),
        # below a directory of theirs this user cannot even enter (0700)
        "refs-hidden": _velo(os.path.join(base, "hidden", "store"), "refs"),
        "checkout-hidden": _velo(own, "checkout", "t", os.path.join(base, "hidden", "out")),
    }


def test_another_users_directory_is_named_with_its_owner() -> None:
    with unpriv_tmpdir() as base:
        os.mkdir(os.path.join(base, "theirs"), 0o755)  # root's, empty
        os.mkdir(os.path.join(base, "hidden"), 0o700)  # root's, private
        got = run_unprivileged(_as_user, base)
    theirs = os.path.join(base, "theirs")
    for verb, doc in got.items():
        said = f"{doc['error']} {doc['hint']}"
        assert "uid 0" in said, (verb, doc)
        assert doc["hint"], (verb, doc)
    assert got["init"]["reason"] == "store-permission"
    assert got["init"]["error"] == (
        f"cannot create the store at {theirs}: {theirs} is a directory of uid 0 (root)"
    )
    assert got["init-below"]["reason"] == "store-permission"
    assert got["checkout-into"]["reason"] == "target-invalid"
    assert "that you cannot write" in str(got["export"]["hint"])
    # was a bare "[Errno 13] Permission denied" (os-error, no hint)
    assert got["refs-hidden"]["reason"] == "store-permission"
    hidden = os.path.join(base, "hidden")
    assert f"{hidden} is a directory of uid 0 (root) that you cannot enter" in str(
        got["refs-hidden"]["error"]
    )
    assert "that you cannot enter" in str(got["checkout-hidden"]["hint"])


@pytest.mark.needs("root", "chattr")
def test_an_own_directory_that_cannot_take_the_tree_is_named(
    shm_tmp: str, own_mount_namespace: None
) -> None:
    """Old code: checkout into an empty read-only mount point (written in place) and a shim
    session there failed with "[Errno 30] Read-only file system" (os-error, no path), and a shim
    session into root's own `chattr +i` directory said it "belongs to another user (uid 0)"."""
    store = os.path.join(shm_tmp, "store")
    src = os.path.join(shm_tmp, "src")
    os.mkdir(src)
    with open(os.path.join(src, "f"), "w") as f:
        f.write("x")
    for argv in (["init"], ["ingest", src, "--name", "t"]):
        subprocess.run(
            [sys.executable, "-m", "veloverlay", "--store", store, *argv],
            check=True,
            capture_output=True,
        )
    ro = os.path.join(shm_tmp, "ro")
    os.mkdir(ro)
    mount.mount_tmpfs(ro, "size=1m,mode=0755")
    mount.remount_super(ro, readonly=True)
    immutable = os.path.join(shm_tmp, "immutable")
    os.mkdir(immutable, 0o755)
    fsflags.set_immutable(immutable)
    try:
        got = {
            "checkout-ro": (ro, _velo(store, "checkout", "t", ro)),
            "shim-ro": (
                ro,
                _velo(store, "run", "t", "--backend", "shim", "--at", ro, "--", "true"),
            ),
            "shim-immutable": (
                immutable,
                _velo(store, "run", "t", "--backend", "shim", "--at", immutable, "--", "true"),
            ),
        }
        for where in (ro, immutable):  # left as they were: empty, mode 0755
            assert os.listdir(where) == [] and os.stat(where).st_mode & 0o7777 == 0o755, where
    finally:
        fsflags.set_immutable(immutable, False)
        mount.umount(ro)
    for case, (where, doc) in got.items():
        assert doc["reason"] == "syscall", (case, doc)
        assert doc["path"] == where and where in str(doc["error"]), (case, doc)
        assert "another user" not in str(doc["error"]), (case, doc)
        assert doc["hint"], (case, doc)
