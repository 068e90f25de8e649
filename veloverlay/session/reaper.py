"""The session reaper and the manager <-> reaper protocol, one of each for both backends.

The reaper is the process that runs the session's command: pid 1 of the overlay session's pid
namespace, or a child subreaper of the shim session's manager. Either way every process the
command leaves behind ends up as its descendant (orphans are reparented to it). `run_and_reap`
starts the command (posix_spawn, which says whether the exec worked; or, to hand it the terminal
or another directory, a fork that says so through a close-on-exec pipe), waits for it, then
ends what is left (`end_rest`: SIGTERM to every descendant, `grace` seconds, SIGKILL, reap) and
returns the report. Signals sent to the session's manager are passed on to the command (see
FORWARDED below); SIGTERM/SIGHUP also give it `grace` seconds before SIGKILL.

Wire format (reaper -> manager, one pipe): frames of `u32 length` + a JSON object. The reaper
sends `{"child": pid, "exec_failed": bool}` once the command's exec is settled (pid 0: no
process was left by a failed spawn), then the final
`{"exit": status, "killed": [[pid, comm], ...], "child": pid, "exec_failed": bool}`; a session
that could not start sends `{"error": {"message", "reason", "hint"}}`.

Everything here runs in forked children or the manager: plain os calls, no threads.
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
from collections.abc import Callable, Iterator
from typing import Any

from veloverlay import _libc, ns, process
from veloverlay.errors import Reason, SysError, VeloError

__all__ = [
    "send",
    "frames",
    "read_until_exit",
    "error_frame",
    "descendants",
    "end_rest",
    "run_and_reap",
    "manager_signals",
    "finishing",
    "held",
    "relay_to",
    "FORWARDED",
    "ENDING",
    "IGNORED",
]

_HEADER = struct.Struct("<I")

# Signals the reaper ignores or handles that the command must get back at their defaults.
CHILD_SIGNALS = (
    signal.SIGINT,
    signal.SIGQUIT,
    signal.SIGTSTP,
    signal.SIGTTIN,
    signal.SIGTTOU,
    signal.SIGPIPE,
    signal.SIGCHLD,
    signal.SIGTERM,
    signal.SIGHUP,
)


# --- the wire ------------------------------------------------------------------------------------
def send(fd: int, obj: dict[str, Any]) -> None:
    """Write one frame (errors ignored: a manager that is gone reads nothing anyway)."""
    data = json.dumps(obj).encode()
    view = memoryview(_HEADER.pack(len(data)) + data)
    with contextlib.suppress(OSError):
        while view:
            view = view[os.write(fd, view) :]


def frames(buf: bytearray) -> Iterator[dict[str, Any]]:
    """The complete frames at the start of `buf` (consumed); a partial one stays."""
    while len(buf) >= _HEADER.size:
        (n,) = _HEADER.unpack_from(buf)
        if len(buf) < _HEADER.size + n:
            return
        data = bytes(buf[_HEADER.size : _HEADER.size + n])
        del buf[: _HEADER.size + n]
        with contextlib.suppress(ValueError):
            obj = json.loads(data)
            if isinstance(obj, dict):
                yield obj


def read_until_exit(rfd: int, pid: int) -> list[dict[str, Any]]:
    """Every frame the reaper side sent, read until EOF or until `pid` (a child) has exited."""
    return list(frames(bytearray(ns.read_until_exit(rfd, pid))))


def error_frame(exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, VeloError):
        err = {"message": exc.message, "reason": exc.reason.value, "hint": exc.hint}
    elif isinstance(exc, SysError):
        err = {"message": str(exc), "reason": Reason.SYSCALL.value, "hint": exc.hint}
    else:
        err = {"message": f"{type(exc).__name__}: {exc}", "reason": Reason.SYSCALL.value}
    return {"error": err}


# --- ending what the command left ---------------------------------------------------------------
def descendants(root: int) -> list[int]:
    """Every live (not zombie) descendant of `root`, by the ppid chains in /proc."""
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


def _reap_exited() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid <= 0:
            return


def end_rest(grace: float) -> list[tuple[int, str]]:
    """End every descendant still running: SIGTERM, up to `grace` seconds, SIGKILL; reap them.
    Returns (pid, comm) of each process that was running when the command exited. After an
    ending signal (see `_to_command`) they share the grace that was left."""
    _reap_exited()
    me = os.getpid()
    left = descendants(me)
    if not left:
        return []
    killed = [(p, _comm(p)) for p in sorted(left)]
    for p in left:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(p, signal.SIGTERM)
    deadline = time.monotonic() + max(grace, 0.0)
    if _ENDING.deadline is not None:  # the session was told to end: only what is left of it
        deadline = min(deadline, _ENDING.deadline)
    while time.monotonic() < deadline:
        _reap_exited()
        if not descendants(me):
            return killed
        time.sleep(0.01)
    # SIGKILL until none is left (one could fork between listing and killing).
    while rest := descendants(me):
        for p in rest:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(p, signal.SIGKILL)
        _reap_exited()
        time.sleep(0.001)
    while True:
        try:
            os.waitpid(-1, 0)
        except InterruptedError:
            continue
        except ChildProcessError:
            return killed


# --- signals: the manager passes them on, the reaper gives them to the command ------------------
# What `kill`, `docker stop`, a closed terminal or a supervisor sends to the manager is meant for
# the session's command: each is passed on (manager -> the overlay session's namespace child ->
# pid 1 -> the command; manager -> the shim's reaper -> the command), as an init such as tini
# does. Their default action would have ended the manager silently, the session unharvested.
FORWARDED = (
    signal.SIGHUP,
    signal.SIGTERM,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGALRM,
    signal.SIGWINCH,
    signal.SIGVTALRM,
    signal.SIGPROF,
    signal.SIGIO,
    signal.SIGPWR,
    *range(signal.SIGRTMIN, signal.SIGRTMAX + 1),
)
# These end the session: the command gets `grace` seconds, then SIGKILL; a second one to the
# manager, at once (the manager counts them: the reaper may get one twice, see `_to_command`).
ENDING = (signal.SIGHUP, signal.SIGTERM)
# Never meant for the command, and the manager must outlive them: resource limits of the
# manager's own (SIGXCPU, SIGXFSZ), a reader of its output gone (SIGPIPE), SIGSTKFLT.
IGNORED = (signal.SIGXCPU, signal.SIGXFSZ, signal.SIGPIPE, signal.SIGSTKFLT)


@contextlib.contextmanager
def held(sigs: tuple[int, ...] = FORWARDED) -> Iterator[None]:
    """Block `sigs` (they stay pending) while a child is forked: the child starts with them
    blocked and unblocks them once its own handlers are in place, so none is lost between."""
    me = os.getpid()
    old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    try:
        yield
    finally:
        if os.getpid() == me:  # (the child keeps them blocked: see `relay_to`)
            signal.pthread_sigmask(signal.SIG_SETMASK, old)


def relay_to(target: int) -> None:
    """In a forked child that `held` blocked: pass every forwarded signal on to `target` from
    now on, and unblock them (those that came meanwhile are passed on now)."""

    def relay(sig: int, _frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(target, sig)

    for sig in FORWARDED:
        signal.signal(sig, relay)
    for sig in IGNORED:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)


@contextlib.contextmanager
def manager_signals(
    child: list[int] | None = None, force: Callable[[], None] | None = None
) -> Iterator[None]:
    """While the session runs, Ctrl-C and Ctrl-\\ belong to the session, not the manager. With
    `child` (a one-element list, filled once forked under `held`), the forwarded signals go to
    that child, which passes them on to the command; once it is 0 again (ended), they are
    dropped. A second ending signal calls `force` (end the command now). The manager never
    dies of one of them, nor of the IGNORED ones."""
    endings = [0]

    def forward(sig: int, _frame: object) -> None:
        if sig in ENDING and child and child[0] > 0:
            endings[0] += 1
            if endings[0] > 1 and force is not None:
                force()
                return
        if child and child[0] > 0:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child[0], sig)

    old = {
        signal.SIGINT: signal.signal(signal.SIGINT, signal.SIG_IGN),
        signal.SIGQUIT: signal.signal(signal.SIGQUIT, signal.SIG_IGN),
    }
    if child is not None:
        for sig in IGNORED:
            old[sig] = signal.signal(sig, signal.SIG_IGN)
        for sig in FORWARDED:
            old[sig] = signal.signal(sig, forward)
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def finishing() -> Iterator[None]:
    """From the command's start until the session is harvested and committed: a forwarded
    signal that comes once the command has ended has no one to go to and is dropped, so that
    the harvest finishes (one killed halfway is resumed later; SIGKILL still does that)."""
    old = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (*FORWARDED, *IGNORED)}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


class _Ending:
    """The reaper's view of a forwarded ending signal (one reaper per process)."""

    grace = 5.0
    command = 0  # the command's pid while it runs
    deadline: float | None = None  # when an ending signal came: until when the command may run


_ENDING = _Ending()


def _to_command(sig: int, _frame: object) -> None:
    if sig in ENDING:
        if _ENDING.deadline is not None:
            # Passed on once: the reaper gets the same signal twice when it was sent to a whole
            # process group or cgroup (a closed terminal, systemd's stop) and relayed as well,
            # and the command got that one itself already.
            return
        _ENDING.deadline = time.monotonic() + _ENDING.grace
    if _ENDING.command > 0:
        with contextlib.suppress(ProcessLookupError):
            os.kill(_ENDING.command, sig)


def _on_child(_sig: int, _frame: object) -> None:
    """SIGCHLD: nothing to do here; the wakeup pipe makes the reaper's wait look again."""


def _reaper_signals(grace: float) -> int:
    """Install the reaper's handlers (forwarded signals go to the command once it runs); return
    the read end of a pipe that every signal writes to (Python's wakeup fd)."""
    _ENDING.grace = grace
    rfd, wfd = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    signal.set_wakeup_fd(wfd, warn_on_full_buffer=False)
    signal.signal(signal.SIGCHLD, _on_child)
    for sig in FORWARDED:
        signal.signal(sig, _to_command)
    for sig in IGNORED:
        signal.signal(sig, signal.SIG_IGN)
    return rfd


def _wait_command(pid: int, wake: int) -> int:
    """Reap every child until the command (`pid`) exits; its wait status. After an ending
    signal, the command gets until the deadline (or nothing, after a second one): then SIGKILL."""
    poller = select.poll()
    poller.register(wake, select.POLLIN)
    killed = False
    while True:
        while True:
            try:
                got, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                _ENDING.command = 0
                return 0
            if got == pid:
                _ENDING.command = 0
                return status
            if got == 0:
                break
        timeout: float | None = None
        if _ENDING.deadline is not None and not killed:
            left = _ENDING.deadline - time.monotonic()
            if left <= 0:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                killed = True
            else:
                timeout = left
        poller.poll(None if timeout is None else max(1, int(timeout * 1000) + 1))
        with contextlib.suppress(OSError):
            while os.read(wake, 512):
                pass


# --- running the command -------------------------------------------------------------------------
def _exec_child(
    argv: list[str],
    env: dict[str, str],
    cwd: str | None,
    ewr: int,
    *,
    tty_foreground: bool,
    close_fds: bool,
) -> None:
    if tty_foreground:
        # Its own process group in the terminal's foreground: Ctrl-C/Ctrl-Z reach it alone, and
        # a shell that restores the terminal's group on exit finds one it can see.
        os.setpgid(0, 0)
        with contextlib.suppress(OSError):
            os.tcsetpgrp(0, os.getpgrp())  # SIGTTOU is still ignored here
    for sig in CHILD_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, ())  # (the reaper holds the forwarded ones)
    if close_fds:  # nothing of the session machinery leaks in (the exec pipe closes on exec)
        limit = os.sysconf("SC_OPEN_MAX")
        os.closerange(3, ewr)
        os.closerange(ewr + 1, limit if limit > 0 else 1 << 16)
    try:
        if cwd is not None:
            os.chdir(cwd)
        if not argv[0]:  # (see _spawn)
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT))
        os.execvpe(argv[0], argv, env)
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in an argument
        err = exc if isinstance(exc, OSError) else OSError(errno.EINVAL, str(exc))
        os.write(ewr, str(err.errno or 0).encode())
        os._exit(_exec_failed(err, argv, env))


def _exec_failed(exc: OSError, argv: list[str], env: dict[str, str]) -> int:
    """Say on stderr why `argv` could not be executed; the exit status a shell would give."""
    err = exc.errno
    if err in (errno.EACCES, errno.EPERM) and "/" not in argv[0] and not _on_path(argv[0], env):
        # execvp reports EACCES when a PATH directory was unreadable, though the command is
        # in none of them: that is "not found" (127), as shells say
        err = errno.ENOENT
    if err == errno.ENOENT:
        sys.stderr.write(f"veloverlay: {argv[0]}: {not_found(argv[0], env)}\n")
    elif err in (errno.EACCES, errno.EPERM):
        hits = [argv[0]] if "/" in argv[0] else _path_hits(argv[0], env)
        what = "is a directory" if hits and os.path.isdir(hits[0]) else "permission denied"
        sys.stderr.write(f"veloverlay: {argv[0]}: {what}\n")
    else:
        sys.stderr.write(f"veloverlay: {argv[0]}: {exc.strerror}\n")
    sys.stderr.flush()
    return 127 if err == errno.ENOENT else 126


def _spawn_ready(close_fds: bool) -> bool:
    """With `close_fds`, mark every descriptor above stderr close-on-exec (nothing of the
    session machinery leaks into the command); False where the kernel cannot (before 5.11)."""
    if close_fds:
        try:
            _libc.cloexec_from(3)
        except SysError:
            return False
    return True


def _spawn(argv: list[str], env: dict[str, str]) -> int:
    """Start the command with posix_spawn, searching PATH as `os.execvpe` does; raise the
    exec's error. glibc spawns with vfork semantics: no copy of this process's page tables,
    which a fork of a session's pid 1 (a Python process) spends ~1 ms on (measured)."""
    if not argv[0]:  # names no command: 127, as a shell says (posix_spawn: ValueError, 126)
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT))
    if os.path.dirname(argv[0]):
        candidates = [argv[0]]
    else:
        candidates = [os.path.join(d, argv[0]) for d in os.get_exec_path(env)]
    first_error: OSError | None = None
    last_error: OSError = FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT))
    for path in candidates:
        # A PATH entry without the command costs a stat here, not a process: each failed
        # posix_spawn is a vfork, a child and a wait (eight of them before /usr/bin/true on a
        # PATH with ~/.cargo/bin and pyenv shims first). The exec would say the same ENOENT
        # or ENOTDIR; any other answer (EACCES on a directory, ELOOP) is left to the exec.
        try:
            os.stat(path)
        except (FileNotFoundError, NotADirectoryError) as exc:
            last_error = OSError(exc.errno, exc.strerror)
            continue
        except (OSError, ValueError):  # ValueError: a NUL byte (posix_spawn says EINVAL)
            pass
        try:
            return os.posix_spawn(path, argv, env, setsigdef=CHILD_SIGNALS, setsigmask=())
        except ValueError as exc:  # a NUL byte in an argument or the environment
            raise OSError(errno.EINVAL, str(exc)) from None
        except OSError as exc:
            last_error = exc
            if exc.errno not in (errno.ENOENT, errno.ENOTDIR) and first_error is None:
                first_error = exc
    raise first_error or last_error


def _path_hits(cmd: str, env: dict[str, str]) -> list[str]:
    dirs = (env.get("PATH") or os.defpath).split(":")
    return [p for p in (os.path.join(d or ".", cmd) for d in dirs) if os.path.lexists(p)]


def _on_path(cmd: str, env: dict[str, str]) -> bool:
    return bool(_path_hits(cmd, env))


def not_found(cmd: str, env: dict[str, str]) -> str:
    """Say what is missing when exec of `cmd` is ENOENT: the command itself, or (it exists) the
    interpreter its `#!` line names, e.g. a venv script whose tree was projected away from the
    path baked into it."""
    path = cmd
    if not cmd:
        return "command not found"
    if "/" not in cmd:
        hits = _path_hits(cmd, env)
        if not hits:
            return "command not found (not in PATH)"
        path = hits[0]
    if not os.path.lexists(path):
        return "command not found (no such file)"
    try:
        with open(path, "rb") as f:
            head = f.read(256)
    except OSError:
        head = b""
    if head.startswith(b"#!"):
        words = head[2:].split(b"\n", 1)[0].split()
        if words:
            interp = os.fsdecode(words[0])
            if not os.path.exists(interp):
                return f"its interpreter {interp} (named by its #! line) does not exist"
            if os.path.basename(interp) == "env" and len(words) > 1:
                prog = os.fsdecode(words[1])
                return f"its #! line runs '{prog}' through env, and {prog} is not in PATH"
    if head.startswith(b"\x7fELF"):
        return "its program interpreter (the dynamic loader named in the ELF file) does not exist"
    if os.path.islink(path) and not os.path.exists(path):
        return f"it is a symbolic link to {os.readlink(path)}, which does not exist"
    return "not found"


def run_and_reap(
    argv: list[str],
    env: dict[str, str],
    *,
    cwd: str | None,
    grace: float,
    report_fd: int,
    tty_foreground: bool = False,
    close_fds: bool = True,
) -> dict[str, Any]:
    """Run the command, wait for it, end what it left; send the frames above, return the final
    report. Call in the reaper process (it must be the command's parent). `close_fds=False`
    passes the caller's other descriptors on to the command (the shim session does)."""
    for sig in (signal.SIGINT, signal.SIGQUIT, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU):
        signal.signal(sig, signal.SIG_IGN)
    # Forwarded signals (SIGTERM from `kill` of the manager...) stay pending until the command's
    # pid is known; then they go to it (see `_to_command`).
    signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)
    wake = _reaper_signals(grace)
    if not tty_foreground and cwd is None and _spawn_ready(close_fds):
        # No terminal to hand over and no directory to change to: posix_spawn does the rest.
        try:
            pid = _spawn(argv, env)
        except OSError as exc:
            code = _exec_failed(exc, argv, env)
            send(report_fd, {"child": 0, "exec_failed": True})
            signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)
            report = {"exit": code, "killed": end_rest(grace), "child": 0, "exec_failed": True}
            send(report_fd, report)
            return report
        return _reap_command(pid, False, grace, report_fd, wake)
    # A close-on-exec pipe says whether the exec worked: EOF = it did, an errno = it did not
    # (then no image ran: for the shim, its missing check-in is no sign of an unshimmed program).
    erd, ewr = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the command's process
        try:
            os.close(erd)
            os.close(report_fd)
            _exec_child(argv, env, cwd, ewr, tty_foreground=tty_foreground, close_fds=close_fds)
        finally:
            os._exit(127)
    os.close(ewr)
    exec_error = os.read(erd, 64)
    os.close(erd)
    return _reap_command(pid, bool(exec_error), grace, report_fd, wake)


def _reap_command(
    pid: int, exec_failed: bool, grace: float, report_fd: int, wake: int
) -> dict[str, Any]:
    send(report_fd, {"child": pid, "exec_failed": exec_failed})
    _ENDING.command = pid
    signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)
    code = process.shell_status(_wait_command(pid, wake))
    killed = end_rest(grace)
    report = {"exit": code, "killed": killed, "child": pid, "exec_failed": exec_failed}
    send(report_fd, report)
    return report
