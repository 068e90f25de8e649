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
import secrets
import signal
import time
from pathlib import Path
from typing import Any

from . import daemon, paths, projection, shim
from .cas import Store
from .errors import Reason, VeloError
from .harvest import to_top_ref
from .manifest import Commit, Manifests, Ref, Txn
from .materialize import Baseline, materialize, prepare_target, verify_proxies
from .merge import three_way
from .records import Record
from .session import SessionOptions, SessionResult
from .shim import RecType
from .shim_procs import (
    ShimStatus,
    proc_start,
    run_command,
    same_process,
    start_daemon,
    stop_daemon,
)
from .tiers import Rules
from .tree import Op

__all__ = ["run_shim", "resume", "verify_proxies", "LIVE_MESSAGE", "ShimStatus"]

STATE_VERSION = 1
LIVE_MESSAGE = "live (shim daemon)"


# --- small helpers -----------------------------------------------------------------------------
def _save_state(store: Store, st: dict[str, Any]) -> None:
    projection._write_json_atomic(store.sessions / st["id"] / "state.json", st)


def _new_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)


def _session_ref(top: str, sid: str) -> str:
    return f"{top.split('@', 1)[0]}@{sid}"


def _socket_address(sdir: Path, sid: str) -> str:
    path = os.fspath(sdir / "daemon.sock")
    if len(os.fsencode(path)) < 100:
        return path
    return f"@veloverlay-{os.getuid()}-{sid}"  # abstract: no path length limit (peer uid checked)


# --- preparing ----------------------------------------------------------------------------------
class _Stack(Record, frozen=True):
    refs: list[Ref]
    commits: list[Commit]
    view: bytes  # the projected tree: the refs stacked, later wins (the top ref's root alone)
    below: bytes | None  # the stack without the top ref (None: one ref)
    target: str


def _resolve(m: Manifests, opts: SessionOptions) -> _Stack:
    # A stack writes its merged nodes; one ref only reads.
    with m.write() if len(opts.refs) > 1 else m.read() as txn:
        resolved = [m.resolve(txn, spec) for spec in opts.refs]
        refs = [r for r, _c in resolved]
        commits = [c for _r, c in resolved]
        for ref in refs:
            if "@" in ref.name:
                raise VeloError("cannot run a session on a session ref", reason=Reason.BAD_REF)
        roots = [bytes.fromhex(c.root) for c in commits]
        view = projection.stack_roots(m, txn, roots)
        below = projection.stack_roots(m, txn, roots[:-1]) if len(roots) > 1 else None
    top = refs[-1]
    where = opts.at if opts.at is not None else top.path
    if not where:
        raise VeloError(
            f"ref {top.name!r} has no recorded path to project at",
            reason=Reason.TARGET_INVALID,
            hint="pass --at DIR",
        )
    return _Stack(refs, commits, view, below, os.path.abspath(where))


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
def _unshimmed(store: Store, st: dict[str, Any], top_pid: int) -> tuple[list[str], int]:
    """Programs the journal shows starting without a check-in; also count refused store writes.

    One pass: an EXEC intent waits for its pid's next CHECKIN (the new image loaded the shim)
    or EXEC failure; whatever still waits at the end ran unshimmed. A SPAWN child, and the
    command itself, must have checked in at some point (journal or live socket)."""
    sdir = store.sessions / st["id"]
    reader = shim.JournalReader(sdir / "journal")
    checked_in: set[int] = set()
    with contextlib.suppress(OSError, ValueError):
        live = json.loads((sdir / "daemon.json").read_text()).get("checkins", {})
        checked_in.update(int(pid) for pid in live)
    pending: dict[int, str] = {}
    spawned: list[tuple[int, str]] = []
    denied = 0
    for r in reader.read(final=True):
        if r.type == RecType.CHECKIN:
            checked_in.add(r.pid)
            pending.pop(r.pid, None)
        elif r.type == RecType.EXEC:
            if r.phase == shim.Phase.INTENT:
                pending[r.pid] = os.fsdecode(r.path1)
            else:
                pending.pop(r.pid, None)  # the exec failed: the old image goes on
        elif r.type == RecType.SPAWN and r.ret > 0:
            spawned.append((r.ret, os.fsdecode(r.path1)))
        elif r.type == RecType.DENIED:
            denied += 1
    # (journal order decides for execs: the same pid checked in before it exec'd)
    out = [f"pid {pid} ran {prog}" for pid, prog in pending.items()]
    out += [f"pid {pid} ran {prog}" for pid, prog in spawned if pid not in checked_in]
    if top_pid and top_pid not in checked_in:
        out.insert(0, f"pid {top_pid} ran {' '.join(st.get('argv', [])[:1]) or '?'}")
    if reader.damaged:
        out.append(f"(the journal had {reader.damaged} damaged records)")
    return out, denied


def _already_committed(m: Manifests, txn: Txn, st: dict[str, Any]) -> tuple[str | None, str | None]:
    """(commit on the ref, kept session ref) when an earlier finish got that far."""
    sref = st["session_ref"]
    r = m.get_ref(txn, sref)
    if r is not None and m.get_commit(txn, r.head).message != LIVE_MESSAGE:
        return None, sref
    ref = m.get_ref(txn, st["refs"][-1])
    cid = ref.head if ref is not None else None
    for _ in range(200):
        if cid is None:
            break
        c = m.get_commit(txn, cid)
        if c.session == st["id"]:
            return c.id, None
        if c.id in st["bases"]:
            break
        cid = c.parent
    return None, None


def _commit(
    m: Manifests,
    txn: Txn,
    st: dict[str, Any],
    new_root: bytes,
    ops: list[Op],
    res: SessionResult,
) -> None:
    sid, top = st["id"], st["refs"][-1]
    base = m.get_commit(txn, st["bases"][-1])
    base_root = bytes.fromhex(base.root)
    message = st.get("message") or f"session {sid}"
    ref = m.get_ref(txn, top)
    sref = st["session_ref"]
    if st.get("commit_to_ref", True) and ref is not None:
        if new_root == base_root:
            m.delete_ref(txn, sref)
            return
        if ref.head == base.id:
            c = m.commit(
                txn, top, new_root, expect_head=base.id, message=message, session=sid, delta=ops
            )
            res.commit = c.id
            m.delete_ref(txn, sref)
            return
        head_root = bytes.fromhex(m.get_commit(txn, ref.head).root)
        mr = three_way(m, txn, base_root, new_root, head_root)
        if mr.root is not None:
            if mr.root != head_root:
                c = m.commit(
                    txn,
                    top,
                    mr.root,
                    expect_head=ref.head,
                    message=message + " (merged)",
                    session=sid,
                    delta=list(mr.applied),
                )
                res.commit = c.id
            else:
                res.commit = ref.head
            m.delete_ref(txn, sref)
            return
        res.conflicts = [paths.display(p) for p in mr.conflicts]
    # Conflict, --no-commit, or the ref vanished: the session's tree stays as REF@<session>.
    c = m.put_commit(
        txn, ref=sref, root=new_root, parent=base.id, message=message, session=sid, delta=ops
    )
    m.put_ref(txn, Ref(sref, c.id, ref.path if ref else None, ref.tiers if ref else None, None))
    res.conflict_ref = sref


def _remove_tree(st: dict[str, Any]) -> None:
    target = st["target"]
    if not os.path.isdir(target) or os.path.islink(target):
        return
    if st.get("target_created"):
        projection.force_rmtree(target)
        return
    # The directory was there (empty) before: leave it empty, with its old mode.
    for name in os.listdir(target):
        projection.force_rmtree(os.path.join(target, name))
    with contextlib.suppress(OSError):
        os.chmod(target, int(st.get("target_mode", 0o755)))


def _finish(store: Store, m: Manifests, st: dict[str, Any], status: ShimStatus) -> SessionResult:
    sid = st["id"]
    sdir = store.sessions / sid
    res = SessionResult(
        session_id=sid,
        exit_status=status.exit_status,
        commit=None,
        conflict_ref=None,
        changed=0,
        backend="shim",
        lower_form=st["form"],
        protection=st["protection"],
        killed=status.killed,
        warnings=list(st.get("warnings", [])) + status.warnings,
        ref=st["refs"][-1],
    )
    unshimmed, denied = _unshimmed(store, st, status.top_pid)
    if unshimmed:
        res.warnings.append(
            "processes ran without the shim (static or setuid programs, an environment "
            "without LD_PRELOAD): their changes were caught only by the end-of-session "
            "stat-diff; " + "; ".join(unshimmed[:10]) + (" ..." if len(unshimmed) > 10 else "")
        )
        st["unshimmed"] = unshimmed[:100]
    if denied:
        res.warnings.append(f"{denied} writes into the store were refused (EROFS)")
    t0 = time.perf_counter()
    if st.get("discard"):
        with m.write() as txn:
            m.delete_ref(txn, st["session_ref"])
        st["state"] = "discarded"
        res.state = "discarded"
    else:
        st["state"] = "harvesting"
        _save_state(store, st)
        base_root = bytes.fromhex(st["view_root"])
        with store.lock(), store.stage() as stage:
            with m.read() as txn:
                done, kept = _already_committed(m, txn, st)
                ref = m.get_ref(txn, st["refs"][-1])
                rules = Rules.from_json(ref.tiers if ref is not None else None)
                if done is None and kept is None:
                    sync = daemon.TreeSync(
                        store,
                        m,
                        os.fsencode(st["target_real"]),
                        Baseline.load(sdir / "baseline"),
                        rules,
                        link=bool(st.get("link")),
                    )
                    result = sync.sync(txn, base_root, {b"": daemon.SUBTREE}, stage)
            if done is not None or kept is not None:
                res.commit, res.conflict_ref = done, kept
            else:
                if result.retry:
                    res.warnings.append(
                        "files kept changing while read at the end: "
                        + ", ".join(paths.display(p) for p in sorted(result.retry)[:5])
                    )
                res.warnings.extend(result.warnings)
                stage.publish()
                with m.write() as txn:
                    for digest, data in result.nodes.items():
                        m.put_raw_node(txn, digest, data)
                    ops = result.ops
                    res.changed = len(ops)
                    top_root = bytes.fromhex(m.get_commit(txn, st["bases"][-1]).root)
                    if st.get("below_root"):  # a stack: the same change, on the top ref alone
                        below = bytes.fromhex(st["below_root"])
                        ops = to_top_ref(m, txn, ops, top_root, below, base_root)
                    new_root = m.apply(txn, top_root, ops) if ops else top_root
                    _commit(m, txn, st, new_root, ops, res)
        st["state"] = "harvested"
        res.state = "harvested"
    res.timings["harvest"] = time.perf_counter() - t0
    st.update(commit=res.commit, conflict_ref=res.conflict_ref, changed=res.changed)
    st["exit_status"] = res.exit_status
    _remove_tree(st)
    for name in ("journal", "baseline", "shim.conf", "daemon.sock"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(sdir / name)
    with contextlib.suppress(OSError):
        projection.force_rmtree(sdir / "locks")
    _save_state(store, st)
    return res


# --- public entry points ------------------------------------------------------------------------
def run_shim(
    store: Store, opts: SessionOptions, argv: list[str], *, interactive: bool = False
) -> SessionResult:
    """Run `argv` in a shim-backend session of `opts.refs` (stacked, later on top); harvest and
    commit to the top ref at exit.

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
    lib = shim.library_path()
    m = Manifests(store)
    try:
        store.writable()
        stack = _resolve(m, opts)
        ref, target = stack.refs[-1], stack.target
        created = prepare_target(target, store)
        sid = _new_id()
        sdir = store.sessions / sid
        store.sessions.mkdir(exist_ok=True)
        os.mkdir(sdir, 0o700)
        os.mkdir(sdir / "locks", 0o700)
        sref = _session_ref(ref.name, sid)
        st: dict[str, Any] = {
            "version": STATE_VERSION,
            "backend": "shim",
            "id": sid,
            "refs": [r.name for r in stack.refs],
            "specs": list(opts.refs),
            "bases": [c.id for c in stack.commits],
            # what gc must keep while the session lives
            "roots": [c.root for c in stack.commits]
            + [r.hex() for r in (stack.view, stack.below) if r is not None],
            "view_root": stack.view.hex(),
            "below_root": stack.below.hex() if stack.below is not None else None,
            "target": target,
            "target_real": os.path.realpath(target),
            "target_created": created,
            "target_mode": 0o755 if created else os.stat(target).st_mode & 0o7777,
            "pid": os.getpid(),
            "pid_start": proc_start(os.getpid()),
            "child": 0,
            "daemon": 0,
            "state": "starting",
            "start": time.time(),
            "form": "link" if link else "copy",
            "protection": "",
            "link": link,
            "uid": os.geteuid(),
            "tiers": ref.tiers,
            "session_ref": sref,
            "socket": _socket_address(sdir, sid),
            "argv": list(argv),
            "discard": opts.discard,
            "commit_to_ref": opts.commit,
            "message": opts.message,
            "warnings": warnings,
        }
        _save_state(store, st)
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
            so = shim.install(store, lib)
            protect = os.geteuid() == 0 and _chattr_ok(store)
            with m.read() as txn:
                mat = materialize(store, m, txn, stack.view, target, link=link, protect=protect)
            mat.baseline.save(sdir / "baseline")
            st["form"] = mat.form
            st["protection"] = _protection(mat.form == "link", mat.tier1_protected)
            st["materialize"] = {"seconds": mat.seconds, "counts": mat.counts}
            warnings.extend(mat.warnings)
            shim.create_journal(sdir / "journal", sid)
            protect_dirs = {os.path.realpath(p) for p in _protected_dirs(store)}
            shim.write_config(
                sdir / "shim.conf",
                root=os.fsencode(st["target_real"]),
                journal=os.fsencode(sdir / "journal"),
                sock=os.fsencode(st["socket"]),
                locks=os.fsencode(sdir / "locks"),
                protect=[os.fsencode(p) for p in sorted(protect_dirs)],
                link=mat.form == "link",
                proxies=mat.proxies,
            )
            _wait_for_clock(mat.max_ctime_ns)
            env = shim.environment(os.environ, so, sdir / "shim.conf")
            start_daemon(store, st)
            st["state"] = "running"
            _save_state(store, st)
        except BaseException:
            _abandon(store, m, st)
            raise
        status = run_command(store, st, argv, env, opts.grace, interactive=interactive)
        stop_daemon(st)
        return _finish(store, m, st, status)
    finally:
        m.close()


def _protected_dirs(store: Store) -> list[Path]:
    from .materialize import proxies_dir

    return [store.objects, projection.ids_dir(store), proxies_dir(store), store.db_path]


def _chattr_ok(store: Store) -> bool:
    """Can this process set +i on files of the store? Tried on a scratch file (the probe's own
    answer forks and mounts: too slow for every session start)."""
    from . import fsflags

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


def _abandon(store: Store, m: Manifests, st: dict[str, Any]) -> None:
    """Undo a session that failed before its command ran."""
    stop_daemon(st)
    with contextlib.suppress(Exception), m.write() as txn:
        m.delete_ref(txn, st["session_ref"])
    with contextlib.suppress(Exception):
        _remove_tree(st)
    st["state"] = "failed"
    with contextlib.suppress(OSError):
        _save_state(store, st)


def resume(store: Store, session_id: str) -> SessionResult:
    """Finish a shim session whose manager died: the journal and the stat-diff of the tree still
    hold every change. Refused while the manager or the command is still running."""
    sdir = store.sessions / session_id
    try:
        st: dict[str, Any] = json.loads((sdir / "state.json").read_text())
    except (FileNotFoundError, ValueError):
        raise VeloError(f"no session {session_id!r}", reason=Reason.SESSION_NOT_FOUND) from None
    if st.get("backend") != "shim":
        raise VeloError(f"session {session_id} is not a shim session", reason=Reason.USAGE)
    if st.get("state") in ("harvested", "discarded", "failed"):
        raise VeloError(f"session {session_id} is already {st['state']}", reason=Reason.USAGE)
    if same_process(int(st.get("pid") or 0), st.get("pid_start")):
        raise VeloError(
            f"session {session_id} is still running (manager pid {st['pid']})",
            reason=Reason.SESSION_ACTIVE,
        )
    if same_process(int(st.get("child") or 0), st.get("child_start")):
        raise VeloError(
            f"the command of session {session_id} is still running (reaper pid {st['child']})",
            reason=Reason.SESSION_ACTIVE,
            hint="wait for it to end, or kill it, then resume again",
        )
    pid = int(st.get("daemon") or 0)
    if same_process(pid, st.get("daemon_start")):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
        for _ in range(500):
            if proc_start(pid) is None:
                break
            time.sleep(0.01)
    status = ShimStatus(top_pid=int(st.get("top_pid") or 0))
    with contextlib.suppress(OSError, ValueError, KeyError):
        rep = json.loads((sdir / "reaper.json").read_text())
        status.exit_status = int(rep["exit"])
        status.killed = [(int(p), str(c)) for p, c in rep.get("killed", [])]
    st["pid"] = os.getpid()
    st["pid_start"] = proc_start(os.getpid())
    _save_state(store, st)
    if not (sdir / "baseline").exists():
        raise VeloError(
            f"session {session_id} never got as far as running its command",
            reason=Reason.SESSION_NOT_FOUND,
        )
    m = Manifests(store)
    try:
        return _finish(store, m, st, status)
    finally:
        m.close()
