"""Processes of a shim session: the reaper that runs the command, the daemon process, and the
manager's wait between them (shim_backend.py drives them).

The reaper is a forked child subreaper: it runs the command with the shim's environment, learns
through a close-on-exec pipe whether the exec worked, waits for it, then SIGTERMs whatever is left
of its descendants, waits `grace`, SIGKILLs the rest and reports (exit status, killed) over a pipe
and in `reaper.json`. The daemon is a fresh interpreter (`python -m veloverlay.daemon`) in its own
session: a forked copy of this process would inherit its open LMDB environment, which LMDB forbids
using twice. The manager ignores SIGINT while it waits (Ctrl-C belongs to the command) and
restarts the daemon if it dies.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import select
import signal
import struct
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from . import projection
from .cas import Store
from .ns import child_subreaper, proc_start, reap_until, reclaim_terminal, shell_status
from .records import Record, field

__all__ = ["ShimStatus", "run_command", "start_daemon", "stop_daemon", "proc_start", "same_process"]

_DAEMON_RESTARTS = 5


class ShimStatus(Record):
    """What the manager learnt while the command ran."""

    exit_status: int = -1
    top_pid: int = 0
    killed: list[tuple[int, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    daemon_restarts: int = 0


def _save_state(store: Store, st: dict[str, Any]) -> None:
    projection._write_json_atomic(store.sessions / st["id"] / "state.json", st)


def same_process(pid: int, start: int | None) -> bool:
    return pid > 0 and start is not None and proc_start(pid) == start


def _children_of(root: int) -> list[int]:
    """Every live descendant of `root` (by /proc ppid chains)."""
    kids: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue
        rest = data[data.rfind(b")") + 2 :].split()
        if len(rest) < 2 or rest[0] == b"Z":
            continue
        kids.setdefault(int(rest[1]), []).append(int(name))
    out: list[int] = []
    todo = [root]
    while todo:
        for c in kids.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm", encoding="utf-8", errors="replace") as f:
            return f.read().strip()
    except OSError:
        return "?"


# --- the reaper (a forked child: plain os calls only) -------------------------------------------
def _send(fd: int, obj: dict[str, Any]) -> None:
    data = json.dumps(obj).encode()
    with contextlib.suppress(OSError):
        os.write(fd, struct.pack("<I", len(data)) + data)


def _kill_rest(grace: float) -> list[tuple[int, str]]:
    left = _children_of(os.getpid())
    if not left:
        return []
    killed = [(p, _comm(p)) for p in left]
    for p in left:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(p, signal.SIGTERM)
    deadline = time.monotonic() + max(grace, 0.0)
    while time.monotonic() < deadline:
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                pid = -1
            if pid <= 0:
                break
        if not _children_of(os.getpid()):
            return killed
        time.sleep(0.01)
    for p in _children_of(os.getpid()):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(p, signal.SIGKILL)
    while True:
        try:
            os.waitpid(-1, 0)
        except InterruptedError:
            continue
        except ChildProcessError:
            break
    return killed


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
    for sig in (signal.SIGINT, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_IGN)
    # A close-on-exec pipe says whether the exec worked: EOF = it did, an errno = it did not
    # (then no image ran, and its missing check-in is no sign of an unshimmed program).
    erd, ewr = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        for sig in (signal.SIGINT, signal.SIGQUIT, signal.SIGTERM, signal.SIGHUP, signal.SIGPIPE):
            signal.signal(sig, signal.SIG_DFL)
        os.close(wfd)
        os.close(erd)
        try:
            os.chdir(cwd)
            os.execvpe(argv[0], argv, env)
        except OSError as exc:
            os.write(ewr, str(exc.errno or 0).encode())
            os.write(2, f"veloverlay: {argv[0]}: {exc.strerror}\n".encode())
            os._exit(127 if exc.errno == errno.ENOENT else 126)
    os.close(ewr)
    exec_error = os.read(erd, 64)
    os.close(erd)
    _send(wfd, {"child": pid, "exec_failed": bool(exec_error)})
    code = shell_status(reap_until(pid))
    killed = _kill_rest(grace)
    report = {"exit": code, "killed": killed, "child": pid, "exec_failed": bool(exec_error)}
    with contextlib.suppress(OSError):
        projection._write_json_atomic(sdir / "reaper.json", report)
    _send(wfd, report)


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
def start_daemon(store: Store, st: dict[str, Any]) -> None:
    """Start `python -m veloverlay.daemon` in its own session (a fresh interpreter: a forked copy
    of this one would inherit its open LMDB environment, which LMDB forbids using twice)."""
    sdir = store.sessions / st["id"]
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
        "veloverlay.daemon",
        os.fspath(store.root),
        st["id"],
        str(os.getpid()),
    ]
    pid = os.posix_spawn(
        sys.executable,
        argv,
        env,
        file_actions=[
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
            (os.POSIX_SPAWN_OPEN, 1, log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600),
            (os.POSIX_SPAWN_DUP2, 1, 2),
        ],
        setsid=True,
    )
    st["daemon"] = pid
    st["daemon_start"] = proc_start(pid)


def stop_daemon(st: dict[str, Any], *, timeout: float = 5.0) -> None:
    pid = int(st.get("daemon") or 0)
    if pid <= 0:
        return
    if not same_process(pid, st.get("daemon_start")):
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


@contextlib.contextmanager
def _ignore_sigint() -> Iterator[None]:
    old = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGQUIT)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _read_frames(buf: bytearray) -> Iterator[dict[str, Any]]:
    while len(buf) >= 4:
        (n,) = struct.unpack_from("<I", buf)
        if len(buf) < 4 + n:
            return
        data = bytes(buf[4 : 4 + n])
        del buf[: 4 + n]
        with contextlib.suppress(ValueError):
            yield json.loads(data)


def run_command(
    store: Store,
    st: dict[str, Any],
    argv: list[str],
    env: dict[str, str],
    grace: float,
    *,
    interactive: bool = False,
) -> ShimStatus:
    sdir = store.sessions / st["id"]
    status = ShimStatus()
    rfd, wfd = os.pipe2(os.O_CLOEXEC)
    gofd, gowfd = os.pipe2(os.O_CLOEXEC)
    reaper = _fork(_reaper_main, argv, env, os.getcwd(), grace, wfd, (gofd, gowfd), sdir)
    os.close(wfd)
    os.close(gofd)
    try:
        st["child"] = reaper
        st["child_start"] = proc_start(reaper)
        _save_state(store, st)
        os.write(gowfd, b"g")
    finally:
        os.close(gowfd)  # unless "g" went first, the reaper reads EOF and exits, running nothing
    buf = bytearray()
    with _ignore_sigint():
        while True:
            try:
                ready, _w, _x = select.select([rfd], [], [], 0.25)
            except InterruptedError:
                continue
            if ready:
                chunk = os.read(rfd, 1 << 16)
                buf += chunk
                for msg in _read_frames(buf):
                    if "child" in msg and "exit" not in msg:
                        status.top_pid = 0 if msg.get("exec_failed") else int(msg["child"])
                        st["top_pid"] = status.top_pid
                        _save_state(store, st)
                    if "exit" in msg:
                        status.exit_status = int(msg["exit"])
                        status.killed = [(int(p), str(c)) for p, c in msg["killed"]]
                if not chunk:
                    break
            _watch_daemon(store, st, status)
    os.close(rfd)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(reaper, 0)
    if interactive:
        reclaim_terminal()
    return status


def _watch_daemon(store: Store, st: dict[str, Any], status: ShimStatus) -> None:
    pid = int(st.get("daemon") or 0)
    try:
        done, wstatus = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        done, wstatus = pid, 0
    if not done:
        return
    how = os.waitstatus_to_exitcode(wstatus) if done == pid and wstatus else 0
    if status.daemon_restarts >= _DAEMON_RESTARTS:
        if st.get("daemon"):
            status.warnings.append("the session daemon keeps dying; live view stopped")
            st["daemon"] = 0
        return
    status.daemon_restarts += 1
    status.warnings.append(
        f"the session daemon (pid {pid}) died ({'signal ' + str(-how) if how < 0 else how}); "
        "restarted — the journal kept every change in between"
    )
    start_daemon(store, st)
    _save_state(store, st)
