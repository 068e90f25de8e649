"""A session started after `fsck --repair` set aside an object its version needs says
`object-missing` at its start, not at its first read.

fsck --repair moves a corrupt object out of its name and drops every cached layer, but keeps
the layers a live session has mounted. A second session of that version found those layers
cached and mounted them without a look at the objects: the session ran, and its command read
`No such file or directory` for a file its tree lists (found by running `run t` while another
session of `t` was live, after a repair). The start of a cached stack now checks it against the
objects set aside (veloverlay/lower/stacks.py `_refuse_set_aside`).

The first session is live until the test writes its stdin; it says it is up on stdout."""

from __future__ import annotations

import os
import select
import subprocess
import sys

import pytest

from tests.helpers.trees import make_tree
from veloverlay import fsflags
from veloverlay.ingest import ingest
from veloverlay.store.digest import hash_bytes
from veloverlay.verbs.repo import Repo


def _velo(store: str, env: dict[str, str], *args: str, **kw: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "veloverlay", *args],
        env={**os.environ, **env, "VELO_STORE": store, "NO_COLOR": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,  # type: ignore[arg-type]
    )


def _corrupt(path: str) -> None:
    """Change an object's bytes behind the store's back (as a disk fault does)."""
    immutable = fsflags.is_immutable(path)
    if immutable:
        fsflags.set_immutable(path, False)
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        f.write(b"J")
    os.chmod(path, 0o444)
    if immutable:
        fsflags.set_immutable(path, True)


@pytest.mark.needs("root", "overlay_root")
@pytest.mark.parametrize("lower", ["auto", "links"])
@pytest.mark.parametrize("version", ["same", "next"])
def test_a_session_after_repair_says_object_missing_at_its_start(
    shm_tmp: str, lower: str, version: str
) -> None:
    """`next`: the live session commits a new file when it ends, and the later session's
    version is a delta layer on the cached stack (which names the object set aside)."""
    store, src = os.path.join(shm_tmp, "store"), os.path.join(shm_tmp, "src")
    make_tree(src, {"a.txt": b"hello\n", "b.txt": b"other\n"})
    repo = Repo.open(store, create=True)
    try:
        ingest(repo.store, repo.m, src, "t", jobs=1)
        obj = os.fspath(repo.store.object_path(hash_bytes(b"hello\n")))
    finally:
        repo.close()
    env = {"VELO_FORCE_LOWER": "links"} if lower == "links" else {}
    at1, at2 = os.path.join(shm_tmp, "at1"), os.path.join(shm_tmp, "at2")
    write = f"echo new > {at1}/c.txt" if version == "next" else "true"
    script = f"echo up; read x; {write}"
    live = _velo(
        store, env, "run", "t", "--at", at1, "--", "sh", "-c", script, stdin=subprocess.PIPE
    )
    try:
        assert live.stdout is not None
        up, _w, _x = select.select([live.stdout], [], [], 300)  # a bound, not a pace
        assert up and live.stdout.readline() == "up\n", "the first session did not start"
        _corrupt(obj)
        fsck = _velo(store, {}, "--json", "fsck", "--repair")
        _o, err = fsck.communicate(timeout=300)
        assert fsck.returncode == 1 and "set aside" in _o + err, (_o, err)
        if version == "next":  # it ends and commits c.txt: t's next version
            _o, err = live.communicate("\n", timeout=300)
            assert live.returncode == 0, err
        cat = ["cat", os.path.join(at2, "a.txt")]
        later = _velo(store, env, "--json", "run", "t", "--at", at2, "--", *cat)
        out, err = later.communicate(timeout=300)
        assert later.returncode == 1, (out, err)
        assert "reason: object-missing" in err, err
        assert "No such file" not in err, err  # it did not get as far as running the command
    finally:
        if live.returncode is None:
            _o, err = live.communicate("\n", timeout=300)
    assert live.returncode == 0, err
    if version == "next":
        repo = Repo.open(store)
        try:
            assert len(repo.log("t")) == 2  # the delta case: t moved on
        finally:
            repo.close()
    with open("/proc/self/mountinfo") as f:
        assert shm_tmp not in f.read()
