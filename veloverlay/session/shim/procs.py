"""Processes of a shim session: the reaper that runs the command, the daemon process, and the
manager's wait between them (session/shim/backend.py drives them).

The reaper is a forked child subreaper that runs the command with the shim's environment through
the session reaper (session/reaper.py: exec check, wait, SIGTERM/grace/SIGKILL of what is left)
and also writes its report to `reaper.json`. The daemon is a fresh interpreter (`python -m
veloverlay.session.shim.daemon`) in its own session: a forked copy of this process would inherit
its open LMDB environment, which LMDB forbids using twice. The manager ignores SIGINT while it
waits (Ctrl-C belongs to the command) and restarts the daemon if it dies.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import signal
import sys
import time
from pathlib import Path
from typing import Any

from veloverlay.errors import SysError
from veloverlay.files import write_json_atomic
from veloverlay.process import child_subreaper, proc_start, reclaim_terminal
from veloverlay.records import Record, field
from veloverlay.session import reaper, state
from veloverlay.session.state import State, same_process
from veloverlay.store.cas import Store

__all__ = ["ShimStatus", "run_command", "start_daemon", "stop_daemon"]

_DAEMON_RESTARTS = 5


class ShimStatus(Record):
    """What the manager learnt while the command ran."""

    exit_status: int = -1
    top_pid: int = 0
    killed: list[tuple[int, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    daemon_restarts: int = 0


_LOG_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW  # never through a symlink


def _reaper_main(
    argv: list[str],
    env: dict[str, str],
    cwd: str,
    grace: float,
    wfd: int,
    go: tuple[int, int],
    sdir: Path,
) -> None:
    # The command starts only once the manager has recorded this reaper in state.json: a manager
    # killed before that leaves no command running that `resume` could not see (EOF: exit).
    os.close(go[1])
    if os.read(go[0], 1) != b"g":
        os._exit(0)
    os.close(go[0])
    with contextlib.suppress(Exception):
        child_subreaper()
    report = reaper.run_and_reap(argv, env, cwd=cwd, grace=grace, report_fd=wfd, close_fds=False)
    with contextlib.suppress(OSError):  # (a session directory removed meanwhile stays gone)
        write_json_atomic(sdir / "reaper.json", report, parents=False)


class NotStarted(Exception):
    """The session's reaper could not be made: no command ran (`error` says why)."""

    def __init__(self, error: SysError) -> None:
        super().__init__(str(error))
        self.error = error


def _fork(fn: Any, *args: Any) -> int:
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            fn(*args)
        except BaseException:  # noqa: BLE001 - a forked child never returns into the caller
            import traceback

            traceback.print_exc()
            code = 1
        finally:
            os._exit(code)
    return pid


# --- the daemon process --------------------------------------------------------------------------
def start_daemon(store: Store, st: State) -> None:
    """Start `python -m veloverlay.session.shim.daemon` in its own session (a fresh interpreter:
    a forked copy of this one would inherit its open LMDB environment, which LMDB forbids using
    twice)."""
    sdir = store.sessions / st.id
    env = dict(os.environ)
    env.pop("LD_PRELOAD", None)
    pkg_parent = os.fspath(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(
        [pkg_parent, *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]]
    )
    log = os.fspath(sdir / "daemon.log")
    argv = [
        sys.executable,
        "-m",
        "veloverlay.session.shim.daemon",
        os.fspath(store.root),
        st.id,
        str(os.getpid()),
    ]
    try:
        pid = os.posix_spawn(
            sys.executable,
            argv,
            env,
            file_actions=[
                (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                (os.POSIX_SPAWN_OPEN, 1, log, _LOG_FLAGS, 0o600),
                (os.POSIX_SPAWN_DUP2, 1, 2),
            ],
            setsid=True,
        )
    except OSError as exc:  # RLIMIT_NPROC
        raise SysError(exc.errno or errno.EAGAIN, "posix_spawn", sys.executable) from None
    st.daemon = pid
    st.daemon_start = proc_start(pid)


def stop_daemon(st: State, *, timeout: float = 5.0) -> None:
    pid = int(st.daemon or 0)
    if pid <= 0:
        return
    if not same_process(pid, st.daemon_start):
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            done = pid if proc_start(pid) is None else 0
        if done:
            return
        time.sleep(0.01)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def run_command(
    store: Store,
    st: State,
    argv: list[str],
    env: dict[str, str],
    grace: float,
    *,
    interactive: bool = False,
) -> ShimStatus:
    status = ShimStatus()
    try:
        cwd = os.getcwd()
    except OSError:  # deleted or moved away: the tree's root, as in an overlay session
        cwd = st.target_real or st.target
    forward = [0]  # where the manager's forwarded signals go (reaper.manager_signals)

    # SIGTERM/SIGHUP (kill, a closed terminal) and the other forwarded signals go to the
    # reaper, which passes them on to the command (SIGTERM: `grace` seconds, then SIGKILL), as in
    # an overlay session; the manager harvests when it is over. From before the fork: one that
    # comes meanwhile waits (reaper.held) instead of being lost.
    def force() -> None:  # a second SIGTERM: the command now (the reaper ends the rest)
        if status.top_pid and same_process(status.top_pid, top_start[0]):
            with contextlib.suppress(ProcessLookupError):
                os.kill(status.top_pid, signal.SIGKILL)

    top_start: list[int | None] = [None]
    with reaper.manager_signals(forward, force):
        reaper_pid, rfd = _start_reaper(store, st, argv, env, cwd, grace, forward)
        try:
            _wait_reaper(store, st, status, rfd, top_start)
        finally:
            os.close(rfd)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(reaper_pid, 0)
            forward[0] = 0
    if interactive:
        reclaim_terminal()
    return status


def _start_reaper(
    store: Store,
    st: State,
    argv: list[str],
    env: dict[str, str],
    cwd: str,
    grace: float,
    forward: list[int],
) -> tuple[int, int]:
    """Fork the reaper, record it, let it start the command; its pid and its report pipe."""
    sdir = store.sessions / st.id
    rfd, wfd = os.pipe2(os.O_CLOEXEC)
    gofd, gowfd = os.pipe2(os.O_CLOEXEC)
    try:
        with reaper.held():  # the reaper starts with them blocked, until the command runs
            reaper_pid = _fork(_reaper_main, argv, env, cwd, grace, wfd, (gofd, gowfd), sdir)
            forward[0] = reaper_pid
    except OSError as exc:  # RLIMIT_NPROC: nothing runs, the caller abandons the session
        for fd in (rfd, wfd, gofd, gowfd):
            os.close(fd)
        raise NotStarted(SysError(exc.errno or errno.EAGAIN, "fork")) from None
    os.close(wfd)
    os.close(gofd)
    try:
        st.child = reaper_pid
        st.child_start = proc_start(reaper_pid)
        state.save(store, st)
        os.write(gowfd, b"g")
    finally:
        os.close(gowfd)  # unless "g" went first, the reaper reads EOF and exits, running nothing
    return reaper_pid, rfd


def _wait_reaper(
    store: Store, st: State, status: ShimStatus, rfd: int, top_start: list[int | None]
) -> None:
    """Read the reaper's frames until it is done, watching the daemon meanwhile."""
    buf = bytearray()
    while True:
        try:
            ready, _w, _x = select.select([rfd], [], [], 0.25)
        except InterruptedError:
            continue
        if ready:
            chunk = os.read(rfd, 1 << 16)
            buf += chunk
            for msg in reaper.frames(buf):
                if "child" in msg and "exit" not in msg:
                    status.top_pid = 0 if msg.get("exec_failed") else int(msg["child"])
                    top_start[0] = proc_start(status.top_pid) if status.top_pid else None
                    st.top_pid = status.top_pid
                    state.save(store, st)
                if "exit" in msg:
                    status.exit_status = int(msg["exit"])
                    status.killed = [(int(p), str(c)) for p, c in msg["killed"]]
            if not chunk:
                return
        _watch_daemon(store, st, status)


def _watch_daemon(store: Store, st: State, status: ShimStatus) -> None:
    pid = int(st.daemon or 0)
    try:
        done, wstatus = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        done, wstatus = pid, 0
    if not done:
        return
    how = os.waitstatus_to_exitcode(wstatus) if done == pid and wstatus else 0
    if status.daemon_restarts >= _DAEMON_RESTARTS:
        if st.daemon:
            status.warnings.append("the session daemon keeps dying; live view stopped")
            st.daemon = 0
        return
    status.daemon_restarts += 1
    status.warnings.append(
        f"the session daemon (pid {pid}) died ({'signal ' + str(-how) if how < 0 else how}); "
        "restarted — the journal kept every change in between"
    )
    start_daemon(store, st)
    state.save(store, st)
