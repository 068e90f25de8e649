"""`holders` and `namespaces_holding` read a mount namespace's mounts from /proc/PID/mountinfo,
which shows only the mounts under PID's root. They read each namespace's table from its first
process: where that one had chrooted, a mount outside its root (an overlay copy that namespace
keeps alive) was in no table, and an overlay held there looked free — its harvest would go on
while the namespace could still write it. Now every distinct root of a namespace is read.

A tmpfs stands in for the overlay (the functions take the mount to look for as a predicate);
the real thing compared with: the namespace's mountinfo as its unchrooted process sees it."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from tests.helpers.trees import force_rmtree
from veloverlay import mountinfo
from veloverlay.session.holders import holders, namespaces_holding

pytestmark = pytest.mark.needs("root")


def _wait_for(path: str) -> str:
    deadline = time.monotonic() + 30
    while not (os.path.exists(path) and open(path).read().strip()):
        assert time.monotonic() < deadline, f"{path} never written"
        time.sleep(0.02)
    return open(path).read().strip()


def test_a_namespace_whose_first_process_chrooted_still_holds_its_mounts(shm_tmp: str) -> None:
    held, jail, child = (os.path.join(shm_tmp, n) for n in ("held", "jail", "child"))
    os.makedirs(held)
    for d in ("usr", "proc"):
        os.makedirs(os.path.join(jail, d))
    for link, to in (("bin", "usr/bin"), ("lib", "usr/lib"), ("lib64", "usr/lib64")):
        os.symlink(to, os.path.join(jail, link))
    # pid A (the namespace's first process) chroots into `jail`, where `held` is not; its child
    # B, started before, keeps the root and sees `held`
    script = (
        f"mount -t tmpfs velo-held {held} && mount --bind /usr {jail}/usr || exit 1\n"
        f"sleep 300 & echo $! > {child}; exec chroot {jail} sleep 300"
    )
    a = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c", script])
    b: int | None = None
    try:
        b = int(_wait_for(child))
        deadline = time.monotonic() + 30
        while os.stat(f"/proc/{a.pid}/root").st_ino == os.stat("/").st_ino:
            assert time.monotonic() < deadline, "the first process never chrooted"
            time.sleep(0.02)

        def ours(e: mountinfo.MountEntry) -> bool:
            return e.fstype == "tmpfs" and e.point == held

        # the real thing: the namespace has the mount (as B sees it), A's table does not show it
        assert any(ours(e) for e in mountinfo.mounts(b))
        assert not any(ours(e) for e in mountinfo.mounts(a.pid))
        assert a.pid < b  # A is the first of its namespace that a walk of /proc meets
        assert {a.pid, b} <= set(holders(ours))
        assert namespaces_holding(ours) == [a.pid]
        assert not any(ours(e) for e in mountinfo.mounts())  # nowhere else: not here
    finally:
        for pid in (a.pid, b):
            if pid is not None:
                os.kill(pid, signal.SIGKILL)
        a.wait(timeout=30)
        assert not os.path.ismount(os.path.join(jail, "usr"))  # (only in that namespace)
        force_rmtree(jail)
