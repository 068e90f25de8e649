"""The overlay session's processes, in forked children (DESIGN.md "Sessions" steps 3-5).

`child_main` enters the namespaces, mounts the overlay, then binds the store read-only, and forks
pid 1 (`_init_main`): a fresh /proc, a nested user namespace that locks those mounts, then the
command under the session reaper (session/reaper.py), which ends leftovers and reports. When
pid 1 has ended, `child_main` seals the overlay (read-only: `overlay.seal`) and reports that too:
the manager harvests only a sealed overlay, or one that nothing holds any more.
"""

from __future__ import annotations

import os
import signal

from veloverlay import _libc, mount, mountinfo, ns, process
from veloverlay.overlay import OverlaySpec, pin_root, seal
from veloverlay.records import Record
from veloverlay.session import reaper

__all__ = ["ChildSpec", "child_main"]


class ChildSpec(Record):
    spec: OverlaySpec
    store_root: str
    readonly: list[str]  # more directories bound read-only (the per-boot layer cache)
    also_at: list[str]  # more paths that show the projection (the ingest path, see relocation)
    cwd: str
    argv: list[str]
    env: dict[str, str]
    as_root: bool
    native: bool  # root-native: mount in the initial user namespace (trusted.overlay.*)
    lock: bool  # pid 1 enters a user namespace that locks the mounts (False: none available)
    net_none: bool
    grace: float
    report_fd: int
    manager_pid: int
    tty_foreground: bool  # stdin is a terminal whose foreground process group is ours


def child_main(ctx: ChildSpec) -> None:
    """The intermediate child: namespaces and mounts, then pid 1 of the new pid namespace."""
    process.die_with_parent(signal.SIGKILL)
    if os.getppid() != ctx.manager_pid:  # the manager died before pdeathsig was armed
        os._exit(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGQUIT, signal.SIG_IGN)
    try:
        if ctx.native:
            # Real root: a private mount namespace of the initial user namespace, where the
            # overlay may use trusted.overlay.* and redirect_dir=on (directory renames work).
            ns.enter_mountns(net=ctx.net_none, pid=True)
        else:
            ns.enter_userns(map_root=ctx.as_root, net=ctx.net_none, pid=True)
        mount.make_rprivate("/")
        # On the directory the manager chose, not on whatever its path leads to by now (another
        # user owning a directory on the way could swap in a symlink).
        target_fd = mount.pin_dir(ctx.spec.target)
        try:
            ctx.spec.mount(target_fd)
            # From here on the projection is this descriptor, never the target's path again.
            root_fd = pin_root(ctx.spec, target_fd)
        finally:
            os.close(target_fd)
        root = f"/proc/self/fd/{root_fd}"
        for path in ctx.also_at:  # the source stays as it is; its path shows the projection
            # Pinned as the target is: the source's owner may have made its path a symlink
            # since the manager resolved it (the bind would then cover where that leads).
            alias_fd = mount.pin_dir(path)
            try:
                mount.bind(root, f"/proc/self/fd/{alias_fd}")
            finally:
                os.close(alias_fd)
        # Only now: a read-only store under the upper dir before the overlay mount would make
        # the overlay read-only (measured). The overlay keeps its own reference to the upper.
        mount.bind(ctx.store_root, ctx.store_root, readonly=True)
        for path in ctx.readonly:
            mount.bind(path, path, readonly=True)
        if ctx.net_none:
            ns.loopback_up()
        # pid 1's user namespace (the lock) gets root's maps from here, not from a helper
        maps = ns.ParentMaps() if ctx.lock else None
    except BaseException as exc:  # noqa: BLE001 - reported to the manager
        reaper.send(ctx.report_fd, reaper.error_frame(exc))
        os._exit(1)
    pid1 = os.fork()  # (the manager's forwarded signals are still blocked: see reaper.held)
    if pid1 == 0:
        try:
            _init_main(ctx, maps, root_fd)
        finally:
            os._exit(70)
    reaper.relay_to(pid1)
    if maps is not None:
        maps.serve(pid1)
    status = ns.wait_child(pid1)
    # Every process of the pid namespace is gone; one outside it may still write (nsenter
    # without --pid, an fd passed out): make the overlay read-only before the manager harvests.
    # By the descriptor, as "." (/proc is pid 1's by now, where this process has no "self").
    os.fchdir(root_fd)
    why = seal(".", ctx.grace)
    os.chdir("/")  # before the report: the manager counts what still holds the overlay
    os.close(root_fd)
    reaper.send(ctx.report_fd, {"sealed": why is None, "seal_error": why})
    os._exit(os.waitstatus_to_exitcode(status) & 0xFF if os.WIFEXITED(status) else 70)


def _init_main(ctx: ChildSpec, maps: ns.ParentMaps | None, root_fd: int) -> None:
    """pid 1: /proc, lock the mounts, run the command, reap, clean up leftovers, report."""
    process.die_with_parent(signal.SIGKILL)
    try:
        mount.mount_proc("/proc")
        # A nested user + mount namespace locks every mount made above (the kernel marks mounts
        # copied into a less privileged namespace MNT_LOCK_*): the command, root or not, can
        # neither remount the store writable nor unmount the overlay. Root-native sessions made
        # their mounts in the initial user namespace; this is where they get locked too.
        if maps is not None:
            ns.enter_userns(map_root=os.getuid() == 0, parent=maps)
        _enter_cwd(ctx, root_fd)
        os.close(root_fd)
        process.no_new_privs()
        # The command is root in this user namespace (root sessions): while pid 1 is dumpable
        # it may open /proc/1/fd/N, pid 1's report pipe, and forge the manager's frames (an
        # `error` one made the manager drop the session's work). Non-dumpable, those files need
        # CAP_SYS_PTRACE where pid 1's memory was made (the initial namespace). The command's
        # own exec makes it dumpable again.
        _libc.set_dumpable(on=False)
        before = mountinfo.mount_ids()
    except BaseException as exc:  # noqa: BLE001
        reaper.send(ctx.report_fd, reaper.error_frame(exc))
        os._exit(1)
    reaper.run_and_reap(
        ctx.argv,
        ctx.env,
        cwd=None,
        grace=ctx.grace,
        report_fd=ctx.report_fd,
        tty_foreground=ctx.tty_foreground,
    )
    covered = _mounted_over([ctx.spec.target, *ctx.also_at], before)
    if covered:
        reaper.send(ctx.report_fd, {"covered": covered})
    os._exit(0)


def _mounted_over(tops: list[str], before: set[int] | None) -> list[str]:
    """Where the command mounted something (a tmpfs, a bind) at or under the projection in this
    namespace: what it wrote there never reached the upper dir, so the harvest cannot see it.
    Read after the command and its leftovers have ended, while the namespace still exists."""
    if before is None or mountinfo.mount_ids() == before:
        return []
    try:
        entries = mountinfo.mounts()
    except OSError:
        return []
    roots = [t.rstrip("/") for t in tops]
    out: list[str] = []
    for e in entries:
        if e.mnt_id in before or e.point in out:
            continue
        if any(e.point == r or e.point.startswith(r + "/") for r in roots):
            out.append(e.point)
    return out


def _enter_cwd(ctx: ChildSpec, root_fd: int) -> None:
    """The caller's working directory, re-resolved: one inside the target now means the same
    place in the projection, reached from its root's descriptor (the path outside belongs to the
    tree's owner, who can make it lead elsewhere); anything else by its path, as the caller had
    it. Where that is gone, the projection's root."""
    target = ctx.spec.target.rstrip("/")
    rel = os.path.relpath(ctx.cwd, target) if ctx.cwd.startswith(target + "/") else None
    try:
        if ctx.cwd == ctx.spec.target or rel is not None:
            os.fchdir(root_fd)
            if rel is not None:
                os.chdir(rel)
        else:
            os.chdir(ctx.cwd)
    except OSError:
        os.fchdir(root_fd)
