"""Sessions: project refs at a directory, run a command there, harvest and commit what it changed.

One code path for root and root-free (DESIGN.md "Sessions" steps 1-5):

1. Resolve the ref(s) (several stack, later wins; the delta goes to the top ref) and ensure the
   lower layers (`projection.ensure_lowers`, locked and cached per root).
2. Create `sessions/<id>/{upper,work}` and `state.json` (refs, base commits, the roots gc must
   keep, target, manager pid, state).
3. Fork a fresh single-threaded child. It unshares user + mount + pid (+ net) — root maps 0->0,
   root-free maps itself (or 0 with `as_root`) — makes `/` private, mounts the overlay on the
   target and THEN binds the whole store read-only onto itself (read-only first would make the
   upper read-only, measured). `lo` comes up for `--net none`.
4. It forks pid 1 of the new pid namespace, which mounts a fresh /proc, enters one more user +
   mount namespace so every mount above is locked (MNT_LOCK_READONLY/MNT_LOCKED: even root in
   the session cannot remount the store writable or unmount the overlay), chdirs again to the
   caller's directory (a shell started inside the target sees the overlay), sets no_new_privs
   and a parent-death SIGKILL, and runs the command as a reaper: when the command exits it sends
   SIGTERM to everything left, waits `grace`, SIGKILLs, and reports what it killed.
5. The manager (this process) ignores SIGINT while the session runs (Ctrl-C reaches only the
   session), waits, then harvests the upper dir and commits: compare-and-swap on the ref from the
   session's base commit, a three-way merge when the ref moved, and a session ref
   `REF@<session>` when the merge conflicts. Nothing is ever dropped.

Every mount lives in the child's namespaces and disappears with them; nothing is mounted on any
path of the caller's namespace. A manager killed with SIGKILL takes the session down with it
(parent-death signals) and leaves `sessions/<id>` in state "running" with a dead pid:
`list_sessions` shows it as unharvested and `harvest_resume` finishes it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from . import ns, overlay, paths, projection, relocation
from .cas import Store
from .errors import Reason, VeloError
from .manifest import Commit, Manifests, Ref, Txn
from .records import Record, field
from .tree import Op

__all__ = [
    "SessionOptions",
    "SessionResult",
    "SessionInfo",
    "run",
    "enter",
    "list_sessions",
    "harvest_resume",
    "clean_sessions",
]

STATE_VERSION = 1
_LIVE_STATES = ("starting", "running", "harvesting")
_DONE_STATES = ("harvested", "discarded", "failed")
_LOG_SCAN = 200  # commits of the ref searched for an earlier commit of this session (resume)


# --- public data ---------------------------------------------------------------------------------
class SessionOptions(Record):
    refs: list[str]  # stacked, later wins; the delta goes to the top (last) ref
    at: str | None = None  # target; default: the top ref's recorded ingest path
    backend: str = "auto"  # auto | overlay | shim
    net: str = "host"  # host | none
    discard: bool = False  # throw the upper away, commit nothing
    commit: bool = True  # False: harvest into REF@<id> only
    message: str | None = None
    strict: bool = False  # refuse any degradation (no +i, fallback lower form)
    as_root: bool = False  # root-free: map yourself to 0 inside
    grace: float = 5.0  # SIGTERM -> grace -> SIGKILL for leftovers when the command exits
    link: bool = False  # shim backend: hard links to proxies with Break-Before-Write


class SessionResult(Record):
    session_id: str
    exit_status: int
    commit: str | None
    conflict_ref: str | None
    changed: int
    backend: str
    lower_form: str
    protection: str
    killed: list[tuple[int, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    ref: str | None = None
    state: str = ""
    conflicts: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per phase

    def to_dict(self) -> dict[str, Any]:
        return {
            "session_id": self.session_id,
            "exit_status": self.exit_status,
            "commit": self.commit,
            "conflict_ref": self.conflict_ref,
            "conflicts": self.conflicts,
            "changed": self.changed,
            "backend": self.backend,
            "lower_form": self.lower_form,
            "protection": self.protection,
            "killed": [{"pid": p, "comm": c} for p, c in self.killed],
            "warnings": self.warnings,
            "ref": self.ref,
            "state": self.state,
            "timings": {k: round(v, 6) for k, v in self.timings.items()},
        }


class SessionInfo(Record):
    id: str
    refs: list[str]
    state: str  # running | dead-unharvested | harvested | discarded | failed | starting
    start: float
    pid: int
    target: str
    commit: str | None = None
    conflict_ref: str | None = None
    warnings: list[str] = field(default_factory=list)  # what the session said at its start

    def to_dict(self) -> dict[str, Any]:
        return {
            "warnings": self.warnings,
            "id": self.id,
            "refs": self.refs,
            "state": self.state,
            "start": self.start,
            "start_iso": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(self.start)),
            "pid": self.pid,
            "target": self.target,
            "commit": self.commit,
            "conflict_ref": self.conflict_ref,
        }


# --- capabilities (probe once per boot, cached in the store) ------------------------------------
def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return ""


class _Caps:
    """The probe's answers (feature -> (ok, reason)), cached per boot, kernel and euid in the
    store: `probe.detect()` forks and mounts (~20 ms), and importing it costs too. The feature
    `store_xattrs` says whether the store's filesystem holds user xattrs (overlay keeps its
    markers there), checked for the filesystem the store is on now."""

    def __init__(self, features: dict[str, tuple[bool, str]]) -> None:
        self.features = features

    def ok(self, name: str) -> bool:
        return self.features.get(name, (False, ""))[0]

    def reason(self, name: str) -> str:
        return self.features.get(name, (False, f"unknown feature {name!r}"))[1]


def _capabilities(store: Store) -> _Caps:
    path = store.trees / f"probe-{os.geteuid()}.json"
    key = {
        "boot_id": _boot_id(),
        "kernel": os.uname().release,
        "store_dev": os.stat(store.sessions).st_dev,
    }
    with contextlib.suppress(FileNotFoundError, ValueError, KeyError, TypeError):
        data = json.loads(path.read_text())
        if data["key"] == key:
            return _Caps({n: (bool(v[0]), str(v[1])) for n, v in data["features"].items()})

    # Probe afresh: a cached answer of this process may predate a change of identity.
    from . import probe

    caps = probe.detect(refresh=True)
    feats = {n: (f.ok, f.reason) for n, f in caps.features.items()}
    xattrs = probe.user_xattrs(store.sessions)
    feats["store_xattrs"] = (xattrs.ok, xattrs.reason)
    with contextlib.suppress(OSError):
        projection._write_json_atomic(path, {"key": key, "kernel": caps.kernel, "features": feats})
    return _Caps(feats)


_LOWER_FORMS = ("data-only", "links")  # probe.LOWER_FORMS (not imported on the warm path)


def _choose_form(caps: _Caps, privileged: bool) -> tuple[str, bool]:
    """(form, forced) — probe.lower_form's rule, over the cached capabilities."""
    suffix = "root" if privileged else "userns"
    data_only = (caps.ok("data_only_" + suffix), caps.reason("data_only_" + suffix))
    links = (caps.ok("overlay_" + suffix), caps.reason("overlay_" + suffix))
    forced = os.environ.get("VELO_FORCE_LOWER", "").strip()
    if forced:
        if forced not in _LOWER_FORMS:
            raise VeloError(
                f"VELO_FORCE_LOWER={forced!r} is not one of {', '.join(_LOWER_FORMS)}",
                reason=Reason.USAGE,
            )
        needed = data_only if forced == "data-only" else links
        if not needed[0]:
            raise VeloError(
                f"VELO_FORCE_LOWER={forced} but that lower form is unavailable: {needed[1]}",
                reason=Reason.OVERLAY_UNSUPPORTED,
            )
        return forced, True
    if data_only[0]:
        return "data-only", False
    if links[0]:
        return "links", False
    raise VeloError(
        f"this host cannot mount an overlay {'as root' if privileged else 'root-free'}: {links[1]}",
        reason=Reason.BACKEND_UNAVAILABLE,
        hint="the shim backend (--backend shim) is not available yet",
    )


# --- state files ---------------------------------------------------------------------------------
def _new_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + os.urandom(3).hex()


def _state_path(store: Store, sid: str) -> Path:
    return store.sessions / sid / "state.json"


def _load_state(store: Store, sid: str) -> dict[str, Any]:
    if not sid or "/" in sid or sid.startswith("."):
        raise VeloError(f"bad session id {sid!r}", reason=Reason.SESSION_NOT_FOUND)
    try:
        data: dict[str, Any] = json.loads(_state_path(store, sid).read_text())
    except FileNotFoundError:
        raise VeloError(
            f"no session {sid!r}",
            reason=Reason.SESSION_NOT_FOUND,
            hint="'veloverlay sessions' lists the sessions of this store",
        ) from None
    except ValueError as exc:
        raise VeloError(
            f"session {sid}: unreadable state file ({exc})", reason=Reason.SESSION_NOT_FOUND
        ) from None
    return data


def _save_state(store: Store, st: dict[str, Any]) -> None:
    projection._write_json_atomic(_state_path(store, st["id"]), st)


def _alive(st: dict[str, Any]) -> bool:
    pid = int(st.get("pid") or 0)
    return pid > 0 and ns.proc_start(pid) == st.get("pid_start")


# --- target ------------------------------------------------------------------------------------
def _inside(a: str, b: str) -> bool:
    return a == b or a.startswith(b.rstrip("/") + "/")


def _resolve_target(store: Store, at: str | None, top: Ref) -> str:
    where = at if at is not None else top.path
    if not where:
        raise VeloError(
            f"ref {top.name!r} has no recorded path to project at",
            reason=Reason.TARGET_INVALID,
            hint="pass --at DIR",
        )
    real = os.path.realpath(os.path.abspath(where))
    sroot = os.path.realpath(store.root)
    if _inside(real, sroot) or _inside(sroot, real):
        raise VeloError(
            f"the target {real} contains or lies inside the store {sroot}",
            reason=Reason.TARGET_INVALID,
            hint="project somewhere outside the store (--at DIR)",
            path=real,
        )
    if real == "/":
        raise VeloError("cannot project over /", reason=Reason.TARGET_INVALID, path=real)
    if os.path.isdir(real):
        return real
    if os.path.lexists(real):
        raise VeloError(
            f"the target {real} exists and is not a directory",
            reason=Reason.TARGET_INVALID,
            path=real,
        )
    parent = os.path.dirname(real)
    if not (os.path.isdir(parent) and os.access(parent, os.W_OK | os.X_OK)):
        raise VeloError(
            f"the target {real} does not exist and its parent is not writable",
            reason=Reason.TARGET_INVALID,
            hint="pass --at DIR (an existing directory, or one whose parent is writable)",
            path=real,
        )
    os.mkdir(real, 0o755)
    return real


# --- preparing a session -----------------------------------------------------------------------
class _Plan(Record):
    sid: str
    refs: list[Ref]
    commits: list[Commit]
    view_root: bytes
    below_root: bytes | None  # the stack without the top ref (None: a single ref)
    target: str
    lowers: projection.Lowers
    form: str
    protection: str
    privileged: bool
    warnings: list[str]


def _ancestors(m: Manifests, txn: Txn, commit: Commit, limit: int = 32) -> list[bytes]:
    out: list[bytes] = []
    cid = commit.parent
    while cid is not None and len(out) < limit:
        try:
            c = m.get_commit(txn, cid)
        except VeloError:
            break
        out.append(bytes.fromhex(c.root))
        cid = c.parent
    return out


def relocation_warnings(
    store: Store,
    m: Manifests,
    root: bytes,
    original: str | None,
    target: str,
    ancestors: list[bytes] | None = None,
) -> list[str]:
    """Projected away from where it was ingested, a tree's baked absolute paths (venv scripts,
    pyvenv.cfg, .pc files) still name the original place: say which (issue: real envs)."""
    if not original or os.path.realpath(original) == os.path.realpath(target):
        return []
    count, found = relocation.cached_find_baked(store, m, root, original, ancestors=ancestors or [])
    if not count:
        return []
    shown = ", ".join(found[:3]) + (", ..." if count > 3 else "")
    return [
        f"{count} files name the ingest path {original} ({shown}); projected at {target} "
        f"they still point there: project at {original} (the default) to keep them working"
    ]


def _prepare(store: Store, m: Manifests, opts: SessionOptions) -> _Plan:
    if not opts.refs:
        raise VeloError("name at least one ref", reason=Reason.USAGE)
    if opts.backend == "shim":
        raise VeloError("the shim backend is not available yet", reason=Reason.BACKEND_UNAVAILABLE)
    if opts.backend not in ("auto", "overlay"):
        raise VeloError(f"unknown backend {opts.backend!r}", reason=Reason.USAGE)
    if opts.net not in ("host", "none"):
        raise VeloError(f"unknown network mode {opts.net!r}", reason=Reason.USAGE)
    caps = _capabilities(store)
    privileged = caps.ok("root")
    if not caps.ok("overlay_root" if privileged else "overlay_userns"):
        why = caps.reason("overlay_root" if privileged else "overlay_userns")
        raise VeloError(
            f"overlay sessions are not possible here: {why}",
            reason=Reason.BACKEND_UNAVAILABLE,
            hint="the shim backend is not available yet",
        )
    if not caps.ok("store_xattrs"):
        raise VeloError(
            "overlay sessions need user xattrs on the store's filesystem: "
            + caps.reason("store_xattrs"),
            reason=Reason.BACKEND_UNAVAILABLE,
            hint="keep the store on ext4/xfs/btrfs (or tmpfs on Linux >= 6.6), or use the shim",
        )
    form, forced = _choose_form(caps, privileged)
    warnings: list[str] = []
    protect = privileged and caps.ok("chattr")
    if form == "links":
        why = "forced by VELO_FORCE_LOWER" if forced else "data-only lowers are unavailable"
        warnings.append(
            f"lower form 'links' ({why}): file mtimes show as 1970-01-01 00:00:01 and files "
            "with equal content and mode share an inode number"
        )
        if opts.strict:
            raise VeloError(
                f"--strict: the proxy-link lower form is a fallback ({why})",
                reason=Reason.FALLBACK_FORBIDDEN,
            )
    if not protect:
        why = caps.reason("chattr") if privileged else "not root"
        if opts.strict:
            raise VeloError(
                f"--strict: store objects cannot be made immutable ({why})",
                reason=Reason.IMMUTABLE_DENIED,
                hint="without --strict the store is still read-only inside the session; "
                "'veloverlay fsck' detects changes made outside sessions",
            )
    # A stack writes its merged nodes; a single ref only reads (no write lock on the warm path).
    with m.write() if len(opts.refs) > 1 else m.read() as txn:
        resolved = [m.resolve(txn, spec) for spec in opts.refs]
        refs = [r for r, _ in resolved]
        commits = [c for _, c in resolved]
        roots = [bytes.fromhex(c.root) for c in commits]
        view = projection.stack_roots(m, txn, roots)
        below = projection.stack_roots(m, txn, roots[:-1]) if len(roots) > 1 else None
        hints = _ancestors(m, txn, commits[-1]) if len(roots) == 1 else []
    target = _resolve_target(store, opts.at, refs[-1])
    warnings.extend(relocation_warnings(store, m, view, refs[-1].path, target, hints))
    lowers = projection.ensure_lowers(store, m, view, form=form, protect=protect, hints=hints)
    if lowers.warning:
        warnings.append(lowers.warning)
    if lowers.immutable:
        protection = "immutable"  # +i on every referenced object, store read-only inside
    else:
        protection = "read-only-mount"  # store read-only inside the session only
        if protect:
            warnings.append(lowers.protection_note)
        if opts.strict:
            raise VeloError(f"--strict: {lowers.protection_note}", reason=Reason.IMMUTABLE_DENIED)
    return _Plan(
        sid=_new_id(),
        refs=refs,
        commits=commits,
        view_root=view,
        below_root=below,
        target=target,
        lowers=lowers,
        form=form,
        protection=protection,
        privileged=privileged,
        warnings=warnings,
    )


def _make_session_dir(store: Store, plan: _Plan, m: Manifests, opts: SessionOptions) -> str:
    sdir = store.sessions / plan.sid
    store.sessions.mkdir(exist_ok=True)
    os.mkdir(sdir, 0o700)
    upper, work = sdir / "upper", sdir / "work"
    os.mkdir(upper, 0o700)
    os.mkdir(work, 0o700)
    # The merged root shows the upper root's attributes: give it the view's.
    with m.read() as txn:
        node = m.get_node(txn, plan.view_root)
    os.chmod(upper, node.mode)
    os.utime(upper, ns=(node.mtime_ns, node.mtime_ns))
    roots = {c.root for c in plan.commits} | {plan.view_root.hex()}
    if plan.below_root is not None:
        roots.add(plan.below_root.hex())
    st = {
        "version": STATE_VERSION,
        "id": plan.sid,
        "refs": [r.name for r in plan.refs],
        "specs": list(opts.refs),
        "bases": [c.id for c in plan.commits],
        "roots": sorted(roots),
        "view_root": plan.view_root.hex(),
        "below_root": plan.below_root.hex() if plan.below_root is not None else None,
        "target": plan.target,
        "pid": os.getpid(),
        "pid_start": ns.proc_start(os.getpid()),
        "child": 0,
        "state": "starting",
        "start": time.time(),
        "form": plan.form,
        "protection": plan.protection,
        "layers": list(plan.lowers.layers),
        "discard": opts.discard,
        "commit_to_ref": opts.commit,
        "message": opts.message,
        "warnings": plan.warnings,
    }
    _save_state(store, st)
    return os.fspath(sdir)


# --- the session ---------------------------------------------------------------------------------
def _session(
    store: Store, opts: SessionOptions, argv: list[str], *, interactive: bool
) -> SessionResult:
    if not argv:
        raise VeloError("no command to run", reason=Reason.USAGE)
    if opts.net == "none" and opts.backend not in ("auto", "overlay"):
        raise VeloError("--net none needs the overlay backend", reason=Reason.USAGE)
    m = Manifests(store)
    try:
        t0 = time.perf_counter()
        plan = _prepare(store, m, opts)
        t_prepared = time.perf_counter()
        sdir = _make_session_dir(store, plan, m, opts)
        st = _load_state(store, plan.sid)
        spec = overlay.spec_for(
            plan.lowers,
            upper=os.path.join(sdir, "upper"),
            work=os.path.join(sdir, "work"),
            target=plan.target,
        )
        env = dict(os.environ)
        env["VELO_SESSION"] = plan.sid
        env["VELO_SESSION_REF"] = plan.refs[-1].name
        if interactive:
            env["PS1"] = f"(velo:{plan.refs[-1].name}) \\w\\$ "
        try:
            cwd = os.getcwd()
        except OSError:
            cwd = plan.target
        rfd, wfd = os.pipe2(os.O_CLOEXEC)
        ctx = overlay.ChildSpec(
            spec=spec,
            store_root=os.fspath(store.root),
            readonly=[plan.lowers.home] if plan.lowers.home != os.fspath(store.trees) else [],
            cwd=cwd,
            argv=list(argv),
            env=env,
            as_root=opts.as_root,
            net_none=opts.net == "none",
            grace=opts.grace,
            report_fd=wfd,
            manager_pid=os.getpid(),
            tty_foreground=ns.tty_foreground(),
        )
        child: list[int] = [0]
        with overlay.manager_signals(child):
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:  # pragma: no cover - runs in the child
                try:
                    os.close(rfd)
                    overlay.child_main(ctx)
                finally:
                    os._exit(70)
            child[0] = pid
            os.close(wfd)
            st["child"] = pid
            st["state"] = "running"
            _save_state(store, st)
            try:
                report = overlay.read_report(rfd, pid)
            finally:
                os.close(rfd)
                while True:
                    try:
                        _, wstatus = os.waitpid(pid, 0)
                        break
                    except InterruptedError:
                        continue
            if ctx.tty_foreground:
                ns.reclaim_terminal()
        if "error" in report:
            err = report["error"]
            st["state"] = "failed"
            st["error"] = err
            _save_state(store, st)
            projection.force_rmtree(os.path.join(sdir, "upper"))
            projection.force_rmtree(os.path.join(sdir, "work"))
            raise VeloError(
                f"the session could not start: {err.get('message')}",
                reason=Reason(err.get("reason", Reason.SYSCALL.value)),
                hint=err.get("hint"),
            )
        if "status" in report:
            exit_status = int(report["status"])
        else:
            # pid 1 died without a report (killed): the session ended abnormally.
            code = os.waitstatus_to_exitcode(wstatus)
            exit_status = 128 - code if code < 0 else (code or 137)
        killed = [(int(p), str(c)) for p, c in report.get("killed", [])]
        st["exit_status"] = exit_status
        st["killed"] = killed  # saved with the "harvesting" state
        t_ran = time.perf_counter()
        res = _finish(store, m, st)
        res.timings = {
            "prepare": t_prepared - t0,
            "lowers": plan.lowers.seconds,
            "run": t_ran - t_prepared,
            **res.timings,
            "total": time.perf_counter() - t0,
        }
        res.killed = killed
        res.warnings = plan.warnings + res.warnings
        if killed:
            shown = ", ".join(f"{c}[{p}]" for p, c in killed[:10])
            res.warnings.append(f"processes left when the command exited were ended: {shown}")
        return res
    finally:
        m.close()


# --- harvest and commit ------------------------------------------------------------------------
def _already_committed(m: Manifests, txn: Txn, st: dict[str, Any]) -> tuple[str | None, str | None]:
    """(commit on the ref, session ref) if an earlier run of this session got as far."""
    sid = st["id"]
    top = st["refs"][-1]
    sref = _session_ref_name(top, sid)
    r = m.get_ref(txn, sref)
    if r is not None:
        return None, sref
    ref = m.get_ref(txn, top)
    cid = ref.head if ref is not None else None
    n = 0
    while cid is not None and n < _LOG_SCAN:
        c = m.get_commit(txn, cid)
        if c.session == sid:
            return c.id, None
        if c.id in st["bases"]:
            break
        cid = c.parent
        n += 1
    return None, None


def _session_ref_name(top: str, sid: str) -> str:
    return f"{top.split('@', 1)[0]}@{sid}"


def _finish(store: Store, m: Manifests, st: dict[str, Any]) -> SessionResult:
    """Harvest the upper dir of a finished session and commit it (or discard it)."""
    sid = st["id"]
    sdir = store.sessions / sid
    res = SessionResult(
        session_id=sid,
        exit_status=int(st.get("exit_status", -1) if st.get("exit_status") is not None else -1),
        commit=None,
        conflict_ref=None,
        changed=0,
        backend="overlay",
        lower_form=st["form"],
        protection=st["protection"],
        ref=st["refs"][-1],
    )
    if st.get("discard"):
        st["state"] = "discarded"
        _save_state(store, st)
        _drop_upper(sdir)
        res.state = "discarded"
        return res
    t_start = time.perf_counter()
    st["state"] = "harvesting"
    _save_state(store, st)
    if _untouched(sdir / "upper", bytes.fromhex(st["view_root"]), m):
        # Nothing reached the upper dir: no store lock, no staging, no transaction.
        st.update(state="harvested", commit=None, conflict_ref=None, changed=0)
        _save_state(store, st)
        _drop_upper(sdir)
        res.state = "harvested"
        res.timings = {"harvest": time.perf_counter() - t_start, "commit": 0.0}
        return res
    top_name = st["refs"][-1]
    view_root = bytes.fromhex(st["view_root"])
    below_root = bytes.fromhex(st["below_root"]) if st.get("below_root") else None
    base_cid = st["bases"][-1]
    with store.lock(), store.stage() as stage:
        store.reclaim_tmp()  # stages of writers that died, e.g. a manager killed mid-harvest
        with m.read() as txn:
            done, done_ref = _already_committed(m, txn, st)
            base = m.get_commit(txn, base_cid)
            ref = m.get_ref(txn, top_name)
            from .harvest import harvest_upper  # not needed when nothing changed
            from .tiers import Rules

            rules = Rules.from_json(ref.tiers if ref is not None else None)
            if done is None and done_ref is None:
                h = harvest_upper(
                    store, m, txn, sdir / "upper", view_root, stage, form=st["form"], rules=rules
                )
        if done is not None or done_ref is not None:
            res.commit, res.conflict_ref = done, done_ref
            res.state = "harvested"
            st.update(state="harvested", commit=done, conflict_ref=done_ref)
            _save_state(store, st)
            _drop_upper(sdir)
            return res
        res.warnings.extend(h.warnings)
        new_objects = list(stage.staged)
        t_harvested = time.perf_counter()
        stage.publish()
        if st["protection"] == "immutable" and new_objects:
            failed = projection.name_and_protect(store, m, new_objects)
            if failed:
                res.warnings.append("chattr +i failed for new objects: " + "; ".join(failed))
        message = st.get("message") or f"session {sid}"
        with m.write() as txn:
            for digest, data in h.nodes.items():
                m.put_raw_node(txn, digest, data)
            base_root = bytes.fromhex(base.root)
            ops = h.ops
            if below_root is not None:
                from .harvest import to_top_ref

                ops = to_top_ref(m, txn, ops, base_root, below_root, view_root)
            res.changed = len(h.ops)
            new_root = m.apply(txn, base_root, ops) if ops else base_root
            if new_root != base_root:
                _commit(m, txn, st, top_name, base, base_root, new_root, ops, message, res)
    res.timings = {
        "harvest": t_harvested - t_start,
        "commit": time.perf_counter() - t_harvested,
    }
    st.update(state="harvested", commit=res.commit, conflict_ref=res.conflict_ref)
    st["changed"] = res.changed
    _save_state(store, st)
    _drop_upper(sdir)
    res.state = "harvested"
    return res


def _commit(
    m: Manifests,
    txn: Txn,
    st: dict[str, Any],
    top_name: str,
    base: Commit,
    base_root: bytes,
    new_root: bytes,
    ops: list[Op],
    message: str,
    res: SessionResult,
) -> None:
    sid = st["id"]
    ref = m.get_ref(txn, top_name)
    head = ref.head if ref is not None else None
    if st.get("commit_to_ref", True) and ref is not None:
        if head == base.id:
            c = m.commit(
                txn,
                top_name,
                new_root,
                expect_head=base.id,
                message=message,
                session=sid,
                delta=ops,
            )
            res.commit = c.id
            return
        assert head is not None
        head_root = bytes.fromhex(m.get_commit(txn, head).root)
        from .merge import three_way

        mr = three_way(m, txn, base_root, new_root, head_root)
        if mr.root is not None:
            if mr.root != head_root:
                c = m.commit(
                    txn,
                    top_name,
                    mr.root,
                    expect_head=head,
                    message=message + " (merged)",
                    session=sid,
                    delta=list(mr.applied),
                )
                res.commit = c.id
            else:
                res.commit = head  # the ref already holds every change of the session
            return
        res.conflicts = [paths.display(p) for p in mr.conflicts]
    # Conflict, --no-commit, or the ref vanished: keep the session's tree as REF@<session>.
    name = _session_ref_name(top_name, sid)
    c = m.put_commit(
        txn, ref=name, root=new_root, parent=base.id, message=message, session=sid, delta=ops
    )
    m.put_ref(
        txn,
        Ref(name, c.id, ref.path if ref else None, ref.tiers if ref else None, None),
    )
    res.conflict_ref = name


def _untouched(upper: Path, view_root: bytes, m: Manifests) -> bool:
    """The session changed nothing: an empty upper dir with the view root's mode and mtime."""
    try:
        if os.listdir(upper):
            return False
        st = os.stat(upper)
    except OSError:
        return False
    with m.read() as txn:
        node = m.get_node(txn, view_root)
    return (st.st_mode & 0o7777, st.st_mtime_ns) == (node.mode, node.mtime_ns)


def _drop_upper(sdir: Path) -> None:
    for name in ("upper", "work"):
        with contextlib.suppress(OSError):
            projection.force_rmtree(sdir / name)


# --- public verbs --------------------------------------------------------------------------------
def choose_backend(store: Store, opts: SessionOptions) -> tuple[str, str]:
    """(backend, why): the one asked for, or with `auto` overlay where this host can mount it
    for this store (kernel, user namespaces, user xattrs on the store), else the shim."""
    if opts.backend in ("overlay", "shim"):
        return opts.backend, "asked for"
    caps = _capabilities(store)
    feature = "overlay_root" if caps.ok("root") else "overlay_userns"
    if not caps.ok(feature):
        return "shim", caps.reason(feature)
    if not caps.ok("store_xattrs"):
        return "shim", caps.reason("store_xattrs")
    return "overlay", caps.reason(feature)


def _dispatch(
    store: Store, opts: SessionOptions, argv: list[str], *, interactive: bool
) -> SessionResult:
    backend, why = choose_backend(store, opts)
    if backend == "overlay":
        return _session(store, opts, argv, interactive=interactive)
    if opts.backend == "auto" and opts.strict:
        raise VeloError(
            f"--strict: overlay is unavailable here ({why}); the shim would be a fallback",
            reason=Reason.FALLBACK_FORBIDDEN,
        )
    from . import shim_backend

    res = shim_backend.run_shim(store, opts, argv, interactive=interactive)
    if opts.backend == "auto":  # P0-d: a degradation is said, never silent
        res.warnings.insert(0, f"overlay is unavailable here ({why}): used the shim backend")
    return res


def run(
    store: Store, opts: SessionOptions, argv: list[str], *, interactive: bool = False
) -> SessionResult:
    """Run `argv` in a session of `opts.refs`; harvest and commit when it exits."""
    return _dispatch(store, opts, argv, interactive=interactive)


def enter(store: Store, opts: SessionOptions) -> SessionResult:
    """An interactive $SHELL in a session (the prompt names the ref)."""
    shell = os.environ.get("SHELL") or "/bin/sh"
    return _dispatch(store, opts, [shell, "-i"], interactive=True)


def _info(store: Store, st: dict[str, Any]) -> SessionInfo:
    state = str(st.get("state", "?"))
    if state in _LIVE_STATES and not _alive(st):
        state = "dead-unharvested"
    return SessionInfo(
        id=str(st.get("id")),
        refs=list(st.get("refs", [])),
        state=state,
        start=float(st.get("start", 0.0)),
        pid=int(st.get("pid") or 0),
        target=str(st.get("target", "")),
        commit=st.get("commit"),
        conflict_ref=st.get("conflict_ref"),
        warnings=[str(w) for w in st.get("warnings", [])],
    )


def _iter_states(store: Store) -> Iterator[dict[str, Any]]:
    try:
        names = sorted(os.listdir(store.sessions))
    except FileNotFoundError:
        return
    for sid in names:
        try:
            yield _load_state(store, sid)
        except VeloError:
            continue


def list_sessions(store: Store) -> list[SessionInfo]:
    return [_info(store, st) for st in _iter_states(store)]


def harvest_resume(store: Store, session_id: str | None) -> list[SessionResult]:
    """Harvest sessions whose manager died (one, or all of them with None)."""
    if session_id is not None:
        states = [_load_state(store, session_id)]
    else:
        states = list(_iter_states(store))
    out: list[SessionResult] = []
    m = Manifests(store)
    try:
        for st in states:
            info = _info(store, st)
            if st.get("backend") == "shim" and info.state not in ("harvested", "discarded"):
                from . import shim_backend

                try:
                    out.append(shim_backend.resume(store, str(st["id"])))
                except VeloError as exc:
                    if session_id is not None or exc.reason is not Reason.SESSION_ACTIVE:
                        raise
                continue
            if info.state in ("harvested", "discarded", "failed"):
                if session_id is not None:
                    raise VeloError(
                        f"session {st['id']} is already {info.state}",
                        reason=Reason.USAGE,
                    )
                continue
            if info.state != "dead-unharvested":
                if session_id is not None:
                    raise VeloError(
                        f"session {st['id']} is still running (manager pid {info.pid})",
                        reason=Reason.SESSION_ACTIVE,
                    )
                continue
            child = int(st.get("child") or 0)
            if child > 0 and ns.proc_start(child) is not None:
                # A parent-death SIGKILL is on its way; make sure before reading the upper.
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(child, signal.SIGKILL)
                for _ in range(200):
                    if ns.proc_start(child) is None:
                        break
                    time.sleep(0.01)
            # Take over the session so that a concurrent resume does not harvest it twice.
            st["pid"] = os.getpid()
            st["pid_start"] = ns.proc_start(os.getpid())
            _save_state(store, st)
            res = _finish(store, m, st)
            res.exit_status = int(
                st.get("exit_status", -1) if st.get("exit_status") is not None else -1
            )
            out.append(res)
    finally:
        m.close()
    return out


def clean_sessions(store: Store) -> int:
    """Remove the directories of harvested, discarded and failed sessions."""
    removed = 0
    for st in list(_iter_states(store)):
        info = _info(store, st)
        if info.state in _DONE_STATES:
            projection.force_rmtree(store.sessions / info.id)
            removed += 1
    return removed
