"""A session that made its target removes it at its end only when no other session is at it.

`run --at NEW` makes NEW and removes it when the session ends (test_made_target.py). It checked
for other sessions at NEW in its own store's state files only, then rmdir-ed NEW. An rmdir of a
directory that is a mount point in another mount namespace succeeds and detaches that mount: a
session of another store at NEW, or one of the same store that had found NEW but not yet saved
its state, lost its whole projection mid-run (its command saw NEW vanish). Every overlay session
now holds a shared flock on its target for as long as it projects there, and the removal takes
it exclusively (without waiting) or leaves the directory.

The steps are ordered with FIFOs (a command says it runs, then waits to be let go) and, for the
window before the state is saved, a stop at a fault point (SIGSTOP, seen by waitpid).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from tests.helpers.unpriv import unpriv_tmpdir
from tests.session._util import new_store

pytestmark = pytest.mark.needs("root", "overlay_root")


def _start(
    store: str, target: str, ready: str, go: str, *more: str, **env: str
) -> subprocess.Popen[bytes]:
    """A session at `target` whose command says it runs (writes `ready`), waits for `go`, then
    exits 0 only if the projection is still there (a file of the ref, and a new file named as
    `ready`)."""
    script = (
        f"echo up > {ready} && read x < {go} && "
        f"test -f {target}/f1 && echo new > {target}/{os.path.basename(ready)} && "
        f"test -f {target}/{os.path.basename(ready)}"
    )
    return subprocess.Popen(
        [sys.executable, "-m", "veloverlay", "run", "t", "--at", target, *more]
        + ["--", "sh", "-c", script],
        env={**os.environ, "VELO_STORE": store, "NO_COLOR": "1", **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,  # a failed test ends the session's command too (killpg)
    )


def _fifos(base: str, *names: str) -> list[str]:
    out = []
    for n in names:
        os.mkfifo(os.path.join(base, n))
        out.append(os.path.join(base, n))
    return out


def _wait_up(fifo: str) -> None:
    with open(fifo) as f:  # blocks until the command opened it for writing, and wrote
        assert f.read() == "up\n"


def _let_go(fifo: str) -> None:
    with open(fifo, "w") as f:
        f.write("go\n")


@pytest.fixture
def world() -> Iterator[dict[str, Any]]:
    procs: list[subprocess.Popen[bytes]] = []
    with unpriv_tmpdir() as base:
        parent = os.path.join(base, "parent")
        os.mkdir(parent)
        yield {"base": base, "target": os.path.join(parent, "proj"), "procs": procs}
        for p in procs:  # (the group may outlive its leader: a command still blocked)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.communicate(timeout=60)


def _ended(p: subprocess.Popen[bytes]) -> tuple[int, str]:
    _out, err = p.communicate(timeout=120)
    return p.returncode, err.decode(errors="replace")


def test_a_session_of_another_store_at_the_made_target_keeps_its_projection(
    world: dict[str, Any],
) -> None:
    base, target, procs = world["base"], world["target"], world["procs"]
    one, _ = new_store(os.path.join(base, "one"))
    two, _ = new_store(os.path.join(base, "two"))
    a_up, a_go, b_up, b_go = _fifos(base, "a_up", "a_go", "b_up", "b_go")
    procs.append(a := _start(os.fspath(one.root), target, a_up, a_go))
    _wait_up(a_up)  # A made the target and projects there
    procs.append(b := _start(os.fspath(two.root), target, b_up, b_go))
    _wait_up(b_up)  # B (another store) projects at the same directory
    _let_go(a_go)
    assert _ended(a)[0] == 0
    assert os.path.isdir(target)  # old: A removed it, and B's mount went with it
    _let_go(b_go)
    status, err = _ended(b)
    assert status == 0, err  # B's command still saw its tree, and its change was harvested
    assert os.listdir(target) == []  # nothing leaked onto the host directory


def test_a_session_between_finding_the_target_and_saving_its_state_keeps_it(
    world: dict[str, Any],
) -> None:
    base, target, procs = world["base"], world["target"], world["procs"]
    store, _ = new_store(os.path.join(base, "one"))
    a_up, a_go, b_up, b_go = _fifos(base, "a_up", "a_go", "b_up", "b_go")
    procs.append(a := _start(os.fspath(store.root), target, a_up, a_go))
    _wait_up(a_up)
    # B stops right after it found (and holds) the existing target: no state file yet
    procs.append(
        b := _start(
            os.fspath(store.root),
            target,
            b_up,
            b_go,
            **{"VELO_INTERNAL__TEST_FAULT": "session.target:1:STOP"},
        )
    )
    seen: list[tuple[int, int]] = []
    waiter = threading.Thread(target=lambda: seen.append(os.waitpid(b.pid, os.WUNTRACED)))
    waiter.start()
    waiter.join(timeout=120)  # a bound for a failure, not a pause: waitpid returns at the stop
    assert seen and os.WIFSTOPPED(seen[0][1]), seen
    _let_go(a_go)
    assert _ended(a)[0] == 0
    assert os.path.isdir(target)  # A's end left it: B holds it
    os.kill(b.pid, signal.SIGCONT)
    _wait_up(b_up)
    _let_go(b_go)
    status, err = _ended(b)
    assert status == 0, err


def test_a_shim_session_s_made_target_stays_while_an_overlay_session_projects_there(
    world: dict[str, Any],
) -> None:
    """The shim backend removes the target it made (after emptying its tree) by rmdir too: an
    overlay session at that directory lost its mount the same way."""
    base, target, procs = world["base"], world["target"], world["procs"]
    one, _ = new_store(os.path.join(base, "one"))
    two, _ = new_store(os.path.join(base, "two"))
    a_up, a_go, b_up, b_go = _fifos(base, "a_up", "a_go", "b_up", "b_go")
    procs.append(a := _start(os.fspath(one.root), target, a_up, a_go, "--backend", "shim"))
    _wait_up(a_up)  # A (shim) made the target and materialised its tree there
    procs.append(b := _start(os.fspath(two.root), target, b_up, b_go, "--backend", "overlay"))
    _wait_up(b_up)
    _let_go(a_go)
    status, err = _ended(a)
    assert status == 0, err
    assert os.path.isdir(target)  # old: A removed it, and B's mount went with it
    assert os.listdir(target) == []  # A's tree itself is gone from it
    _let_go(b_go)
    status, err = _ended(b)
    assert status == 0, err


def test_a_shim_session_that_found_the_made_target_keeps_it(world: dict[str, Any]) -> None:
    """The shim backend writes its tree into an existing empty target: one that found an
    overlay session's made target (empty on the host) lost it to that session's end before it
    wrote a file. It holds the target's lock from then on, as overlay sessions do."""
    base, target, procs = world["base"], world["target"], world["procs"]
    one, _ = new_store(os.path.join(base, "one"))
    two, _ = new_store(os.path.join(base, "two"))
    a_up, a_go, b_up, b_go = _fifos(base, "a_up", "a_go", "b_up", "b_go")
    procs.append(a := _start(os.fspath(one.root), target, a_up, a_go, "--backend", "overlay"))
    _wait_up(a_up)
    fault = {"VELO_INTERNAL__TEST_FAULT": "session.target:1:STOP"}
    procs.append(b := _start(os.fspath(two.root), target, b_up, b_go, "--backend", "shim", **fault))
    seen: list[tuple[int, int]] = []
    waiter = threading.Thread(target=lambda: seen.append(os.waitpid(b.pid, os.WUNTRACED)))
    waiter.start()
    waiter.join(timeout=120)  # a bound for a failure, not a pause: waitpid returns at the stop
    assert seen and os.WIFSTOPPED(seen[0][1]), seen
    _let_go(a_go)
    assert _ended(a)[0] == 0
    assert os.path.isdir(target)  # A's end left it: B holds it
    os.kill(b.pid, signal.SIGCONT)
    _wait_up(b_up)
    _let_go(b_go)
    status, err = _ended(b)
    assert status == 0, err
    assert os.listdir(target) == []  # B found it (it stays), and its tree went with it


def test_a_reader_holding_the_target_locked_does_not_stop_a_session_there(
    world: dict[str, Any],
) -> None:
    """Anyone who may open a directory may flock it: another user holding the target (a
    0755 project directory) exclusively made every session there fail with `locked`. The
    session goes on without the lock, says so, and its command runs and is harvested."""
    base, target, procs = world["base"], world["target"], world["procs"]
    store, _ = new_store(os.path.join(base, "one"))
    os.mkdir(target, 0o755)
    holder = subprocess.Popen(
        ["setpriv", "--reuid", "1500", "--regid", "1500", "--clear-groups", sys.executable, "-c"]
        + [
            "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY); "
            "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); sys.stdin.read()",
            target,
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    procs.append(holder)
    assert holder.stdout is not None and holder.stdout.readline() == b"held\n"
    r = subprocess.run(
        [sys.executable, "-m", "veloverlay", "run", "t", "--at", target, "--"]
        + ["sh", "-c", f"test -f {target}/f1 && echo new > {target}/made"],
        env={**os.environ, "VELO_STORE": os.fspath(store.root), "NO_COLOR": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr  # old: error ... holds the target ... locked
    assert "going on without its lock" in r.stderr
    assert os.listdir(target) == []  # the projection is gone, nothing leaked onto the host
    r = subprocess.run(
        [sys.executable, "-m", "veloverlay", "cat", "t", "made"],
        env={**os.environ, "VELO_STORE": os.fspath(store.root)},
        capture_output=True,
        text=True,
    )
    assert r.stdout == "new\n", r.stderr
