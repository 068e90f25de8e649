"""`veloverlay mount` / `umount` end to end, as a user runs them (root): the projection on a host
path, changed by programs outside any session (renames of stored directories included), committed
by umount as a run would; a kill between unmount and commit recovered by `harvest --resume`;
refusals (busy, not mounted, root-free)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from tests.e2e.test_cli import data, failed, ok, velo
from tests.helpers.trees import make_tree
from tests.helpers.unpriv import mount_lines
from tests.session._util import compare_trees

pytestmark = pytest.mark.needs("root", "overlay_native")


@pytest.fixture(autouse=True)
def _no_mount_left(shm_tmp: str, own_mount_namespace: None) -> Iterator[None]:
    """Whatever a failing test left mounted under its temp dir goes before the dir does. Each
    test runs in a mount namespace of its own: a session another test starts meanwhile copies
    the host's, and would hold the projection mounted there (`own_mount_namespace`)."""
    yield
    for line in reversed(mount_lines()):
        point = line.split(" ", 1)[0]
        if point.startswith(shm_tmp):
            subprocess.run(["umount", "-l", point], check=False)


TREE = {
    "README": b"hello\n",
    "bin/tool": b"#!/bin/sh\necho hi\n",
    "lib/a/one": b"1\n",
    "lib/a/deep/two": b"2\n",
    "lib/b": b"b\n",
    "empty": None,
}


def _changes(root: str) -> None:
    """What another program does to the mounted projection (the same to a plain directory)."""
    os.rename(os.path.join(root, "lib/a"), os.path.join(root, "moved"))  # a stored directory
    os.rename(os.path.join(root, "moved/deep"), os.path.join(root, "deep2"))
    with open(os.path.join(root, "moved/new"), "w") as f:
        f.write("new\n")
    os.unlink(os.path.join(root, "lib/b"))
    os.chmod(os.path.join(root, "bin/tool"), 0o700)


def _setup(shm_tmp: str) -> tuple[str, str, str]:
    store = os.path.join(shm_tmp, "store")
    src, plain, at = (os.path.join(shm_tmp, d) for d in ("src", "plain", "at"))
    make_tree(src, TREE)
    ok(velo(store, "ingest", src, "--name", "t"))
    shutil.copytree(src, plain, symlinks=True)
    _changes(plain)
    return store, plain, at


def _sessions(store: str) -> dict[str, str]:
    return {s["id"]: s["state"] for s in data(velo(store, "sessions", "--json"))}


def test_mount_change_umount_commits(shm_tmp: str) -> None:
    store, plain, at = _setup(shm_tmp)
    before = mount_lines()
    mounted = data(velo(store, "mount", "t", at, "--json"))
    sid = mounted["session_id"]
    assert mounted["mode"] == "native" and mounted["state"] == "mounted"
    try:
        assert _sessions(store)[sid] == "mounted"
        with open(os.path.join(at, "lib/a/deep/two"), "rb") as f:
            assert f.read() == b"2\n"
        _changes(at)  # this process: the caller's mount namespace sees the projection
        failed(velo(store, "harvest", "--resume", sid, "--json"), "session-active")
        # busy: a process with its cwd inside keeps it mounted
        holder = subprocess.Popen(["sleep", "60"], cwd=at)
        try:
            failed(velo(store, "umount", at, "--json"), "session-active")
        finally:
            holder.kill()
            holder.wait()
    except BaseException:
        velo(store, "umount", at, "--discard")
        raise
    res = data(velo(store, "umount", at, "-m", "from mount", "--json"))
    assert res["commit"] and res["changed"] > 0
    assert mount_lines() == before  # nothing left mounted
    assert not os.path.lexists(at)  # made by `mount`, removed by `umount` (old: left, empty)
    assert _sessions(store)[sid] == "harvested"
    assert data(velo(store, "log", "t", "--json"))[0]["message"] == "from mount"
    got = os.path.join(shm_tmp, "got")
    ok(velo(store, "checkout", "t", got))
    assert compare_trees(got, plain, since_ns=0) == []
    failed(velo(store, "umount", at, "--json"), "session-not-found")
    assert data(velo(store, "fsck", "--json"))["ok"] is True


def test_diff_and_status_see_into_a_mounted_session(shm_tmp: str) -> None:
    """`diff --session ID` of a mounted session was refused ('mounted, not running', with a hint
    to read the log of what it committed: nothing yet), and `status` listed no changes for it.
    Both now show what the projection has changed so far, as a running session's."""
    from tests.e2e.test_cli import _expected_changes

    store = os.path.join(shm_tmp, "store")
    src, at = os.path.join(shm_tmp, "src"), os.path.join(shm_tmp, "at")
    make_tree(src, TREE)
    ok(velo(store, "ingest", src, "--name", "t"))
    sid = data(velo(store, "mount", "t", at, "--json"))["session_id"]
    try:
        with open(os.path.join(at, "README"), "ab") as f:
            f.write(b"more\n")
        with open(os.path.join(at, "lib/new"), "w") as f:
            f.write("new\n")
        os.unlink(os.path.join(at, "lib/b"))
        want = _expected_changes(src, at)  # the real trees: the source and the projection
        live = data(velo(store, "diff", "--session", sid, "--json"))
        [listed] = data(velo(store, "status", "--json"))["sessions"]
        stat = data(velo(store, "diff", "--session", sid, "--stat", "--json"))
    finally:
        velo(store, "umount", at, "--discard")
    assert {c["path"]: c["status"] for c in live} == want and len(want) == 3  # M, A, D
    assert listed["id"] == sid and {c["path"]: c["status"] for c in listed["changes"]} == want
    assert {c["path"]: (c["added"], c["removed"]) for c in stat}["README"] == (1, 0)


def test_kill_between_unmount_and_commit_is_resumed(shm_tmp: str) -> None:
    store, plain, at = _setup(shm_tmp)
    sid = data(velo(store, "mount", "t", at, "--json"))["session_id"]
    _changes(at)
    killed = velo(store, "umount", at, env={"VELO_INTERNAL__TEST_FAULT": "harvest.file:1"})
    assert killed.returncode == -signal.SIGKILL
    assert _sessions(store)[sid] == "dead-unharvested"
    assert sid not in mount_lines_text()
    resumed = data(velo(store, "harvest", "--resume", sid, "--json"))
    assert resumed[0]["commit"]
    got = os.path.join(shm_tmp, "got")
    ok(velo(store, "checkout", "t", got))
    assert compare_trees(got, plain, since_ns=0) == []


def test_unmounted_by_hand_is_resumed_and_discard_drops(shm_tmp: str) -> None:
    store, _plain, at = _setup(shm_tmp)
    sid = data(velo(store, "mount", "t", at, "--json"))["session_id"]
    _changes(at)
    subprocess.run(["umount", at], check=True)  # e.g. a reboot, or umount(8)
    assert _sessions(store)[sid] == "dead-unharvested"
    assert data(velo(store, "harvest", "--resume", sid, "--json"))[0]["commit"]
    sid2 = data(velo(store, "mount", "t", at, "--json"))["session_id"]
    with open(os.path.join(at, "scratch"), "w") as f:
        f.write("x")
    head = data(velo(store, "log", "t", "--json"))[0]["id"]
    assert data(velo(store, "umount", at, "--discard", "--json"))["commit"] is None
    assert data(velo(store, "log", "t", "--json"))[0]["id"] == head
    assert _sessions(store)[sid2] == "discarded"


def test_mount_is_refused_root_free(shm_tmp: str) -> None:
    store, _plain, at = _setup(shm_tmp)
    p = velo(store, "mount", "t", at, "--json", env={"VELO_OVERLAY_MODE": "userns"})
    failed(p, "backend-unavailable")
    assert not os.path.ismount(at)


def test_umount_refuses_a_mount_over_the_projection(shm_tmp: str) -> None:
    """umount(2) of the path would take the mount on top (here a tmpfs) and leave the overlay
    mounted while it is harvested: refused, nothing unmounted, and fine once it is gone."""
    store, plain, at = _setup(shm_tmp)
    sid = data(velo(store, "mount", "t", at, "--json"))["session_id"]
    _changes(at)
    subprocess.run(["mount", "-t", "tmpfs", "cover", at], check=True)
    try:
        failed(velo(store, "umount", at, "--json"), "target-invalid")
        kinds = [line.split(" - ")[1].split(" ")[0] for line in _lines_at(at)]
        assert kinds == ["overlay", "tmpfs"]
        assert _sessions(store)[sid] == "mounted"
    finally:
        subprocess.run(["umount", at], check=True)  # the tmpfs
    assert data(velo(store, "umount", at, "--json"))["commit"]
    got = os.path.join(shm_tmp, "got")
    ok(velo(store, "checkout", "t", got))
    assert compare_trees(got, plain, since_ns=0) == []


def test_a_bind_mount_of_the_projection_keeps_the_session_unharvested(shm_tmp: str) -> None:
    """A bind mount of the projection elsewhere in the same namespace writes the same upper dir:
    umount refuses while it exists (it used to unmount the target, harvest and delete the upper
    dir while the bind mount stayed writable), and a target unmounted by hand stays `mounted`,
    not resumable, until the bind mount is gone too. What was written through it is committed."""
    store, plain, at = _setup(shm_tmp)
    bound = os.path.join(shm_tmp, "bound")
    os.mkdir(bound)
    sid = data(velo(store, "mount", "t", at, "--json"))["session_id"]
    subprocess.run(["mount", "--bind", at, bound], check=True)
    try:
        _changes(bound)
        err = failed(velo(store, "umount", at, "--json"), "session-active")
        assert bound in err
        assert os.path.ismount(at) and _sessions(store)[sid] == "mounted"
        subprocess.run(["umount", at], check=True)  # the target, by hand: the bind lives on
        assert _sessions(store)[sid] == "mounted"
        assert data(velo(store, "harvest", "--all", "--json")) == []
        err = failed(velo(store, "harvest", "--resume", sid, "--json"), "session-active")
        assert bound in err
        with open(os.path.join(bound, "late"), "w") as f:  # still writes the session's tree
            f.write("late\n")
        with open(os.path.join(plain, "late"), "w") as f:
            f.write("late\n")
    finally:
        subprocess.run(["umount", bound], check=False)
    assert _sessions(store)[sid] == "dead-unharvested"
    assert data(velo(store, "harvest", "--resume", sid, "--json"))[0]["commit"]
    got = os.path.join(shm_tmp, "got")
    ok(velo(store, "checkout", "t", got))
    assert compare_trees(got, plain, since_ns=time.time_ns() - 10**10) == []


def test_propagated_copies_of_the_projection_go_with_it(shm_tmp: str) -> None:
    """Under a shared parent with a peer (a bind of a shared directory, common where / is
    shared), the mount propagates to the peer: not a bind mount of the projection to refuse,
    since umount unmounts both, then commits."""
    store, plain, _at = _setup(shm_tmp)
    top, peer = os.path.join(shm_tmp, "top"), os.path.join(shm_tmp, "peer")
    os.mkdir(top)
    os.mkdir(peer)
    subprocess.run(["mount", "--bind", top, top], check=True)
    try:
        subprocess.run(["mount", "--make-shared", top], check=True)
        subprocess.run(["mount", "--bind", top, peer], check=True)
        at = os.path.join(top, "at")
        os.mkdir(at)
        data(velo(store, "mount", "t", at, "--json"))
        assert os.path.ismount(os.path.join(peer, "at"))
        _changes(os.path.join(peer, "at"))
        assert data(velo(store, "umount", at, "--json"))["commit"]
        assert not os.path.ismount(at) and not os.path.ismount(os.path.join(peer, "at"))
    finally:
        subprocess.run(["umount", peer], check=False)
        subprocess.run(["umount", top], check=False)
    got = os.path.join(shm_tmp, "got")
    ok(velo(store, "checkout", "t", got))
    assert compare_trees(got, plain, since_ns=0) == []


def _wait_for_copy(pid: int, sid: str) -> None:
    """Until the process is in its own mount namespace and that namespace has the overlay."""
    while True:
        with contextlib.suppress(OSError):
            other = os.stat(f"/proc/{pid}/ns/mnt").st_ino != os.stat("/proc/self/ns/mnt").st_ino
            with open(f"/proc/{pid}/mountinfo", encoding="utf-8") as f:
                if other and f"/{sid}/upper" in f.read():
                    return
        os.sched_yield()


def test_a_copy_in_another_mount_namespace_keeps_the_session_unharvested(shm_tmp: str) -> None:
    """A namespace made while the projection was mounted (unshare -m, a container) holds a copy
    of the overlay: its upper dir can still be written there, so it is not harvested until the
    copy is gone, whether umount is asked first or the mount here is taken by hand."""
    store, plain, at = _setup(shm_tmp)
    sid = data(velo(store, "mount", "t", at, "--json"))["session_id"]
    _changes(at)
    holder = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sleep", "600"])
    try:
        _wait_for_copy(holder.pid, sid)
        p = velo(store, "umount", at, "--json")
        failed(p, "session-active")
        assert str(holder.pid) in p.stderr.decode()
        assert os.path.ismount(at) and _sessions(store)[sid] == "mounted"
        subprocess.run(["umount", at], check=True)  # here, by hand: the copy lives on
        assert _sessions(store)[sid] == "mounted"
        err = failed(velo(store, "harvest", "--resume", sid, "--json"), "session-active")
        assert "another mount namespace" in err
    finally:
        holder.kill()
        holder.wait()
    assert _sessions(store)[sid] == "dead-unharvested"
    assert data(velo(store, "harvest", "--resume", sid, "--json"))[0]["commit"]
    got = os.path.join(shm_tmp, "got")
    ok(velo(store, "checkout", "t", got))
    assert compare_trees(got, plain, since_ns=0) == []


# A process that opens a file of the projection in a copy of the mount namespace and comes back:
# the copy is gone (no process in it), the file's mount is detached, the fd still writes.
_DETACHED_WRITER = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
home = os.open("/proc/self/ns/mnt", os.O_RDONLY)
assert libc.unshare(0x00020000) == 0, ctypes.get_errno()
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_APPEND)
os.write(fd, b"a")
assert libc.setns(home, 0x00020000) == 0, ctypes.get_errno()
print("ready", flush=True)
sys.stdin.readline()
os.write(fd, b"b")
os.close(fd)
print("done", flush=True)
"""


def test_umount_waits_for_a_writer_whose_mount_is_gone(shm_tmp: str) -> None:
    """A file opened through a short-lived copy of the mount namespace keeps the overlay
    writable after every mount of it is gone, and umount(2) here does not see it (EBUSY comes
    only from this mount). umount makes the overlay read-only first, which does: refused while
    the file is open for writing, committed with every byte once it is closed."""
    store, plain, at = _setup(shm_tmp)
    sid = data(velo(store, "mount", "t", at, "--json"))["session_id"]
    _changes(at)
    writer = subprocess.Popen(
        [sys.executable, "-c", _DETACHED_WRITER, os.path.join(at, "README")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert writer.stdout is not None and writer.stdin is not None
        assert writer.stdout.readline() == b"ready\n"
        assert str(writer.pid) not in " ".join(map(str, _holder_namespaces(sid)))
        failed(velo(store, "umount", at, "--json"), "session-active")
        assert os.path.ismount(at) and _sessions(store)[sid] == "mounted"
        with open(os.path.join(at, "README"), "ab") as f:  # still writable here
            f.write(b"c")
        writer.stdin.write(b"go\n")
        writer.stdin.flush()
        assert writer.stdout.readline() == b"done\n"
    finally:
        writer.kill()
        writer.wait()
    assert data(velo(store, "umount", at, "--json"))["commit"]
    got = os.path.join(shm_tmp, "got")
    ok(velo(store, "checkout", "t", got))
    with open(os.path.join(got, "README"), "rb") as f:
        assert f.read() == b"hello\nacb"  # the writer's two appends, ours between them


def _holder_namespaces(sid: str) -> list[int]:
    """Pids whose mount namespace (other than ours) shows the session's overlay."""
    own = os.stat("/proc/self/ns/mnt").st_ino
    out = []
    for name in os.listdir("/proc"):
        with contextlib.suppress(OSError):
            if name.isdigit() and os.stat(f"/proc/{name}/ns/mnt").st_ino != own:
                with open(f"/proc/{name}/mountinfo", encoding="utf-8") as f:
                    if f"/{sid}/upper" in f.read():
                        out.append(int(name))
    return out


def _lines_at(at: str) -> list[str]:
    return [line for line in mount_lines() if line.split(" ", 1)[0] == at]


def mount_lines_text() -> str:
    return "\n".join(mount_lines())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__]))


@pytest.mark.parametrize("target", ["/proc", "/proc/sys", "/sys", "/proc/no-such-dir"])
def test_a_projection_on_a_kernel_interface_is_refused(shm_tmp: str, target: str) -> None:
    """`run --at` and `mount` on /proc, /sys or under them are refused before anything is
    mounted. Old code: `run --at /proc/sys` ran its command with the kernel's /proc/sys, not
    the tree (the session mounts its own /proc after the projection) and `mount` there hid the
    host's sysctls; `run --at /proc` failed saying "/ changed while it was opened: it now leads
    to ?"; `--at /proc/no-such-dir` was an os-error naming only "no-such-dir"."""
    store, _plain, _at = _setup(shm_tmp)
    before = mount_lines()
    # what the target shows: the kernel's own entries (/proc's pids come and go)
    listing = (
        sorted(n for n in os.listdir(target) if not n.isdigit()) if os.path.isdir(target) else None
    )
    mark = os.path.join(shm_tmp, "ran")
    err = failed(
        velo(store, "run", "t", "--at", target, "--json", "--", "touch", mark), "target-invalid"
    )
    assert f"the target {target} is on " in err, err  # named, with the filesystem it is on
    assert not os.path.exists(mark)  # the command never ran
    try:
        failed(velo(store, "mount", "t", target, "--json"), "target-invalid")
    finally:
        if mount_lines() != before:  # old code mounted it: take it away before the checks
            velo(store, "umount", target, "--discard")
    assert mount_lines() == before
    now = (
        sorted(n for n in os.listdir(target) if not n.isdigit()) if os.path.isdir(target) else None
    )
    assert now == listing
    assert all(s == "harvested" or s == "discarded" for s in _sessions(store).values())
