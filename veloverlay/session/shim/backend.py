"""The shim backend of a session: for hosts where no overlay can be mounted.

1. Resolve the refs (several stack, later wins: the view of the stack is what is projected); check
   the target (`--at`, default the top ref's ingest path): it must be new or an empty directory —
   nothing can hide what is in it (TARGET_INVALID).
2. `sessions/<id>/`: state.json (the overlay sessions' schema plus `backend: shim`, so `sessions`
   lists it and gc keeps its roots), the journal, the read-only shim export, lock dir; the live
   session ref `REF@<id>` (of the top ref) at the view.
3. Materialise the tree (materialize.py: private reflinks/copies, or `--link` proxies), record the
   baseline, and wait until the coarse clock has passed the newest ctime written (a later write is
   then always visible as a changed ctime).
4. Start the daemon (daemon.py) and fork a reaper (shim_procs.py): a child subreaper that runs
   the command with LD_PRELOAD + VELO_SHIM_CONFIG, waits for it, then SIGTERMs whatever is left
   of its descendants, waits `grace`, SIGKILLs. The manager (this process) ignores SIGINT
   meanwhile and restarts the daemon if it dies (the journal kept everything in between).
5. Stop the daemon; run the stat-diff of the whole tree against the view (what no hook saw:
   kernel-closed fds, mmap, static binaries, processes without the shim); for a stack, restate
   the change on the top ref alone (harvest.to_top_ref: MASKs for what lower refs provide); commit
   with compare-and-swap, three-way merge when the ref moved, `REF@<id>` kept on conflict; flag
   every program that ran without the shim (an exec or spawn the journal shows with no check-in
   after it); remove the tree.

A manager killed mid-session leaves state "running" with a dead pid: `resume(store, id)` waits for
nothing, refuses while the command still runs, and finishes exactly as step 5.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import stat
import time
from pathlib import Path

from veloverlay import faults, files, paths
from veloverlay.errors import Reason, VeloError
from veloverlay.files import force_rmtree, read_regular
from veloverlay.lower.homes import ids_dir
from veloverlay.process import proc_start
from veloverlay.progress import Progress
from veloverlay.session import prompt, reaper, state
from veloverlay.session.commit import harvest_and_commit, result_for, session_ref_name
from veloverlay.session.harvest import SetAside
from veloverlay.session.holders import ask_again, tree_writers
from veloverlay.session.options import OnStart, SessionOptions, SessionResult
from veloverlay.session.relocation import refuse_exposed_source
from veloverlay.session.shim import library
from veloverlay.session.shim.materialize import (
    Baseline,
    TargetDir,
    materialize,
    prepare_target,
    verify_proxies,
)
from veloverlay.session.shim.procs import (
    NotStarted,
    ShimStatus,
    run_command,
    start_daemon,
    stop_daemon,
)
from veloverlay.session.shim.treesync import SUBTREE, SyncResult, TreeSync
from veloverlay.session.state import State, same_process
from veloverlay.session.target import Stack, resolve_stack, target_free
from veloverlay.store.cas import Stage, Store
from veloverlay.store.manifest import Manifests, Txn
from veloverlay.store.sample import verify_sample
from veloverlay.store.tree import extent as tree_extent
from veloverlay.tiers import Rules

__all__ = ["run_shim", "resume", "verify_proxies", "LIVE_MESSAGE", "ShimStatus"]

LIVE_MESSAGE = "live (shim daemon)"


# --- small helpers -----------------------------------------------------------------------------
def _socket_address(sdir: Path, sid: str) -> str:
    path = os.fspath(sdir / "daemon.sock")
    if len(os.fsencode(path)) < 100:
        return path
    # Abstract: no path length limit (the peer uid is checked). Another user could bind a name
    # it can guess before the daemon does (a denial of service): 64 random bits it cannot.
    return f"@veloverlay-{os.getuid()}-{sid}-{os.urandom(8).hex()}"


# --- preparing ----------------------------------------------------------------------------------
def _resolve(m: Manifests, opts: SessionOptions) -> tuple[Stack, str]:
    stack = resolve_stack(m, opts.refs, hints=False)
    if any("@" in ref.name for ref in stack.refs):
        raise VeloError("cannot run a session on a session ref", reason=Reason.BAD_REF)
    top = stack.refs[-1]
    if opts.at == "":
        raise VeloError("--at names no directory (an empty path)", reason=Reason.USAGE)
    where = opts.at if opts.at is not None else top.path
    if not where:
        raise VeloError(
            f"ref '{top.name}' has no recorded path to project at",
            reason=Reason.TARGET_INVALID,
            hint="pass --at DIR",
        )
    return stack, os.path.abspath(where)


def _protection(link: bool, tier1_protected: bool) -> str:
    if link:
        return (
            "link: Tier-2 files share per-(digest, mode) proxy inodes; the shim breaks them "
            "before writes, a writer it cannot see changes a proxy (detected by fsck)"
        )
    if tier1_protected:
        return "copy: no object inode in the tree; Tier-1 objects immutable (chattr +i)"
    return (
        "copy: no object inode in the tree; Tier-1 objects are 0444 behind symlinks "
        "(a writer bypassing the shim can chmod them: detected by fsck)"
    )


def _wait_for_clock(max_ctime_ns: int) -> None:
    """Sleep until the coarse clock is past every ctime materialisation wrote (≤ 1 jiffy)."""
    while time.clock_gettime_ns(time.CLOCK_REALTIME) <= max_ctime_ns + 10_000_000:
        time.sleep(0.002)


# --- running ------------------------------------------------------------------------------------
# --- finishing ----------------------------------------------------------------------------------
def _ident(st: State) -> tuple[int, int] | None:
    return (st.target_id[0], st.target_id[1]) if len(st.target_id) == 2 else None


def _checked(target: str) -> None:
    """Called once the tree to remove is open and known to be the session's, before anything in
    it goes (a seam: the tests' attacker moves the path here)."""


def _remove_tree(st: State) -> None:
    """Remove the session's tree (or empty the target that existed before and give it its old
    mode back), acting only through descriptors: the parent is opened once, the tree opened in
    it without following a link and compared with the (dev, ino) recorded at the start, and
    everything below goes by descriptor (`files.empty_dir`). A path another user can re-point
    (a directory of theirs above the target swapped for a symbolic link to one of root's) is
    never used again. A tree no longer there is no error; another directory (or anything else)
    in its place is TARGET_INVALID and is left alone, as is anything the walk finds moved out of
    the tree."""
    ident = _ident(st)
    top = st.target_real or st.target
    parent, name = os.path.split(top)

    def refused(why: str, reason: Reason = Reason.TARGET_INVALID) -> VeloError:
        return VeloError(
            f"the session's tree at {top} was not removed: {why}",
            reason=reason,
            hint="a user who can write a directory above it moved or replaced it; look at what "
            "is there now and remove the session's tree by hand"
            if reason is Reason.TARGET_INVALID
            else "remove the session's tree by hand",
            path=top,
        )

    try:
        pfd = os.open(parent or "/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return
    except PermissionError as exc:  # e.g. a link another user put on the way (protected_symlinks)
        raise refused(f"{parent} cannot be opened: {exc.strerror}") from None
    try:
        try:
            fd, _now = files.open_dir_at(pfd, name, expect=ident)
        except FileNotFoundError:
            return
        except files.TreeChanged:
            raise refused("another directory is in its place") from None
        except NotADirectoryError:
            raise refused("something that is no directory is in its place") from None
        try:
            _checked(top)
            files.empty_dir(fd)
            if not st.target_created:  # it was there (empty) before: it stays, with its mode
                os.fchmod(fd, st.target_mode)
            elif target_free(fd):  # not while an overlay session projects there (target.py)
                files.rmdir_at(pfd, name, expect=ident)
        finally:
            os.close(fd)
    except files.TreeChanged as exc:
        raise refused(f"{exc.filename}: {exc.strerror}") from None
    except OSError as exc:  # e.g. a mount point in the tree (EBUSY), a +i file
        raise refused(f"{exc.filename or name}: {exc.strerror}", Reason.SYSCALL) from None
    finally:
        os.close(pfd)


WRITERS_WAIT = 1.0  # s: an outside writer finishing as the command ends


def _finish(
    store: Store, m: Manifests, st: State, status: ShimStatus, aside: SetAside | None = None
) -> SessionResult:
    sid = st.id
    sdir = store.sessions / sid
    res = result_for(st, status.exit_status)
    res.killed = status.killed
    res.warnings = list(st.warnings) + status.warnings
    unshimmed, denied = library.unshimmed(store.sessions / st.id, st.argv, status.top_pid)
    if unshimmed:
        res.warnings.append(
            "processes ran without the shim (static or setuid programs, an environment "
            "without LD_PRELOAD): their changes were caught only by the end-of-session "
            "stat-diff; " + "; ".join(unshimmed[:10]) + (" ..." if len(unshimmed) > 10 else "")
        )
        st.unshimmed = unshimmed[:100]
    if denied:
        res.warnings.append(f"{denied} writes into the store were refused (EROFS)")
    t0 = time.perf_counter()
    changing: list[bytes] = []  # left out of the commit: the tree, which holds them, stays
    if st.discard:
        with m.write() as txn:
            m.delete_ref(txn, st.session_ref)
        st.state = "discarded"
        res.state = "discarded"
    else:
        # A process outside the session's process tree with a file of the tree open for
        # writing would write on after the stat-diff, into a file removed with the tree: its
        # writes would be lost without an error. Nothing is harvested while one does.
        writers = ask_again(lambda: tree_writers(st.target_real), WRITERS_WAIT)
        if writers:
            raise state.hold(store, st, writers, "still have files of its tree open for writing")
        st.state = "harvesting"
        state.save(store, st)
        view_root = bytes.fromhex(st.view_root)

        def harvest(txn: Txn, stage: Stage, rules: Rules) -> SyncResult:
            sync = TreeSync(
                store,
                m,
                os.fsencode(st.target_real),
                Baseline.load(sdir / "baseline"),
                rules,
                link=st.link,
                ident=_ident(st),
                uid=st.uid,
            )
            sync.aside = aside
            result = sync.sync(txn, view_root, {b"": SUBTREE}, stage)
            res.skipped = list(result.skipped)
            changing[:] = sorted(result.retry)
            if result.retry:
                result.warnings.insert(
                    0,
                    "files kept changing while read at the end and are not in the commit: "
                    + ", ".join(paths.display(p) for p in changing[:5])
                    + f"; the session's tree is kept at {st.target_real or st.target} with them",
                )
            return result

        harvest_and_commit(store, m, st, res, harvest, live_message=LIVE_MESSAGE)
        st.state = "harvested"
        res.state = "harvested"
    res.timings["harvest"] = time.perf_counter() - t0
    st.commit, st.conflict_ref, st.changed = res.commit, res.conflict_ref, res.changed
    st.exit_status = res.exit_status
    left: VeloError | None = None
    try:
        if not changing:  # (their last bytes are only there)
            _remove_tree(st)
    except VeloError as exc:
        left = exc
    for name in ("journal", "baseline", "shim.conf", "daemon.sock"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(sdir / name)
    with contextlib.suppress(OSError):
        force_rmtree(sdir / "locks")
    state.save(store, st)
    if left is not None:  # the session is finished and recorded; its tree is not gone
        done = f"committed as {res.commit}" if res.commit else f"{res.state}, nothing committed"
        if res.conflict_ref:
            done = f"kept as {res.conflict_ref}"
        raise VeloError(
            f"session {sid} finished ({done}), but {left.message}",
            reason=left.reason,
            hint=left.hint,
            path=left.path,
        )
    return res


# --- public entry points ------------------------------------------------------------------------
def run_shim(
    store: Store,
    opts: SessionOptions,
    argv: list[str],
    *,
    interactive: bool = False,
    on_start: OnStart | None = None,
    progress: Progress | None = None,
) -> SessionResult:
    """Run `argv` in a shim-backend session of `opts.refs` (stacked, later on top); harvest and
    commit to the top ref at exit. `progress` hears how the materialisation goes.

    `opts.backend` is not consulted (the caller chose this backend). `link` (an attribute the
    caller may set on opts, default False) selects --link mode.
    """
    if not argv:
        raise VeloError("no command to run", reason=Reason.USAGE)
    link = bool(getattr(opts, "link", False))
    warnings: list[str] = []
    if opts.strict and link:
        raise VeloError(
            "--link shares proxy inodes that a writer bypassing the shim can change "
            "(detection only), which --strict refuses",
            reason=Reason.FALLBACK_FORBIDDEN,
            hint="drop --link (private copies), or drop --strict",
        )
    if opts.net != "host":
        if opts.strict:
            raise VeloError(
                "the shim backend cannot isolate the network", reason=Reason.FALLBACK_FORBIDDEN
            )
        warnings.append("--net none is not available with the shim backend: the network is shared")
    if opts.as_root:
        warnings.append("--as-root is not available with the shim backend: ids are unchanged")
    lib = library.library_path()
    m = Manifests(store)
    top: TargetDir | None = None
    try:
        store.writable()
        # Held until the state names the view: a gc in between would take the stacked view
        # (written just now, named by nothing yet), as the overlay backend holds it.
        with store.lock():
            stack, target = _resolve(m, opts)
            ref = stack.refs[-1]
            with m.read() as txn:  # a ref beyond the bound (made before it), as overlay does:
                extent = tree_extent(stack.view, lambda d: m.get_node(txn, d))  # refused
            paths.check_extent(extent[0], extent[1])  # before a file is made, not at harvest
            refuse_exposed_source(store, m, stack.view, ref.path, target)
            # The tree's top, open: only this directory is ever written, read or removed. Its
            # identity comes from the descriptor, never from the path (a directory on the way may
            # be another user's, who can swap it for a symlink to one of root's at any moment).
            try:
                top = prepare_target(target, store)
            except VeloError as exc:  # "not empty": a killed session's tree, maybe
                left = state.left_at(store, target) if exc.reason is Reason.TARGET_INVALID else None
                if left is not None:
                    exc.hint = (
                        f"session {left.id} was killed and left its tree there: "
                        f"`veloverlay harvest --resume {left.id}` finishes it and removes the tree"
                    )
                raise
            faults.point("session.target")
            tst = os.fstat(top.fd)
            if not top.created:  # closed to others until the tree's own top mode is set
                files.close_to_others(top.fd, target)
            sid = state.new_id()
            sdir = store.sessions / sid
            store.sessions.mkdir(exist_ok=True)
            os.mkdir(sdir, 0o700)
            os.mkdir(sdir / "locks", 0o700)
            sref = session_ref_name(ref.name, sid)
            st = State(
                id=sid,
                refs=[r.name for r in stack.refs],
                bases=[c.id for c in stack.commits],
                base_lineage=stack.refs[-1].lineage,
                view_root=stack.view.hex(),
                target=target,
                backend="shim",
                specs=list(opts.refs),
                # what gc must keep while the session lives
                roots=[c.root for c in stack.commits]
                + [r.hex() for r in (stack.view, stack.below) if r is not None],
                below_root=stack.below.hex() if stack.below is not None else None,
                target_real=top.real,
                target_created=top.created,
                target_mode=0o755 if top.created else stat.S_IMODE(tst.st_mode),
                target_id=[tst.st_dev, tst.st_ino],
                pid=os.getpid(),
                pid_start=state.own_start(),
                start=time.time(),
                form="link" if link else "copy",
                link=link,
                uid=os.geteuid(),
                tiers=ref.tiers,
                tiers_known=True,
                session_ref=sref,
                socket=_socket_address(sdir, sid),
                argv=list(argv),
                discard=opts.discard,
                commit_to_ref=opts.commit,
                message=opts.message,
                warnings=warnings,
            )
            state.save(store, st)
        try:
            with m.write() as txn:
                m.commit(  # the live view: the whole projected tree
                    txn,
                    sref,
                    stack.view,
                    expect_head=None,
                    message=LIVE_MESSAGE,
                    session=sid,
                )
            so = library.install(store, lib)
            protect = os.geteuid() == 0 and _chattr_ok(store)
            with m.read() as txn:
                mat = materialize(
                    store,
                    m,
                    txn,
                    stack.view,
                    target,
                    link=link,
                    protect=protect,
                    progress=progress,
                    ident=_ident(st),
                    fd=top.fd,
                )
            mat.baseline.save(sdir / "baseline")
            st.form = mat.form
            st.protection = _protection(mat.form == "link", mat.tier1_protected)
            st.materialize = {"seconds": mat.seconds, "counts": mat.counts}
            warnings.extend(mat.warnings)
            if not mat.tier1_protected:  # P0-a: detected, where not prevented
                warnings.extend(verify_sample(store))
            library.create_journal(sdir / "journal", sid)
            protect_dirs = {os.path.realpath(p) for p in _protected_dirs(store)}
            library.write_config(
                sdir / "shim.conf",
                root=os.fsencode(st.target_real),
                journal=os.fsencode(sdir / "journal"),
                sock=os.fsencode(st.socket),
                locks=os.fsencode(sdir / "locks"),
                protect=[os.fsencode(p) for p in sorted(protect_dirs)],
                link=mat.form == "link",
                proxies=mat.proxies,
            )
            _wait_for_clock(mat.max_ctime_ns)
            env = library.environment(os.environ, so, sdir / "shim.conf")
            env["VELO_SESSION"], env["VELO_SESSION_REF"] = sid, stack.refs[-1].name
            start_daemon(store, st)
            st.state = "running"
            state.save(store, st)
        except BaseException:
            top = _let_go(top)
            _abandon(store, m, st)
            raise
        if interactive:
            prompt.environment(env, ref.name)
        if on_start is not None:
            on_start(state.info(store, st))
        with reaper.finishing():  # until committed (see reaper.finishing)
            try:
                status = run_command(store, st, argv, env, opts.grace, interactive=interactive)
            except NotStarted as exc:
                top = _let_go(top)
                _abandon(store, m, st)
                raise exc.error from None
            stop_daemon(st)
            top = _let_go(top)  # its shared lock (prepare_target), before removing the tree
            return _finish(store, m, st, status)
    finally:
        if top is not None:
            os.close(top.fd)
        m.close()


def _let_go(top: TargetDir | None) -> TargetDir | None:
    """Close the target's descriptor (and so let go of its shared lock): None to keep."""
    if top is not None:
        os.close(top.fd)
    return None


def _protected_dirs(store: Store) -> list[Path]:
    from veloverlay.session.shim.materialize import proxies_dir

    legacy = [store.legacy] if store.legacy is not None else []  # a migration is unfinished
    return [store.objects, *legacy, ids_dir(store), proxies_dir(store), store.db_path]


def _chattr_ok(store: Store) -> bool:
    """Can this process set +i on files of the store? Tried on a scratch file (the probe's own
    answer forks and mounts: too slow for every session start)."""
    from veloverlay import fsflags

    probe = store.tmp / f".chattr-probe-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        fsflags.set_immutable(probe, True)
        fsflags.set_immutable(probe, False)
        return True
    except OSError:
        return False
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()


def _abandon(store: Store, m: Manifests, st: State) -> str | None:
    """Undo a session that failed before its command ran; why its tree was left, if it was."""
    stop_daemon(st)
    with contextlib.suppress(Exception), m.write() as txn:
        m.delete_ref(txn, st.session_ref)
    left = None
    try:
        _remove_tree(st)
    except Exception as exc:  # (best effort: the start's own error is what the user needs)
        left = exc.message if isinstance(exc, VeloError) else str(exc)
    st.state = "failed"
    with contextlib.suppress(OSError):
        state.save(store, st)
    return left


def resume(store: Store, session_id: str, aside: SetAside | None = None) -> SessionResult:
    """Finish a shim session whose manager died: the journal and the stat-diff of the tree still
    hold every change. Refused while the manager or the command is still running."""
    sdir = store.sessions / session_id
    st = state.load(store, session_id)
    if st.backend != "shim":
        raise VeloError(f"session {session_id} is not a shim session", reason=Reason.USAGE)
    if st.state in ("harvested", "discarded", "failed"):
        raise VeloError(f"session {session_id} is already {st.state}", reason=Reason.USAGE)
    if st.manager_alive(store):
        raise VeloError(
            f"session {session_id} is still running (manager pid {st.pid})",
            reason=Reason.SESSION_ACTIVE,
        )
    if same_process(st.child, st.child_start):
        raise VeloError(
            f"the command of session {session_id} is still running (reaper pid {st.child})",
            reason=Reason.SESSION_ACTIVE,
            hint="wait for it to end, or kill it, then resume again",
        )
    pid = st.daemon
    if same_process(pid, st.daemon_start):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
        for _ in range(500):
            if proc_start(pid) is None:
                break
            time.sleep(0.01)
    status = ShimStatus(top_pid=st.top_pid)
    with contextlib.suppress(OSError, ValueError, KeyError):
        rep = json.loads(read_regular(sdir / "reaper.json"))
        status.exit_status = int(rep["exit"])
        status.killed = [(int(p), str(c)) for p, c in rep.get("killed", [])]
    if aside is not None:
        aside.check(st.target_real)
    st.pid = os.getpid()
    st.pid_start = state.own_start()
    state.save(store, st)
    m = Manifests(store)
    try:
        if (sdir / "baseline").exists():
            return _finish(store, m, st, status, aside)
        # The manager died before the tree was whole, so before the command could run: nothing
        # to harvest. Undone as a start that failed (its live ref and tree go), so that it
        # neither stays unharvested for ever nor stops `harvest --all` at it.
        left = _abandon(store, m, st)
    finally:
        m.close()
    res = result_for(st, -1)
    res.state = st.state
    res.warnings.append(
        f"session {session_id} never got as far as running its command: nothing to harvest"
        + (f"; {left}" if left else f"; its tree at {st.target} was removed" if st.target else "")
    )
    return res
