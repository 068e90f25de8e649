"""Writes from outside the session's pid namespace are never lost silently.

A process outside the session (here: one that opened a path through /proc/PID/root of a session
process, as a host tool or an fd passed out would) can keep the overlay writable after the
command has ended. The session seals the overlay read-only before it harvests: a write after
that fails with EROFS; a file still open for writing keeps the session `held` (nothing
committed, nothing dropped) until `harvest --resume` finds no holder.
Each scenario is compared with what the outside writer saw succeed.
"""

from __future__ import annotations

import errno
import os
import time

import pytest

from tests.session._util import as_mode, checkout_ref, fsck_ok, mode_params, new_store, run_session
from veloverlay import session
from veloverlay.errors import VeloError

# The command: say it runs, then wait (bounded) until the outside writer lets it go.
_WAIT = "touch ready; i=0; while [ ! -e go ] && [ $i -lt 2000 ]; do sleep 0.01; i=$((i+1)); done"


def _session_pid(sid_env: bytes) -> int:
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                if sid_env in f.read().split(b"\0"):
                    return int(name)
        except OSError:
            continue
    return 0


def _outsider(proj: str, hold_write: bool, to_parent: int, from_parent: int) -> None:
    """A process outside the session: find a session process, reach the projection through its
    /proc/PID/root, open a file for writing (or only the directory), let the command end; then
    do what the parent asks: b"h" create a file (the harvest is reading the upper dir now),
    b"e" write on to the open file and close it (the session has returned)."""
    deadline = time.monotonic() + 30
    dfd = -1
    while dfd < 0:
        assert time.monotonic() < deadline, "the session did not start"
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                with open(f"/proc/{name}/environ", "rb") as f:
                    if not any(e.startswith(b"VELO_SESSION=") for e in f.read().split(b"\0")):
                        continue
                # Held from here on, whatever that process does (it may be a short-lived one)
                cand = os.open(f"/proc/{name}/root{proj}", os.O_RDONLY | os.O_DIRECTORY)
            except OSError:
                continue
            try:
                os.stat("ready", dir_fd=cand)
            except OSError:
                os.close(cand)
                continue
            dfd = cand
            break
        time.sleep(0.01)
    fd = -1
    if hold_write:
        fd = os.open("out", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644, dir_fd=dfd)
        os.write(fd, b"a")
    os.close(os.open("go", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=dfd))
    os.write(to_parent, b"1")
    while (cmd := os.read(from_parent, 1)) == b"h":
        try:
            os.close(os.open("late", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=dfd))
            result = b"created"
        except OSError as exc:
            result = errno.errorcode.get(exc.errno or 0, "?").encode()
        os.write(to_parent, result.ljust(16))
    assert cmd == b"e"
    if fd >= 0:
        os.write(fd, b"b")  # not sealed: this write must reach the commit
        os.close(fd)
    os.close(dfd)
    os.write(to_parent, b"done".ljust(16))


def _scenario(base: str, hold_write: bool) -> dict[str, object]:
    from veloverlay.session.overlay import harvest

    store, _src = new_store(base)
    proj = os.path.join(base, "proj")
    up_r, up_w = os.pipe()
    down_r, down_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            _outsider(proj, hold_write, up_w, down_r)
            os._exit(0)
        except BaseException:
            import traceback

            traceback.print_exc()
            os.write(up_w, b"E")
            os._exit(1)
    out: dict[str, object] = {"during_harvest": None}
    real = harvest.harvest_upper
    started: list[bool] = []

    def outsider_started() -> None:
        if not started:
            assert os.read(up_r, 1) == b"1"
            started.append(True)

    def harvest_then_write(*args: object, **kw: object) -> object:
        got = real(*args, **kw)  # type: ignore[arg-type]
        if "outsider" in out:  # a harvest --resume, after the outsider is done
            return got
        outsider_started()
        os.write(down_w, b"h")  # the outsider writes now: after the walk, before the commit
        out["during_harvest"] = os.read(up_r, 16).decode().strip()
        return got

    harvest.harvest_upper = harvest_then_write  # type: ignore[assignment]  # a forked child
    try:
        res = run_session(store, ["t"], ["sh", "-c", f"cd {proj}; {_WAIT}"], at=proj, grace=0.5)
        out["run"] = ("returned", res.state)
    except VeloError as exc:
        out["run"] = ("raised", exc.reason.value)
    outsider_started()
    out["listed"] = [i.state for i in session.list_sessions(store)]
    os.write(down_w, b"e")
    out["outsider"] = os.read(up_r, 16).decode().strip()
    _, status = os.waitpid(pid, 0)
    out["outsider_exit"] = os.waitstatus_to_exitcode(status)
    out["listed_after"] = [i.state for i in session.list_sessions(store)]
    out["resumed"] = [(r.state, r.changed) for r in session.harvest_resume(store, None)]
    got = os.path.join(base, "got")
    checkout_ref(store, "t", got)
    out["out"] = open(os.path.join(got, "out"), "rb").read() if hold_write else None
    out["late"] = os.path.exists(os.path.join(got, "late"))
    out["fsck"] = fsck_ok(store)
    return out


@pytest.mark.parametrize("mode", mode_params("root", "native", "rootfree"))
def test_open_file_outside_keeps_the_session_held_until_closed(mode: str) -> None:
    from tests.helpers.unpriv import unpriv_tmpdir

    with unpriv_tmpdir() as base:
        r = as_mode(mode, _scenario, base, True)
    # The command ended while the outsider held "out" open for writing: nothing is harvested
    # while it can still write, and every byte it wrote (after the session ended, too) lands.
    assert r["run"] == ("raised", "session-active"), r
    assert r["listed"] == ["held"], r
    assert r["during_harvest"] is None, r  # nothing was harvested while it could write
    assert r["outsider"] == "done" and r["outsider_exit"] == 0, r
    assert r["listed_after"] == ["dead-unharvested"], r
    assert r["resumed"] == [("harvested", 3)], r  # ready, go (see _WAIT), out
    assert r["out"] == b"ab", r
    assert r["fsck"] == [], r


@pytest.mark.parametrize("mode", mode_params("root", "native", "rootfree"))
def test_write_after_the_seal_fails_loudly(mode: str) -> None:
    from tests.helpers.unpriv import unpriv_tmpdir

    with unpriv_tmpdir() as base:
        r = as_mode(mode, _scenario, base, False)
    # Only a directory was open: the seal succeeded, the session was harvested, and a file
    # created through that directory while the harvest ran fails (EROFS) instead of vanishing.
    assert r["run"] == ("returned", "harvested"), r
    assert r["during_harvest"] == "EROFS", r
    assert r["resumed"] == [] and r["late"] is False, r
    assert r["fsck"] == [], r
