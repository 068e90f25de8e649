"""The overlay backend: the view is an overlay mount in the session's namespaces; its changes
are read from the upper directory.

One code path for root and root-free (DESIGN.md "Sessions" steps 1-5):

1. Resolve the ref(s) (session/target.py) and ensure the lower layers (lower/stacks.py: locked
   and cached per root); the backend and lower form come from session/select.py.
2. Create `sessions/<id>/{upper,work}` and the state file (session/state.py).
3. Fork the namespace child (session/overlay/pid1.py): user + mount + pid (+ net) namespaces,
   the overlay on the target, the store bound read-only after it, then pid 1 runs the command
   under the session reaper (session/reaper.py).
4. The manager (this process) ignores SIGINT while the session runs (Ctrl-C reaches only the
   session), waits for the reaper's report, then harvests the upper dir
   (session/overlay/harvest.py) and commits (session/commit.py).

Every mount lives in the child's namespaces and disappears with them; nothing is mounted on any
path of the caller's namespace. A manager killed with SIGKILL takes the session down with it
(parent-death signals) and leaves the state "running" with a dead pid: `resume` finishes it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from veloverlay import faults, ns, overlay, paths, posixacl, process
from veloverlay.errors import Reason, SysError, VeloError
from veloverlay.files import force_rmtree
from veloverlay.lower.homes import every_base
from veloverlay.lower.stacks import Lowers, ensure_lowers
from veloverlay.progress import Progress
from veloverlay.records import Record
from veloverlay.session import prompt, reaper, state
from veloverlay.session.commit import Harvested, harvest_and_commit, result_for
from veloverlay.session.holders import ask_again, holders
from veloverlay.session.options import OnStart, SessionOptions, SessionResult
from veloverlay.session.overlay.pid1 import ChildSpec, child_main
from veloverlay.session.relocation import alias_note, relocation_warnings, source_alias
from veloverlay.session.select import Choice
from veloverlay.session.state import State
from veloverlay.session.target import (
    Stack,
    overlay_target,
    remove_made_target,
    resolve_stack,
    unmake_target,
)
from veloverlay.store.cas import Store
from veloverlay.store.manifest import Manifests
from veloverlay.store.sample import verify_sample

if TYPE_CHECKING:
    from veloverlay.session.harvest import SetAside
    from veloverlay.store.cas import Stage
    from veloverlay.store.manifest import Txn
    from veloverlay.tiers import Rules

__all__ = ["run_session", "resume", "xattr_prefix"]


class _Plan(Record):
    stack: Stack
    target: str
    lowers: Lowers
    form: str
    protection: str
    warnings: list[str]
    also_at: list[str]  # more paths showing the projection in the session (the ingest path)
    mode: str  # native | userns
    locked: bool  # the command cannot unmount or remount the session's mounts
    made: tuple[int, int] | None  # the target's (dev, ino) when this session made it
    hold: int  # a descriptor of the target holding its shared flock (session/target.py), or -1


def xattr_prefix(mode: str) -> str:
    """The overlay xattr prefix of a session's layers and upper: trusted root-native."""
    return "trusted" if mode == "native" else "user"


def _prepare(
    store: Store,
    m: Manifests,
    opts: SessionOptions,
    choice: Choice,
    progress: Progress | None = None,
) -> _Plan:
    if opts.net not in ("host", "none"):
        raise VeloError(f"unknown network mode '{opts.net}'", reason=Reason.USAGE)
    choice.raise_error()
    assert choice.form is not None
    form, privileged, protect = choice.form, choice.privileged, choice.protect
    warnings: list[str] = []
    if form == "links":
        why = (
            "forced by VELO_FORCE_LOWER"
            if choice.form_forced
            else "data-only lowers are unavailable"
        )
        warnings.append(
            f"lower form 'links' ({why}): file mtimes show as 1970-01-01 00:00:01 and files "
            "with equal content and mode share an inode number"
        )
        if opts.strict:
            raise VeloError(
                f"--strict: the proxy-link lower form is a fallback ({why})",
                reason=Reason.FALLBACK_FORBIDDEN,
            )
    if not protect and opts.strict:
        why = "chattr +i is unavailable" if privileged else "not root"
        raise VeloError(
            f"--strict: store objects cannot be made immutable ({why})",
            reason=Reason.IMMUTABLE_DENIED,
            hint="without --strict the store is still read-only inside the session; "
            "'veloverlay fsck' detects changes made outside sessions",
        )
    stack = resolve_stack(m, opts.refs)
    state.refuse_live_view(store, stack.refs[-1].name)
    target, made, hold = overlay_target(store, opts.at, stack.refs[-1])
    faults.point("session.target")
    try:  # a target made here goes again if the session cannot start
        alias = source_alias(store, stack.refs[-1].path, target)
        if alias is None:
            warnings.extend(
                relocation_warnings(store, m, stack.view, stack.refs[-1].path, target, stack.hints)
            )
        else:  # the baked paths resolve to the projection: say so
            warnings.extend(alias_note(store, m, stack.view, alias, target, stack.hints))
        mode = choice.mode or "userns"
        lowers = ensure_lowers(
            store,
            m,
            stack.view,
            form=form,
            protect=protect,
            hints=stack.hints,
            xattr=xattr_prefix(mode),
            progress=progress,
            in_use=lambda: state.layers_in_use(store),
        )
        if lowers.warning:
            warnings.append(lowers.warning)
        if lowers.immutable:
            protection = "immutable"  # +i on every referenced object, store read-only inside
        else:
            protection = "read-only-mount"  # store read-only inside the session only
            if protect:
                warnings.append(lowers.protection_note)
            warnings.extend(verify_sample(store))  # P0-a: detected, where not prevented
            if opts.strict:
                raise VeloError(
                    f"--strict: {lowers.protection_note}", reason=Reason.IMMUTABLE_DENIED
                )
        if not choice.locked:
            # Root-native without user namespaces: nothing less privileged to enter after mounting.
            warnings.append(
                "no user namespace here: the command runs as real root in the session's mount "
                "namespace and could unmount the overlay or remount the store writable"
            )
            if opts.strict:
                raise VeloError(
                    "--strict: the session's mounts cannot be locked (no user namespaces)",
                    reason=Reason.FALLBACK_FORBIDDEN,
                )
        also_at = [alias] if alias else []
        locked = choice.locked
        return _Plan(
            stack, target, lowers, form, protection, warnings, also_at, mode, locked, made, hold
        )
    except BaseException:
        if made is not None:
            unmake_target(target, made, hold)
        elif hold >= 0:
            os.close(hold)
        raise


def readonly_caches(store: Store, home: str, covered: Sequence[str] = ()) -> list[str]:
    """What the session's mount namespace binds read-only besides the store: the whole per-boot
    layer cache of this user (every store's layers, not only this store's: a session could
    otherwise plant files in another store's cached layers, which its next session would show),
    wherever it may lie (`every_base`: a session started with VELO_RUNTIME_DIR=off, another
    VELO_RUNTIME_DIR or without XDG_RUNTIME_DIR uses another place, and could otherwise write
    the layers the next session of the usual environment mounts), and this store's layer home
    if it lies elsewhere. Not a path at or under one of `covered` (the target, and the ingest
    path that shows the projection too): the projection covers it (nothing in the session
    reaches it), and the bind, made after the overlay mount, would look for it in the
    projection."""
    out = [c for c in every_base(store.root) if os.path.isdir(c)]
    inside = any((home + "/").startswith(c.rstrip("/") + "/") for c in out)
    if home != os.fspath(store.trees) and not inside:
        out.append(home)
    tops = [os.path.realpath(c).rstrip("/") + "/" for c in covered]
    return [p for p in out if not any((os.path.realpath(p) + "/").startswith(t) for t in tops)]


def _new_state(store: Store, plan: _Plan, m: Manifests, opts: SessionOptions) -> State:
    sid = state.new_id()
    sdir = store.sessions / sid
    store.sessions.mkdir(exist_ok=True)
    os.mkdir(sdir, 0o700)
    upper, work = sdir / "upper", sdir / "work"
    os.mkdir(upper, 0o700)
    os.mkdir(work, 0o700)
    # The merged root shows the upper root's attributes: give it the view's.
    with m.read() as txn:
        mode, mtime_ns = m.node_attrs(txn, plan.stack.view)
    os.chmod(upper, mode)
    os.utime(upper, ns=(mtime_ns, mtime_ns))
    stack = plan.stack
    roots = {c.root for c in stack.commits} | {stack.view.hex()}
    if stack.below is not None:
        roots.add(stack.below.hex())
    st = State(
        id=sid,
        refs=[r.name for r in stack.refs],
        bases=[c.id for c in stack.commits],
        base_lineage=stack.refs[-1].lineage,
        view_root=stack.view.hex(),
        target=plan.target,
        target_real=plan.target,
        target_created=plan.made is not None,
        target_id=list(plan.made or ()),
        specs=list(opts.refs),
        roots=sorted(roots),
        below_root=stack.below.hex() if stack.below is not None else None,
        pid=os.getpid(),
        pid_start=state.own_start(),
        start=time.time(),
        form=plan.form,
        protection=plan.protection,
        layers=list(plan.lowers.layers),
        also_at=list(plan.also_at),
        mode=plan.mode,
        tiers=stack.refs[-1].tiers,
        tiers_known=True,
        discard=opts.discard,
        commit_to_ref=opts.commit,
        message=opts.message,
        warnings=plan.warnings,
    )
    state.save(store, st)
    return st


def run_session(
    store: Store,
    opts: SessionOptions,
    argv: list[str],
    choice: Choice,
    *,
    interactive: bool,
    on_start: OnStart | None = None,
    progress: Progress | None = None,
) -> SessionResult:
    """`progress`: the lower layers' build, when they are built (see lower/layers.py)."""
    if not argv:
        raise VeloError("no command to run", reason=Reason.USAGE)
    m = Manifests(store)
    signals = contextlib.ExitStack()
    plan: _Plan | None = None
    try:
        t0 = time.perf_counter()
        # The store lock (shared) from choosing the layers until the state file pins their
        # roots: gc prunes layers under the exclusive lock and keeps only pinned roots, so
        # without it a gc in between removed the layers this session was about to mount.
        with store.lock():
            plan = _prepare(store, m, opts, choice, progress)
            t_prepared = time.perf_counter()
            st = _new_state(store, plan, m, opts)
        sdir = store.sessions / st.id
        spec = overlay.OverlaySpec(
            lowers=plan.lowers.layers,
            data_lowers=plan.lowers.data_layers,
            upper=os.fspath(sdir / "upper"),
            work=os.fspath(sdir / "work"),
            target=plan.target,
            userxattr=plan.mode != "native",
        )
        top = plan.stack.refs[-1].name
        env = dict(os.environ)
        env["VELO_SESSION"] = st.id
        env["VELO_SESSION_REF"] = top
        if interactive:
            prompt.environment(env, top)
        try:
            cwd = os.getcwd()
        except OSError:
            cwd = plan.target
        rfd, wfd = os.pipe2(os.O_CLOEXEC)
        ctx = ChildSpec(
            spec=spec,
            store_root=os.fspath(store.root),
            readonly=readonly_caches(store, plan.lowers.home, [plan.target, *plan.also_at]),
            also_at=list(plan.also_at),
            cwd=cwd,
            argv=list(argv),
            env=env,
            as_root=opts.as_root,
            native=plan.mode == "native",
            lock=plan.locked,
            net_none=opts.net == "none",
            grace=opts.grace,
            report_fd=wfd,
            manager_pid=os.getpid(),
            tty_foreground=process.tty_foreground(),
        )
        if on_start is not None:
            on_start(state.info(store, st))
        child: list[int] = [0]
        signals.enter_context(reaper.finishing())  # until committed (see reaper.finishing)

        def force() -> None:  # a second SIGTERM: the whole pid namespace goes (pdeathsig)
            with contextlib.suppress(ProcessLookupError):
                os.kill(child[0], signal.SIGKILL)

        with reaper.manager_signals(child, force):  # pid 1 follows the child (pdeathsig)
            sys.stdout.flush()
            sys.stderr.flush()
            try:
                with reaper.held():  # forwarded ones wait until child[0] is set
                    pid = os.fork()
                    if pid:
                        child[0] = pid
            except OSError as exc:
                os.close(rfd)
                os.close(wfd)
                raise _not_started(store, st, SysError(exc.errno or errno.EAGAIN, "fork")) from None
            if pid == 0:  # pragma: no cover - runs in the child
                try:
                    os.close(rfd)
                    child_main(ctx)
                finally:
                    os._exit(70)
            os.close(wfd)
            st.child, st.child_start = pid, process.proc_start(pid)
            st.state = "running"
            state.save(store, st)
            try:
                report: dict[str, object] = {}
                for frame in reaper.read_until_exit(rfd, pid):
                    report.update(frame)
            finally:
                os.close(rfd)
                wstatus = ns.wait_child(pid)
                child[0] = 0  # ended: nothing more to pass signals on to
            if ctx.tty_foreground:
                process.reclaim_terminal()
        err = report.get("error")
        if isinstance(err, dict):
            st.state = "failed"
            st.error = err
            state.save(store, st)
            _drop_upper(sdir)
            remove_made_target(store, st, _let_go(plan))
            try:
                reason = Reason(err.get("reason", Reason.SYSCALL.value))
            except ValueError:
                reason = Reason.SYSCALL
            hint = err.get("hint")
            raise VeloError(
                f"the session could not start: {err.get('message')}",
                reason=reason,
                hint=hint if isinstance(hint, str) else None,
            )
        if "exit" in report:
            exit_status = int(report["exit"])  # type: ignore[call-overload]
        else:
            # pid 1 died without a report (killed): the session ended abnormally.
            code = os.waitstatus_to_exitcode(wstatus)
            exit_status = 128 - code if code < 0 else (code or 137)
        killed_raw = report.get("killed", [])
        killed = [(int(p), str(c)) for p, c in killed_raw] if isinstance(killed_raw, list) else []
        st.exit_status = exit_status
        st.killed = killed  # saved with the "harvesting" state
        covered = _covered_warning(report.get("covered"))
        if covered:
            st.warnings = [*st.warnings, covered]  # kept with the state, for `sessions`
        if report.get("sealed") is not True:
            _refuse_if_held(store, st, str(report.get("seal_error") or "the session ended"))
        t_ran = time.perf_counter()
        res = _finish(store, m, st)
        # a target made for the session goes with it (as the shim's)
        remove_made_target(store, st, _let_go(plan))
        res.timings = {
            "prepare": t_prepared - t0,
            "lowers": plan.lowers.seconds,
            "run": t_ran - t_prepared,
            **res.timings,
            "total": time.perf_counter() - t0,
        }
        res.killed = killed  # (said once, from `killed`, for both backends)
        res.warnings = plan.warnings + ([covered] if covered else []) + res.warnings
        return res
    finally:
        if plan is not None and plan.hold >= 0:
            os.close(_let_go(plan))
        signals.close()
        m.close()


def _let_go(plan: _Plan) -> int:
    """The plan's hold on the target, handed over once (to be closed by whoever takes it)."""
    hold, plan.hold = plan.hold, -1
    return hold


def _covered_warning(covered: object) -> str | None:
    """What the command mounted over parts of the projection (pid 1's `covered` frame): writes
    there went to those mounts, not to the session's tree, and are not committed."""
    if not isinstance(covered, list) or not covered:
        return None
    shown = ", ".join(paths.display(os.fsencode(str(p))) for p in covered[:5])
    more = f" and {len(covered) - 5} more" if len(covered) > 5 else ""
    return (
        f"the command mounted over {shown}{more} in the projection: what it wrote there went to "
        "that mount, not to the session's tree, and is not committed"
    )


# --- harvest and commit ------------------------------------------------------------------------
HOLDERS_WAIT = 1.0  # s: a pid namespace that just ended may still be releasing its files


def _refuse_if_held(store: Store, st: State, why: str) -> None:
    """The overlay could not be sealed (or was never, after a crash): harvest only when no
    process can write it any more; else keep the upper dir, state `held`, and say who holds it."""
    pids = ask_again(lambda: holders(st.is_upper), HOLDERS_WAIT)
    if pids:
        raise state.hold(store, st, pids, f"can still write its projection ({why})")


def _finish(store: Store, m: Manifests, st: State, aside: SetAside | None = None) -> SessionResult:
    """Harvest the upper dir of a finished session and commit it (or discard it); `aside`:
    where what is too deep to keep goes (`harvest --set-aside`)."""
    sdir = store.sessions / st.id
    res = result_for(st, st.exit_status if st.exit_status is not None else -1)
    if st.discard:
        st.state = "discarded"
        state.save(store, st)
        _drop_upper(sdir)
        res.state = "discarded"
        return res
    t_start = time.perf_counter()
    view_root = bytes.fromhex(st.view_root)
    if _untouched(sdir / "upper", view_root, m):
        # Nothing reached the upper dir: no store lock, no staging, no transaction, and no
        # "harvesting" state to record first (a crash before the next save leaves the session
        # "running" with an empty upper dir: its recovery harvests nothing, as here).
        st.state, st.commit, st.conflict_ref, st.changed = "harvested", None, None, 0
        state.save(store, st)
        _drop_upper(sdir)
        res.state = "harvested"
        res.timings = {"harvest": time.perf_counter() - t_start, "commit": 0.0}
        return res
    st.state = "harvesting"
    state.save(store, st)

    def harvest(txn: Txn, stage: Stage, rules: Rules) -> Harvested:
        from veloverlay.session.overlay.harvest import harvest_upper  # not needed when untouched

        return harvest_upper(
            store,
            m,
            txn,
            sdir / "upper",
            view_root,
            stage,
            form=st.form,
            rules=rules,
            prefix=xattr_prefix(st.mode),
            aside=aside,
        )

    t_harvested = harvest_and_commit(
        store, m, st, res, harvest, protect_new=st.protection == "immutable"
    )
    if t_harvested is not None:
        res.timings = {
            "harvest": t_harvested - t_start,
            "commit": time.perf_counter() - t_harvested,
        }
    st.state, st.commit, st.conflict_ref = "harvested", res.commit, res.conflict_ref
    st.changed = res.changed
    state.save(store, st)
    _drop_upper(sdir)
    res.state = "harvested"
    return res


def _untouched(upper: Path, view_root: bytes, m: Manifests) -> bool:
    """The session changed nothing: an empty upper dir with the view root's mode and mtime, its
    mode as its ACL allows (posixacl: an ACL set on the root alone may leave its stat as it was
    and still narrow what the group gets)."""
    try:
        fd = os.open(upper, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        if os.listdir(fd):
            return False
        st = os.fstat(fd)
        mode, _acl = posixacl.mode_of(fd, st.st_mode & 0o7777)
    except OSError:
        return False
    finally:
        os.close(fd)
    with m.read() as txn:
        attrs = m.node_attrs(txn, view_root)
    return (mode, st.st_mtime_ns) == attrs


def _not_started(store: Store, st: State, exc: SysError) -> SysError:
    """The session's process could not be made (RLIMIT_NPROC): nothing ran, so nothing is left
    to harvest: the state says failed (as for a child that reported an error), not
    dead-unharvested, and the empty upper dir goes."""
    st.state = "failed"
    st.error = {"message": str(exc), "reason": Reason.SYSCALL.value, "hint": exc.hint}
    state.save(store, st)
    _drop_upper(store.sessions / st.id)
    return exc


def _drop_upper(sdir: Path) -> None:
    for name in ("upper", "work"):
        with contextlib.suppress(OSError):
            force_rmtree(sdir / name)


def resume(store: Store, st: State, aside: SetAside | None = None) -> SessionResult:
    """Finish an overlay session whose manager died (its state shows dead-unharvested)."""
    if aside is not None:
        aside.check(os.fspath(store.sessions / st.id / "upper"))
    if state.same_process(st.child, st.child_start):
        # A parent-death SIGKILL is on its way; make sure before reading the upper. (Only that
        # process: its number may have been given to another one since, or name another process
        # here when the session ran in another pid namespace.)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(st.child, signal.SIGKILL)
        for _ in range(200):
            if process.proc_start(st.child) is None:
                break
            time.sleep(0.01)
    # Never sealed (the manager died first): harvest only what nothing can write any more.
    _refuse_if_held(store, st, "its manager ended before the overlay was sealed")
    # Take over the session so that a concurrent resume does not harvest it twice.
    st.pid = os.getpid()
    st.pid_start = state.own_start()
    state.save(store, st)
    m = Manifests(store)
    try:
        res = _finish(store, m, st, aside)
    finally:
        m.close()
    remove_made_target(store, st)
    return res
