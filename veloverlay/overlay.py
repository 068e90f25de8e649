"""The overlay of a session: which layers, which options, mounted how (plan, then execute).

Option policy (STYLE C4): always `userxattr` — sessions mount inside a user namespace, root
included (0->0), where trusted.* xattrs are out of reach, and the layers carry `user.overlay.*`
xattrs (metacopy/redirect, opaque, whiteouts); a userns-made layer read without `userxattr` loses
its opaque markers (measured). `mount.PINNED_OPTIONS` adds index=off, metacopy=off and
redirect_dir=nofollow: copy-ups are whole files, renaming a lower directory is EXDEV (tools copy +
delete, which harvest sees as delete + create). Data-only lowers are followed regardless.

This module is the only caller of `mount.overlay`. It also holds the session's process side,
which runs in forked children (DESIGN.md "Sessions" steps 3-5): `child_main` enters the
namespaces, mounts the overlay then binds the store read-only, and forks pid 1 (`_init_main`): a
fresh /proc, a nested user namespace that locks those mounts, the command, and the reaper that
ends leftovers (SIGTERM, grace, SIGKILL) and reports what it killed. The manager's side of that
conversation (`read_report`, `manager_signals`, the terminal) is here too; session.py plans,
harvests and commits.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from typing import Any

from . import mount, ns
from .errors import Reason, SysError, VeloError
from .projection import Lowers
from .records import Record

__all__ = [
    "OverlaySpec",
    "spec_for",
    "ChildSpec",
    "child_main",
    "read_report",
    "manager_signals",
]


class OverlaySpec(Record, frozen=True):
    lowers: tuple[str, ...]  # topmost first
    data_lowers: tuple[str, ...]
    upper: str
    work: str
    target: str
    userxattr: bool = True

    def describe(self) -> str:
        return (
            mount.legacy_options(
                lowers=self.lowers,
                data_lowers=self.data_lowers,
                upper=self.upper,
                work=self.work,
                userxattr=self.userxattr,
            )
            + f" on {self.target}"
        )

    def check(self) -> None:
        count = len(self.lowers) + len(self.data_lowers)
        if count > mount.OVL_MAX_STACK:
            raise VeloError(
                f"{count} layers exceed the kernel's limit of {mount.OVL_MAX_STACK}",
                reason=Reason.TOO_MANY_LAYERS,
            )

    def mount(self) -> mount.MountApi:
        """Mount on `target` (call inside the session's mount namespace)."""
        self.check()
        return mount.overlay(
            lowers=self.lowers,
            data_lowers=self.data_lowers,
            upper=self.upper,
            work=self.work,
            target=self.target,
            userxattr=self.userxattr,
        )


def spec_for(
    lowers: Lowers,
    *,
    upper: str | os.PathLike[str],
    work: str | os.PathLike[str],
    target: str | os.PathLike[str],
) -> OverlaySpec:
    return OverlaySpec(
        lowers=lowers.layers,
        data_lowers=lowers.data_layers,
        upper=os.fspath(upper),
        work=os.fspath(work),
        target=os.fspath(target),
    )


# --- the session's processes -------------------------------------------------------------------
class ChildSpec(Record):
    spec: OverlaySpec
    store_root: str
    readonly: list[str]  # more directories bound read-only (the per-boot layer cache)
    cwd: str
    argv: list[str]
    env: dict[str, str]
    as_root: bool
    net_none: bool
    grace: float
    report_fd: int
    manager_pid: int
    tty_foreground: bool  # stdin is a terminal whose foreground process group is ours


def _send(fd: int, obj: dict[str, Any]) -> None:
    data = json.dumps(obj).encode()
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _error_dict(exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, VeloError):
        return {"message": exc.message, "reason": exc.reason.value, "hint": exc.hint}
    if isinstance(exc, SysError):
        return {"message": str(exc), "reason": Reason.SYSCALL.value, "hint": exc.hint}
    return {"message": f"{type(exc).__name__}: {exc}", "reason": Reason.SYSCALL.value}


def child_main(ctx: ChildSpec) -> None:
    """The intermediate child: namespaces and mounts, then pid 1 of the new pid namespace."""
    ns.die_with_parent(signal.SIGKILL)
    if os.getppid() != ctx.manager_pid:  # the manager died before pdeathsig was armed
        os._exit(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGQUIT, signal.SIG_IGN)
    try:
        ns.enter_userns(map_root=ctx.as_root, net=ctx.net_none, pid=True)
        mount.make_rprivate("/")
        ctx.spec.mount()
        # Only now: a read-only store under the upper dir before the overlay mount would make
        # the overlay read-only (measured). The overlay keeps its own reference to the upper.
        mount.bind(ctx.store_root, ctx.store_root, readonly=True)
        for path in ctx.readonly:
            mount.bind(path, path, readonly=True)
        if ctx.net_none:
            ns.loopback_up()
    except BaseException as exc:  # noqa: BLE001 - reported to the manager
        with contextlib.suppress(OSError):
            _send(ctx.report_fd, {"error": _error_dict(exc)})
        os._exit(1)
    pid1 = os.fork()
    if pid1 == 0:
        try:
            _init_main(ctx)
        finally:
            os._exit(70)
    os.close(ctx.report_fd)
    while True:
        try:
            _, status = os.waitpid(pid1, 0)
            break
        except InterruptedError:
            continue
    os._exit(os.waitstatus_to_exitcode(status) & 0xFF if os.WIFEXITED(status) else 70)


_CHILD_SIGNALS = (
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


def _init_main(ctx: ChildSpec) -> None:
    """pid 1: /proc, lock the mounts, run the command, reap, clean up leftovers, report."""
    ns.die_with_parent(signal.SIGKILL)
    try:
        mount.mount_proc("/proc")
        # A nested user + mount namespace locks every mount made above (the kernel marks mounts
        # copied into a less privileged namespace MNT_LOCK_*): the command, root or not, can
        # neither remount the store writable nor unmount the overlay.
        ns.enter_userns(map_root=os.getuid() == 0)
        try:
            os.chdir(ctx.cwd)  # re-resolve: a cwd inside the target now means the overlay
        except OSError:
            os.chdir(ctx.spec.target)
        ns.no_new_privs()
    except BaseException as exc:  # noqa: BLE001
        with contextlib.suppress(OSError):
            _send(ctx.report_fd, {"error": _error_dict(exc)})
        os._exit(1)
    for sig in (signal.SIGINT, signal.SIGQUIT, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU):
        signal.signal(sig, signal.SIG_IGN)
    cmd = os.fork()
    if cmd == 0:
        try:
            if ctx.tty_foreground:
                # Its own process group in the terminal's foreground, numbered in this pid
                # namespace: Ctrl-C/Ctrl-Z reach it alone, and a shell that restores the
                # terminal's group on exit finds one it can see (else: ESRCH, exit 2).
                os.setpgid(0, 0)
                with contextlib.suppress(OSError):
                    os.tcsetpgrp(0, os.getpgrp())  # SIGTTOU is still ignored here
            for sig in _CHILD_SIGNALS:
                signal.signal(sig, signal.SIG_DFL)
            _close_fds_from(3)
            try:
                os.execvpe(ctx.argv[0], ctx.argv, ctx.env)
            except FileNotFoundError:
                sys.stderr.write(f"veloverlay: {ctx.argv[0]}: command not found\n")
                os._exit(127)
            except PermissionError:
                sys.stderr.write(f"veloverlay: {ctx.argv[0]}: permission denied\n")
                os._exit(126)
            except OSError as exc:
                sys.stderr.write(f"veloverlay: {ctx.argv[0]}: {exc.strerror}\n")
                os._exit(126)
        finally:
            os._exit(127)
    status = ns.reap_until(cmd)
    killed = _reap_rest(ctx.grace)
    code = ns.shell_status(status)
    with contextlib.suppress(OSError):
        _send(ctx.report_fd, {"status": code, "killed": killed})
    os._exit(0)


def _close_fds_from(low: int) -> None:
    os.closerange(low, os.sysconf("SC_OPEN_MAX") if os.sysconf("SC_OPEN_MAX") > 0 else 1 << 16)


def _list_procs() -> list[tuple[int, str]]:
    out: list[tuple[int, str]] = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or name == "1":
            continue
        try:
            with open(f"/proc/{name}/comm", encoding="utf-8", errors="replace") as f:
                out.append((int(name), f.read().strip()))
        except OSError:
            continue
    return sorted(out)


def _reap_all() -> bool:
    """Reap exited children without blocking; False once there are none left."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return False
        if pid == 0:
            return True


def _reap_rest(grace: float) -> list[tuple[int, str]]:
    if not _reap_all():
        return []
    left = _list_procs()
    if not left:
        return []
    with contextlib.suppress(ProcessLookupError):
        os.kill(-1, signal.SIGTERM)  # every process of this pid namespace but us
    deadline = time.monotonic() + max(grace, 0.0)
    while time.monotonic() < deadline:
        if not _reap_all():
            return left
        time.sleep(0.01)
    with contextlib.suppress(ProcessLookupError):
        os.kill(-1, signal.SIGKILL)
    while True:
        try:
            os.waitpid(-1, 0)
        except InterruptedError:
            continue
        except ChildProcessError:
            return left


# --- the manager side --------------------------------------------------------------------------
def read_report(rfd: int, pid: int) -> dict[str, Any]:
    """The session child's JSON report ({} when it died before writing one)."""
    raw = ns.read_until_exit(rfd, pid)
    if not raw:
        return {}
    try:
        data: dict[str, Any] = json.loads(raw)
    except ValueError:
        return {}
    return data


@contextlib.contextmanager
def manager_signals(child: list[int]) -> Iterator[None]:
    """Ctrl-C belongs to the session; SIGTERM/SIGHUP end it (then we harvest as usual)."""

    def stop(_sig: int, _frame: object) -> None:
        if child and child[0] > 0:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child[0], signal.SIGKILL)  # pid 1 follows (pdeathsig), then the ns

    old = {
        signal.SIGINT: signal.signal(signal.SIGINT, signal.SIG_IGN),
        signal.SIGQUIT: signal.signal(signal.SIGQUIT, signal.SIG_IGN),
        signal.SIGTERM: signal.signal(signal.SIGTERM, stop),
        signal.SIGHUP: signal.signal(signal.SIGHUP, stop),
    }
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
