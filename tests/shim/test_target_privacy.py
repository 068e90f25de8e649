"""A shim session materialising into an existing directory never opens the tree to other users.

A tree whose top is 0700 keeps its 0644 files private by that directory alone. A shim session
given an existing empty directory (`--at DIR`, made 0755 by mkdir) materialised the tree into
it and set the top's mode only once every file was placed: until then, and for good when the
session was killed midway, the files lay in the 0755 directory for every local user to read.
The directory is now closed (0700) before the first file is placed, and gets its own mode back
when the session ends. The reader here is a real process of another uid.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess

import pytest

from tests.helpers.cli import velo_text
from tests.helpers.unpriv import UNPRIV_UID, unpriv_tmpdir

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root to act as two users (the session's and a reader)"
)


def _velo(store: str, *args: str, fault: str = "") -> subprocess.CompletedProcess[str]:
    return velo_text(store, "--json", *args, fault=fault, timeout=120)


@pytest.mark.parametrize("end", ["killed", "whole"])
def test_a_shim_session_into_an_existing_directory_keeps_a_private_tree_private(
    end: str,
) -> None:
    with unpriv_tmpdir() as base:
        src, store, at = (os.path.join(base, n) for n in ("src", "store", "at"))
        os.mkdir(src)
        for i in range(5):
            with open(os.path.join(src, f"notes{i}"), "w") as f:
                f.write(f"private {i}\n")
            os.chmod(os.path.join(src, f"notes{i}"), 0o644)
        os.chmod(src, 0o700)
        assert _velo(store, "ingest", src, "--name", "t").returncode == 0
        os.mkdir(at)
        os.chmod(at, 0o755)
        run = ("run", "t", "--backend", "shim", "--at", at, "--")
        if end == "killed":
            p = _velo(store, *run, "true", fault="materialize.file:1")
            assert p.returncode == -9, p.stderr
            placed = [n for n in os.listdir(at) if n.startswith("notes")]
            assert placed, os.listdir(at)
            reader = ["setpriv", f"--reuid={UNPRIV_UID}", f"--regid={UNPRIV_UID}", "--clear-groups"]
            got = subprocess.run(
                [*reader, "cat", os.path.join(at, placed[0])], capture_output=True, text=True
            )
            assert got.returncode != 0, got.stdout  # old: "private N", through the 0755 --at
            assert "Permission denied" in got.stderr, got.stderr
            [sid] = [s["id"] for s in json.loads(_velo(store, "sessions").stdout)]
            resumed = _velo(store, "harvest", "--resume", sid)
            assert resumed.returncode == 0, resumed.stderr
        else:
            script = f"stat -c %a {at} > {base}/seen"  # the tree's own top mode, inside
            p = _velo(store, *run, "sh", "-c", script)
            assert p.returncode == 0, p.stderr
            with open(os.path.join(base, "seen")) as f:
                assert f.read().strip() == "700"
        assert os.listdir(at) == []
        assert stat.S_IMODE(os.lstat(at).st_mode) == 0o755  # the directory's own mode, back
