"""A store is made only in a directory its user may close to others.

`--store DIR` where DIR is an existing empty directory was taken as an existing store, with its
mode and owner as they were: another user's 0777 directory (uid B makes /tmp/st before uid A's
`veloverlay --store /tmp/st ingest ~/src`) became A's store, B its owner: B read every object,
the bytes of A's 0600 files. Such a directory is now a new store, made private (0700) before
anything is written in it, so another user's one is refused (store-permission) with nothing
written. The other user here is a real process of another uid.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.helpers.cli import TOP
from tests.helpers.unpriv import UNPRIV_UID, unpriv_tmpdir

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root to act as two users (the store's and another)"
)

OTHER_UID = UNPRIV_UID + 1  # a second unprivileged uid (it need not exist in /etc/passwd)


def _as(uid: int, *cmd: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": TOP, "NO_COLOR": "1"}
    who = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
    return subprocess.run(
        [*who, *cmd], env=env, cwd="/", capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize("verb", ["init", "ingest"])
def test_another_user_s_empty_directory_never_becomes_a_store(verb: str) -> None:
    with unpriv_tmpdir() as base:
        src = os.path.join(base, "src")
        os.mkdir(src, 0o700)
        with open(os.path.join(src, "secret"), "w") as f:
            f.write("s3cret\n")
        os.chmod(os.path.join(src, "secret"), 0o600)
        for p in (src, os.path.join(src, "secret")):
            os.chown(p, UNPRIV_UID, UNPRIV_UID)
        theirs = os.path.join(base, "st")
        os.mkdir(theirs)
        os.chown(theirs, OTHER_UID, OTHER_UID)
        os.chmod(theirs, 0o777)
        args = ["init"] if verb == "init" else ["ingest", src, "--name", "t"]
        p = _as(UNPRIV_UID, sys.executable, "-m", "veloverlay", "--debug", "--store", theirs, *args)
        assert p.returncode == 1, (p.stdout, p.stderr)  # old: 0, the store made there
        assert "reason: store-permission" in p.stderr, p.stderr
        assert os.listdir(theirs) == []  # nothing written (old: the whole store, objects too)
        got = _as(OTHER_UID, "sh", "-c", f"cat {theirs}/objects-v2/*/* 2>/dev/null")
        assert "s3cret" not in got.stdout


@pytest.mark.parametrize("mode", [0o755, 0o777])
def test_an_own_empty_directory_becomes_a_private_store(mode: int) -> None:
    """The same as the store's owner: its empty 0755 directory (mkdir under umask 022; 0777
    under umask 0) becomes a 0700 store, and the other user cannot read the secret's object
    (old: the mode stayed, and the object was read)."""
    with unpriv_tmpdir() as base:
        src, st = os.path.join(base, "src"), os.path.join(base, "st")
        os.mkdir(src, 0o700)
        with open(os.path.join(src, "secret"), "w") as f:
            f.write("s3cret\n")
        os.chmod(os.path.join(src, "secret"), 0o600)
        os.mkdir(st)
        os.chmod(st, mode)
        for p in (src, os.path.join(src, "secret"), st):
            os.chown(p, UNPRIV_UID, UNPRIV_UID)
        p = _as(UNPRIV_UID, sys.executable, "-m", "veloverlay", "--store", st, "ingest", src)
        assert p.returncode == 0, p.stderr
        assert os.stat(st).st_mode & 0o777 == 0o700
        got = _as(OTHER_UID, "sh", "-c", f"cat {st}/objects-v2/*/*")
        assert got.returncode != 0 and "s3cret" not in got.stdout, got.stdout
        assert "Permission denied" in got.stderr, got.stderr


@pytest.mark.parametrize("mode", [0o777, 0o755])
def test_a_directory_another_user_made_to_look_like_a_store_is_not_written(mode: int) -> None:
    """uid B makes /tmp/st with an objects-v2 and a CACHEDIR.TAG (a store's marks) before uid
    A's first `--store /tmp/st ingest`. The old init took it for an existing store: A's objects
    went into B's directories (0777: B read every one, and could have put others in their
    place). Now: a store's directory and its own ones belong to one user (or root) and no other
    user may add to them (store-unsafe), and only its owner writes a store (store-permission)."""
    with unpriv_tmpdir() as base:
        src = os.path.join(base, "src")
        os.mkdir(src, 0o700)
        with open(os.path.join(src, "secret"), "w") as f:
            f.write("s3cret\n")
        os.chmod(os.path.join(src, "secret"), 0o600)
        for p in (src, os.path.join(src, "secret")):
            os.chown(p, UNPRIV_UID, UNPRIV_UID)
        fake = os.path.join(base, "st")
        made = _as(
            OTHER_UID,
            "sh",
            "-c",
            f"mkdir {fake} {fake}/objects-v2 && chmod {mode:o} {fake}/objects-v2 && "
            f"touch {fake}/CACHEDIR.TAG && chmod {mode:o} {fake}",
        )
        assert made.returncode == 0, made.stderr
        cmd = [sys.executable, "-m", "veloverlay", "--debug", "--store", fake]
        p = _as(UNPRIV_UID, *cmd, "ingest", src, "--name", "t")
        assert p.returncode == 1, (p.stdout, p.stderr)  # old: 0, committed into B's directory
        want = "store-unsafe" if mode == 0o777 else "store-permission"
        assert f"reason: {want}" in p.stderr, p.stderr
        assert sorted(os.listdir(fake)) == ["CACHEDIR.TAG", "objects-v2"]  # nothing of A's
        assert os.listdir(os.path.join(fake, "objects-v2")) == []
