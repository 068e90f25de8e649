"""`veloverlay mount` / `umount`: a session whose overlay is on a path of the caller's mount
namespace, for tools that are not one command (a systemd unit, a container runtime's bind mount,
a CI step, an external test suite).

Real root only, root-native mode only: a mount in the caller's namespace is a mount in the
initial user namespace, so it uses trusted.overlay.* layers and `redirect_dir=on` like any
root-native session (session/select.py). What differs from `run`:

* No namespaces and no pid 1: every process of the caller's namespace sees the projection, and
  nothing locks the mount or binds the store read-only (that would change the host's view of the
  store). Root can unmount it or write the store; P0-a rests on `chattr +i` of every object the
  layers reference (reported as the session's protection) and on `fsck`.
* The session's state is `mounted` (listed by `sessions`) from before the mount until `umount`
  unmounts it (never lazily: a process still holding a file would write into an upper dir being
  harvested; EBUSY says so) and harvests and commits like the end of a `run`. A state `mounted`
  whose overlay is gone (a reboot, a plain umount(8), a kill between the unmount and the harvest)
  shows as `dead-unharvested` and `harvest --resume` finishes it. Gone means gone everywhere: a
  copy in another mount namespace (unshare -m after the mount), or a bind mount of the projection
  on another path here, still writes the upper dir.
* Root acts on directories, not paths it resolved earlier (another user may own a directory on
  the way): the target is pinned by an fd and mounted on; umount checks that the mount on the
  path is this overlay (not one mounted over it) and unmounts through the pinned parent.

Root-free users have no way to put an overlay on a host path; `run REF -- sleep infinity` (or
`enter`) and `nsenter --target PID --mount --user` into that session give other processes the
projection (docs/sessions.md).
"""

from __future__ import annotations

import os
import time

from veloverlay import mount, mountinfo, overlay, pathtrust
from veloverlay.errors import Reason, SysError, VeloError
from veloverlay.session import state
from veloverlay.session.holders import namespaces_holding
from veloverlay.session.options import SessionOptions, SessionResult
from veloverlay.session.overlay.backend import (
    _drop_upper,
    _finish,
    _new_state,
    _Plan,
    _prepare,
)
from veloverlay.session.select import Choice
from veloverlay.session.target import remove_made_target
from veloverlay.store.cas import Store
from veloverlay.store.manifest import Manifests

__all__ = ["mount_session", "umount_session"]


def mount_session(store: Store, opts: SessionOptions, choice: Choice) -> SessionResult:
    """Mount the projection of `opts.refs` on `opts.at` in this mount namespace; record it."""
    if not opts.at:
        raise VeloError("mount needs a directory to mount on", reason=Reason.USAGE)
    choice.raise_error()
    if choice.backend != "overlay" or choice.mode != "native":
        why = choice.mode_reason or choice.backend_reason
        raise VeloError(
            f"veloverlay mount needs real root and a root-native overlay: {why}",
            reason=Reason.BACKEND_UNAVAILABLE,
            hint="root-free: 'veloverlay run REF -- sleep infinity' and nsenter into that "
            "session, or 'veloverlay enter REF' (docs/sessions.md)",
        )
    target = pathtrust.realpath_safe(opts.at, Reason.TARGET_INVALID)
    for other in state.iter_states(store):
        if other.state == "mounted" and other.mounted_at == target and _here(other) is not None:
            raise VeloError(
                f"session {other.id} is already mounted on {target}",
                reason=Reason.SESSION_ACTIVE,
                hint=f"veloverlay umount {target}",
            )
    opts.at = target
    target_fd = -1
    plan: _Plan | None = None
    m = Manifests(store)
    try:
        with store.lock():  # until the state pins the layers' roots (see backend.run_session)
            plan = _prepare(store, m, opts, choice)
            if plan.lowers.immutable:
                plan.protection = "immutable"  # +i on every object; the store is not bound ro
            else:
                plan.protection = "none"
                plan.warnings.append(
                    "mounted on the host: the store is not read-only there and objects are not "
                    "immutable (chattr +i failed); 'veloverlay fsck' detects changes"
                )
            st = _new_state(store, plan, m, opts)
            sdir = store.sessions / st.id
            # Before the mount: a crash after it leaves a record. While this process lives the
            # session counts as mounted (a harvest --all meanwhile must not take its upper dir).
            st.mounted_at, st.state = plan.target, "mounted"
            st.pid, st.pid_start = os.getpid(), state.own_start()
            state.save(store, st)
        spec = overlay.OverlaySpec(
            lowers=plan.lowers.layers,
            data_lowers=plan.lowers.data_layers,
            upper=os.fspath(sdir / "upper"),
            work=os.fspath(sdir / "work"),
            target=plan.target,
            userxattr=False,
        )
        try:
            # Root mounts on this directory, not on whatever its path leads to later: a path
            # under another user's directory can be re-pointed (a symlink swapped in).
            target_fd = mount.pin_dir(plan.target)
            spec.mount(target_fd)
        except BaseException as exc:
            st.state = "failed"
            st.error = {"message": str(exc), "reason": Reason.SYSCALL.value}
            state.save(store, st)
            _drop_upper(sdir)
            if target_fd >= 0:
                os.close(target_fd)
                target_fd = -1
            hold, plan.hold = plan.hold, -1
            remove_made_target(store, st, hold)  # a target made for it goes, as after a run
            raise
        res = SessionResult(
            session_id=st.id,
            exit_status=0,
            commit=None,
            conflict_ref=None,
            changed=0,
            backend="overlay",
            lower_form=plan.form,
            protection=plan.protection,
            warnings=plan.warnings,
            ref=st.top,
            state="mounted",
            mode="native",
        )
        return res
    finally:
        if target_fd >= 0:
            os.close(target_fd)
        if plan is not None and plan.hold >= 0:  # mounted here now: a mount point is busy
            os.close(plan.hold)
        m.close()


def _here(st: state.State) -> mountinfo.MountEntry | None:
    try:
        return st.mounted_here()
    except OSError as exc:
        raise VeloError(f"cannot read /proc/self/mountinfo: {exc}", reason=Reason.SYSCALL) from None


def _elsewhere(st: state.State, target: str, done: str) -> VeloError | None:
    """The refusal when other mount namespaces still hold a copy of the session's overlay (made
    by unshare -m or a container started while it was mounted): its upper dir can be written
    through them, so it is not harvested yet."""
    pids = namespaces_holding(st.is_upper)
    if not pids:
        return None
    shown = ", ".join(str(p) for p in pids[:5]) + (" …" if len(pids) > 5 else "")
    return VeloError(
        f"{done}the projection on {target} is still mounted in {len(pids)} other mount "
        f"namespace(s) (processes {shown})",
        reason=Reason.SESSION_ACTIVE,
        hint="end those processes or unmount it in their namespaces (nsenter -t PID -m umount "
        f"...), then {'run umount again' if not done else f'veloverlay harvest --resume {st.id}'}",
    )


def _bound_here(
    st: state.State, target: str, ours: mountinfo.MountEntry | None, done: str
) -> VeloError | None:
    """The refusal when the session's overlay is mounted on other paths of this namespace too (a
    bind mount of the projection): unmounting `target` leaves them writing its upper dir, and
    what they wrote after the harvest would be lost. Not its propagation peers (a bind of a
    shared parent): unmounting `ours` unmounts them too."""

    def kept(e: mountinfo.MountEntry) -> bool:
        return ours is None or (e.mnt_id != ours.mnt_id and not ours.peers == e.peers != 0)

    try:
        points = [e.point for e in st.mounts_here() if kept(e)]
    except OSError as exc:
        return VeloError(f"cannot read /proc/self/mountinfo: {exc}", reason=Reason.SYSCALL)
    if not points:
        return None
    shown = ", ".join(points[:5]) + (" …" if len(points) > 5 else "")
    return VeloError(
        f"{done}the projection on {target} is also mounted on {shown} (a bind mount of it)",
        reason=Reason.SESSION_ACTIVE,
        hint=f"umount {points[0]} first, then "
        + ("run umount again" if not done else f"veloverlay harvest --resume {st.id}"),
    )


def umount_session(
    store: Store,
    where: str,
    *,
    discard: bool = False,
    commit: bool = True,
    message: str | None = None,
) -> SessionResult:
    """Unmount the session mounted on `where`, harvest and commit it (as the end of a run)."""
    target = pathtrust.realpath_safe(where, Reason.TARGET_INVALID)
    found = [
        (st, entry)
        for st in state.iter_states(store)
        if st.state == "mounted" and st.mounted_at == target and (entry := _here(st)) is not None
    ]
    if not found:
        raise VeloError(
            f"no veloverlay session is mounted on {target}",
            reason=Reason.SESSION_NOT_FOUND,
            hint="'veloverlay sessions' lists them; an unmounted one is finished by "
            "'veloverlay harvest --resume ID'",
        )
    st, entry = found[0]
    if refusal := _bound_here(st, target, entry, "") or _elsewhere(st, target, ""):
        raise refusal
    try:
        # Read-only first: a file open for writing through a mount that is gone from every
        # namespace (a short-lived unshare -m copy) would not make umount2 EBUSY; it does this.
        mount.umount_exact(target, entry.mnt_id, readonly_first=True)
    except SysError as exc:
        if exc.errno == 16:  # EBUSY
            raise VeloError(
                f"{target} is busy: processes still use the projection"
                + (" (files open for writing)" if exc.syscall == "mount" else ""),
                reason=Reason.SESSION_ACTIVE,
                hint="stop them (fuser -vm DIR) and run umount again",
            ) from None
        raise
    # Unmounted: from here a kill leaves a `mounted` state without its mount (dead-unharvested).
    done = f"{target} is unmounted, but "
    if refusal := _bound_here(st, target, None, done) or _elsewhere(st, target, done):
        raise refusal  # a copy made in between: harvested by --resume once it is gone
    st.discard = st.discard or discard
    st.commit_to_ref = st.commit_to_ref and commit
    if message is not None:
        st.message = message
    st.pid, st.pid_start = os.getpid(), state.own_start()
    st.exit_status = 0
    st.state = "harvesting"
    state.save(store, st)
    m = Manifests(store)
    try:
        t0 = time.perf_counter()
        res = _finish(store, m, st)
        remove_made_target(store, st)  # a target `mount` made goes (as at the end of a run)
        res.timings["total"] = time.perf_counter() - t0
        res.mode = "native"
        return res
    finally:
        m.close()
