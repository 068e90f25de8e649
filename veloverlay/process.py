"""Process-level calls: prctl attributes (parent-death signal, no_new_privs, subreaper), a
process's start time, the terminal's foreground process group, reaping children and a wait status
as a shell reports it.

A kernel facility beside `ns.py` (namespaces and the forked-child runner), which sessions use
around it. Imports only the standard library; python-prctl's C module `_prctl` lazily.
"""

from __future__ import annotations

import os
import signal

__all__ = [
    "die_with_parent",
    "no_new_privs",
    "child_subreaper",
    "proc_start",
    "tty_foreground",
    "reclaim_terminal",
    "reap_until",
    "shell_status",
]


# --- process attributes (prctl) ---------------------------------------------------------------
# Through python-prctl's C interface `_prctl`: its Python wrapper `prctl` costs ~6 ms to import
# (it builds capability tables), a tenth of a session's whole start-up budget (measured).
def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """PR_SET_PDEATHSIG: receive `sig` when the parent thread exits."""
    import _prctl

    _prctl.prctl(_prctl.PR_SET_PDEATHSIG, sig)


def no_new_privs() -> None:
    """PR_SET_NO_NEW_PRIVS: no exec of this process or its children gains privileges."""
    import _prctl

    _prctl.prctl(_prctl.PR_SET_NO_NEW_PRIVS, 1)


def child_subreaper() -> None:
    """PR_SET_CHILD_SUBREAPER: orphaned descendants are reparented to this process."""
    import _prctl

    _prctl.prctl(_prctl.PR_SET_CHILD_SUBREAPER, 1)


def proc_start(pid: int) -> int | None:
    """A process's start time in clock ticks, or None if it is gone or a zombie. Compared with
    a recorded value, it tells a live process from a new one that reused its pid."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rfind(b")") + 2 :].split()
    try:
        return None if fields[0] == b"Z" else int(fields[19])
    except (IndexError, ValueError):
        return None


def tty_foreground() -> bool:
    """Stdin is a terminal whose foreground process group is ours (a shell may take it)."""
    try:
        return os.isatty(0) and os.tcgetpgrp(0) == os.getpgrp()
    except OSError:
        return False


def reclaim_terminal() -> None:
    """An interactive shell took the terminal's foreground; give it back to our group."""
    try:
        fd = os.open("/dev/tty", os.O_RDWR | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError:
        return
    old = signal.signal(signal.SIGTTOU, signal.SIG_IGN)
    try:
        if os.tcgetpgrp(fd) != os.getpgrp():
            os.tcsetpgrp(fd, os.getpgrp())
    except OSError:
        pass
    finally:
        signal.signal(signal.SIGTTOU, old)
        os.close(fd)


def reap_until(pid: int) -> int:
    """As a subreaper or pid 1: reap every child until `pid` exits; its wait status (0 when there
    is no child left to wait for)."""
    while True:
        try:
            got, status = os.waitpid(-1, 0)
        except InterruptedError:
            continue
        except ChildProcessError:
            return 0
        if got == pid:
            return status


def shell_status(status: int) -> int:
    """A wait status as a shell reports it: the exit code, or 128 + the signal that killed."""
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code
