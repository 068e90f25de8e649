"""A user who may only read a shared store cannot stop its owner's verbs through the lock.

The store lock and its gate were flock'd, and flock needs no write access: another user of a
shared store opened `lock` and `lock.gate` read-only, as its readers do, took them
exclusively, and every verb of the owner (`tag`, `cat`, `gc`) waited for as long as that user
liked (found by holding `flock -x` on both as uid 1500 and running `veloverlay tag` as root:
it never ended). They are open-file-description locks now, whose exclusive (write) form needs
the file open for writing. The most a reader can do is hold them shared, as a `cat` into a
pager does: gc then gives up after its --timeout, and the other verbs go on.

The other user is a real process of another uid; every step waits until the process started
has finished or waits for a lock (/proc/locks), or for the other user's line on a pipe."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.helpers.races import settle
from tests.helpers.trees import make_tree
from tests.helpers.unpriv import UNPRIV_GID, UNPRIV_UID, unpriv_tmpdir
from veloverlay.ingest import ingest
from veloverlay.verbs.repo import Repo

_HOSTILE = r"""
import fcntl, json, os, struct, sys
store, how = sys.argv[1], sys.argv[2]
out = {}
fds = []
names = ("lock", "lock.gate")
if how == "remote":
    names = ("remote-v1/sha256-v1", "remote-v1/versions.lock")
for name in names:
    try:
        os.close(os.open(os.path.join(store, name), os.O_RDWR))
        out[name + " rw"] = "opened"
    except OSError as exc:
        out[name + " rw"] = exc.errno
    fd = os.open(os.path.join(store, name), os.O_RDONLY)
    fds.append(fd)
    if how in ("exclusive", "remote"):
        for what, call in (
            ("flock", lambda: fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)),
            ("ofd", lambda: fcntl.fcntl(fd, 37, struct.pack("@hhqqi4x", 1, 0, 0, 0, 0))),
            ("posix", lambda: fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)),
        ):
            try:
                call()
                out[name + " " + what] = "held"
            except OSError as exc:
                out[name + " " + what] = exc.errno
    else:
        fcntl.fcntl(fd, 37, struct.pack("@hhqqi4x", 0, 0, 0, 0, 0))
        out[name + " ofd-shared"] = "held"
print(json.dumps(out), flush=True)
sys.stdin.read()
"""


def _store(base: str) -> str:
    store = os.path.join(base, "store")
    src = os.path.join(base, "src")
    make_tree(src, {"small.txt": b"small\n"})
    repo = Repo.open(store, create=True, shared=True)
    try:
        ingest(repo.store, repo.m, src, "t", jobs=1)
    finally:
        repo.close()
    return store


def _as_reader(store: str, how: str) -> tuple[subprocess.Popen[str], dict[str, object]]:
    proc = subprocess.Popen(
        ["setpriv", f"--reuid={UNPRIV_UID}", f"--regid={UNPRIV_GID}", "--clear-groups"]
        + ["env", "-i", "PATH=/usr/bin:/bin", sys.executable, "-c", _HOSTILE, store, how],
        cwd="/",
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line, proc.communicate()
    return proc, json.loads(line)


def _verb(store: str, *args: str) -> subprocess.Popen[str]:
    """`veloverlay --json ARGS` by the store's owner, once it has finished or waits for the
    lock or the gate."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "veloverlay", "--json", *args],
        env={**os.environ, "VELO_STORE": store, "NO_COLOR": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    return settle(proc, os.path.join(store, "lock"), os.path.join(store, "lock.gate"))


def _finished(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    if proc.poll() is None:  # it waits for the other user's lock
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"{proc.args} waits for the reader's lock: {err}")
    out, err = proc.communicate()
    return proc.returncode, out, err


def test_a_reader_cannot_take_the_store_lock_exclusively() -> None:
    with unpriv_tmpdir() as base:
        store = _store(base)
        reader, tried = _as_reader(store, "exclusive")
        try:
            # the reader could open both files only to read, and lock them only as flock
            assert tried["lock rw"] == tried["lock.gate rw"] == 13, tried  # EACCES
            assert tried["lock ofd"] == tried["lock.gate ofd"] == 9, tried  # EBADF
            assert tried["lock posix"] == tried["lock.gate posix"] == 9, tried
            rc, out, err = _finished(_verb(store, "tag", "v1", "t"))
            assert rc == 0, err
            rc, out, err = _finished(_verb(store, "cat", "t", "small.txt"))
            assert (rc, out) == (0, "small\n"), err
            rc, out, err = _finished(_verb(store, "gc", "--grace", "0", "--timeout", "60"))
            assert rc == 0, err
        finally:
            reader.communicate("")
        assert reader.returncode == 0, reader.stderr


def test_a_reader_holding_the_lock_shared_keeps_gc_out_for_its_timeout_only() -> None:
    with unpriv_tmpdir() as base:
        store = _store(base)
        reader, tried = _as_reader(store, "shared")
        try:
            assert tried == {
                "lock rw": 13,
                "lock ofd-shared": "held",
                "lock.gate rw": 13,
                "lock.gate ofd-shared": "held",
            }, tried
            gc = _verb(store, "gc", "--grace", "0", "--timeout", "1")
            out, err = gc.communicate(timeout=120)  # it waits for the reader, 1 s at most
            assert gc.returncode == 1, (out, err)
            failure = json.loads(out)
            assert failure["reason"] == "locked", failure
            assert f"held by pid {reader.pid} (" in failure["error"], failure
            rc, out, err = _finished(_verb(store, "tag", "v1", "t"))
            assert rc == 0, err
            rc, out, err = _finished(_verb(store, "cat", "t", "small.txt"))
            assert (rc, out) == (0, "small\n"), err
        finally:
            reader.communicate("")
        assert reader.returncode == 0, reader.stderr


_REMOTE_NOTES = r"""
import sys
from veloverlay.remote.state import ShaMap, Versions
from veloverlay.store.cas import Store
store = Store.open(sys.argv[1])
ShaMap(store).add({bytes([int(sys.argv[2])]) * 32: "sha256:" + "ab" * 32})
Versions(store).set("registry.example", "t", "repo", "sha256:" + "cd" * 32, None)
"""


def _remote_notes(store: str, n: int) -> subprocess.Popen[str]:
    """The owner's push or pull noting what it sent or got (remote-v1/), once finished or
    waiting for a lock on one of those files."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _REMOTE_NOTES, store, str(n)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    notes = os.path.join(store, "remote-v1")
    return settle(proc, os.path.join(notes, "sha256-v1"), os.path.join(notes, "versions.lock"))


def test_a_reader_cannot_stop_push_and_pull_from_noting_what_they_moved() -> None:
    """push and pull note the sha256 of the objects they move and the versions they pushed or
    pulled in remote-v1/ under an exclusive flock: a reader of the shared store took it first
    and they waited for ever (found as the store lock was). A write lock now."""
    with unpriv_tmpdir() as base:
        store = _store(base)
        rc, _out, err = _finished(_remote_notes(store, 1))  # the files exist
        assert rc == 0, err
        reader, tried = _as_reader(store, "remote")
        try:
            assert tried["remote-v1/sha256-v1 rw"] == 13, tried  # it may only read them
            assert tried["remote-v1/sha256-v1 flock"] == "held", tried
            assert tried["remote-v1/versions.lock flock"] == "held", tried
            rc, _out, err = _finished(_remote_notes(store, 2))
            assert rc == 0, err
        finally:
            reader.communicate("")
        assert reader.returncode == 0, reader.stderr
        from veloverlay.remote.state import ShaMap
        from veloverlay.store.cas import Store

        got = ShaMap(Store.open(store))
        assert got.get(bytes([2]) * 32) == "sha256:" + "ab" * 32


_RECORD_HOLDER = r"""
import fcntl, json, os, struct, sys
store = sys.argv[1]
out = {}
record = os.path.join(store, "manifests.record")
held = [os.open(record, os.O_RDONLY), os.open(record, os.O_RDONLY)]
fcntl.flock(held[0], fcntl.LOCK_EX | fcntl.LOCK_NB)  # what flock lets anyone who may read do
out["flock"] = "held"
fcntl.fcntl(held[1], 37, struct.pack("@hhqqi4x", 0, 0, 0, 0, 0))  # an OFD read lock, as well
out["ofd-shared"] = "held"
try:
    os.open(os.path.join(store, "manifests.record.lock"), os.O_RDONLY)
    out["lock file"] = "opened"
except OSError as exc:
    out["lock file"] = exc.errno
print(json.dumps(out), flush=True)
sys.stdin.read()
"""


def test_a_reader_cannot_stop_the_owner_from_making_refs() -> None:
    """A commit that makes or removes a ref writes the store record (`manifests.record`, which
    every user of a shared store may read, for fsck) under an exclusive flock of that very file:
    a reader holding `flock -x manifests.record` made the owner's ingest of a new ref wait for
    ever (found by trying it as uid 1500). The writers lock a file of the owner's alone now."""
    with unpriv_tmpdir() as base:
        store = _store(base)
        _finished(_verb(store, "ingest", os.path.join(base, "src"), "-n", "u"))  # the files exist
        src2 = os.path.join(base, "src2")
        make_tree(src2, {"other.txt": b"other\n"})
        holder = subprocess.Popen(
            ["setpriv", f"--reuid={UNPRIV_UID}", f"--regid={UNPRIV_GID}", "--clear-groups"]
            + ["env", "-i", "PATH=/usr/bin:/bin", sys.executable, "-c", _RECORD_HOLDER, store],
            cwd="/",
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert holder.stdout is not None
            line = holder.stdout.readline()
            assert line, holder.communicate()
            tried = json.loads(line)
            assert tried["flock"] == tried["ofd-shared"] == "held", tried
            assert tried["lock file"] != "opened", tried  # the owner's alone (none: old code)
            record = os.path.join(store, "manifests.record")
            for verb in (["ingest", src2, "-n", "new"], ["gc", "--grace", "0"]):
                proc = subprocess.Popen(
                    [sys.executable, "-m", "veloverlay", "--json", *verb],
                    env={**os.environ, "VELO_STORE": store, "NO_COLOR": "1"},
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
                rc, _out, err = _finished(settle(proc, record, record + ".lock"))
                assert rc == 0, (verb, err)
            rc, out, err = _finished(_verb(store, "cat", "new", "other.txt"))
            assert (rc, out) == (0, "other\n"), err
        finally:
            holder.communicate("")
        assert holder.returncode == 0, holder.stderr
