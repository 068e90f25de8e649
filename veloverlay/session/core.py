"""Sessions: project refs at a directory, run a command there, harvest and commit what it changed.

The verbs (`run`, `enter`, `list_sessions`, `harvest_resume`, `clean_sessions`) over the two
backends. session/select.py decides which backend a session gets; the backend makes the view and
reads its changes (session/overlay/backend.py: an overlay mount, its upper dir;
session/shim/backend.py: a materialised tree, the shim's journal and a stat-diff); what both
share lives beside this module: the options and results (options.py), the state file
(state.py), the refs and the target (target.py), the reaper and its protocol (reaper.py), and
harvest-and-commit (commit.py). A backend that is unavailable where `auto` asked for it is said,
never silent (P0-d).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from veloverlay import paths
from veloverlay.errors import Reason, VeloError
from veloverlay.files import force_rmtree, given_path
from veloverlay.progress import Progress
from veloverlay.session import prompt, state
from veloverlay.session.options import OnStart, SessionInfo, SessionOptions, SessionResult
from veloverlay.session.select import Choice, capabilities, decide
from veloverlay.store.cas import Store
from veloverlay.store.manifest import Manifests

if TYPE_CHECKING:
    from veloverlay.session.harvest import SetAside

__all__ = [
    "SessionOptions",
    "SessionResult",
    "SessionInfo",
    "choose_backend",
    "run",
    "enter",
    "list_sessions",
    "harvest_resume",
    "clean_sessions",
    "live_changes",
    "mount",
    "umount",
]


def choose_backend(store: Store, opts: SessionOptions) -> Choice:
    """The backend (and lower form) a session with `opts` gets on this host for this store."""
    return decide(capabilities(store), opts.backend)


def _pull_remote_refs(store: Store, opts: SessionOptions) -> SessionOptions:
    """A ref written as a remote (`HOST[:PORT]/REPO:TAG`; a ref name never holds '/') is pulled
    first, as `pull` does: the objects of its whole closure the store lacks, verified, before the
    command starts (root-free there is no lazy fetch). The session then runs on the local ref."""
    if not any("/" in r for r in opts.refs):
        return opts
    from veloverlay.remote import pull
    from veloverlay.store.manifest import Manifests

    m = Manifests(store)
    try:
        refs = [pull(store, m, r).ref if "/" in r else r for r in opts.refs]
    finally:
        m.close()
    return opts.replace(refs=refs)


def _dispatch(
    store: Store,
    opts: SessionOptions,
    argv: list[str],
    *,
    interactive: bool,
    on_start: OnStart | None,
    progress: Progress | None = None,
) -> SessionResult:
    # (a store of a newer schema is refused before anything writes in it: the probe's cache
    # checks before it writes, pulling and the backends open the manifests first)
    opts = _pull_remote_refs(store, opts)
    choice = choose_backend(store, opts)
    if choice.backend == "overlay":
        from veloverlay.session.overlay.backend import run_session

        return run_session(
            store,
            opts,
            argv,
            choice,
            interactive=interactive,
            on_start=on_start,
            progress=progress,
        )
    if opts.backend == "auto" and opts.strict:
        raise VeloError(
            f"--strict: overlay is unavailable here ({choice.backend_reason}); the shim would "
            "be a fallback",
            reason=Reason.FALLBACK_FORBIDDEN,
        )
    from veloverlay.session.shim.backend import run_shim

    res = run_shim(store, opts, argv, interactive=interactive, on_start=on_start, progress=progress)
    if opts.backend == "auto":  # P0-d: a degradation is said, never silent
        res.warnings.insert(
            0, f"overlay is unavailable here ({choice.backend_reason}): used the shim backend"
        )
    return res


def run(
    store: Store,
    opts: SessionOptions,
    argv: list[str],
    *,
    interactive: bool = False,
    on_start: OnStart | None = None,
    progress: Progress | None = None,
) -> SessionResult:
    """Run `argv` in a session of `opts.refs`; harvest and commit when it exits.

    `on_start(info)` is called once the view is ready, just before the command starts;
    `progress` hears how a build of the lower layers goes (overlay; a warm start builds none) or
    the shim's materialisation of the tree."""
    return _dispatch(
        store, opts, argv, interactive=interactive, on_start=on_start, progress=progress
    )


def enter(
    store: Store,
    opts: SessionOptions,
    *,
    on_start: OnStart | None = None,
    progress: Progress | None = None,
) -> SessionResult:
    """An interactive $SHELL in a session (the prompt names the ref, see session/prompt.py)."""
    shell = os.environ.get("SHELL") or "/bin/sh"
    argv = prompt.shell_argv(shell)
    return _dispatch(store, opts, argv, interactive=True, on_start=on_start, progress=progress)


def list_sessions(store: Store) -> list[SessionInfo]:
    return [state.info(store, st) for st in state.iter_states(store)]


def harvest_resume(
    store: Store,
    session_id: str | None,
    failed: list[tuple[str, Exception]] | None = None,
    *,
    set_aside: str | None = None,
) -> list[SessionResult]:
    """Harvest sessions whose manager died (one, or all of them with None). With `failed`, all
    of them are tried: a session that cannot be harvested now (a full store, a damaged upper
    dir) is put there with its error, and the next one is harvested all the same; without it,
    the first error ends the walk. `set_aside` (one session only): a new directory where what
    the session made too deep to keep is moved, so that the rest can be committed."""
    from veloverlay.session.harvest import SetAside

    if set_aside is not None and session_id is None:
        raise VeloError("--set-aside goes with --resume ID (one session)", reason=Reason.USAGE)
    aside = SetAside(set_aside, store.root) if set_aside is not None else None
    store.writable()  # a shared store's other users: STORE_PERMISSION, not "0 harvested"
    if session_id is not None:
        states = [state.load(store, session_id)]
    else:
        states = list(state.iter_states(store))
        if failed is not None:  # never passed over in silence ("harvested 0 sessions")
            failed.extend(state.damaged(store))
    out: list[SessionResult] = []
    for st in states:
        try:
            with state.finishing(store, st.id) as now:  # what another harvest left of it
                res = _harvest_one(store, now, session_id, aside)
        except (VeloError, OSError) as exc:
            if failed is None or session_id is not None:
                raise
            failed.append((st.id, exc))
            continue
        if res is not None:
            out.append(res)
    return out


def _harvest_one(
    store: Store, st: state.State, session_id: str | None, aside: SetAside | None = None
) -> SessionResult | None:
    """`harvest_resume` of one session: its result, or None where there is nothing to do."""
    shown = st.shown_state(store)
    if st.backend == "shim" and shown not in state.DONE_STATES:
        from veloverlay.session.shim.backend import resume as resume_shim

        try:
            return resume_shim(store, st.id, aside)
        except VeloError as exc:
            if session_id is not None or exc.reason is not Reason.SESSION_ACTIVE:
                raise
        return None
    if shown in state.DONE_STATES:
        if session_id is not None:
            raise VeloError(f"session {st.id} is already {shown}", reason=Reason.USAGE)
        return None
    if shown == "mounted":
        if session_id is not None:
            here = _mounted_here(st)
            bound = [] if here else _bound_here(st)
            raise VeloError(
                f"session {st.id} is mounted on {st.mounted_at}"
                if here
                else f"session {st.id} is mounted on {bound[0]} (a bind mount of it)"
                if bound
                else f"session {st.id} is mounted on {st.mounted_at} in another mount namespace",
                reason=Reason.SESSION_ACTIVE,
                hint=f"veloverlay umount {st.mounted_at}"
                if here
                else f"umount {bound[0]}, then run this again"
                if bound
                else "a namespace made while it was mounted holds a copy (unshare -m, a "
                "container): end its processes, then run this again",
            )
        return None
    if shown == "held":
        if session_id is not None:
            from veloverlay.session.holders import holders

            shown_pids = ", ".join(str(p) for p in holders(st.is_upper)[:5])
            raise VeloError(
                f"session {st.id} has ended, but processes outside it can still write its "
                f"projection (pids {shown_pids})",
                reason=Reason.SESSION_ACTIVE,
                hint="end them (or close what they opened there), then run this again",
            )
        return None
    if shown != "dead-unharvested":
        if session_id is not None:
            raise VeloError(
                f"session {st.id} is still running (manager pid {st.pid})",
                reason=Reason.SESSION_ACTIVE,
            )
        return None
    from veloverlay.session.overlay.backend import resume as resume_overlay

    try:
        res = resume_overlay(store, st, aside)
    finally:
        if aside is not None:
            aside.close()
    res.exit_status = st.exit_status if st.exit_status is not None else -1
    return res


def _mounted_here(st: state.State) -> bool:
    try:
        return st.mounted_here() is not None
    except OSError:
        return True


def _bound_here(st: state.State) -> list[str]:
    """Where else in this namespace the session's overlay is mounted (bind mounts of it)."""
    try:
        return [e.point for e in st.mounts_here()]
    except OSError:
        return []


def mount(store: Store, opts: SessionOptions) -> SessionResult:
    """Put the projection of `opts.refs` on `opts.at` in the caller's mount namespace (real
    root, root-native overlay); the session stays `mounted` until `umount`."""
    from veloverlay.session.overlay.mounted import mount_session

    return mount_session(store, opts, choose_backend(store, opts))


def umount(
    store: Store,
    where: str,
    *,
    discard: bool = False,
    commit: bool = True,
    message: str | None = None,
) -> SessionResult:
    """Unmount the session on `where`, then harvest and commit it as the end of a `run`."""
    from veloverlay.session.overlay.mounted import umount_session

    given_path(where, "DIR", hint="name the directory 'mount' put the session on")
    return umount_session(store, where, discard=discard, commit=commit, message=message)


def clean_sessions(store: Store) -> int:
    """Remove the directories of harvested, discarded and failed sessions."""
    store.writable()
    removed = 0
    for st in list(state.iter_states(store)):
        if st.shown_state(store) in state.DONE_STATES:
            force_rmtree(store.sessions / st.id)
            removed += 1
    return removed


def live_changes(
    store: Store, session_id: str, m: Manifests | None = None
) -> list[tuple[str, str]]:
    """What a running session has changed so far, as (status letter, path): read from its
    upper dir (overlay) or its live view `REF@<session>` (shim), told as its harvest would
    commit it (`live.session_changes`). Nothing is committed. `m`: the store's manifests when
    the caller has them open."""
    from veloverlay.session.live import running, session_changes

    with running(store, session_id, m) as (st, m), m.what_if() as txn:
        return [(c.status, paths.display(c.path)) for c in session_changes(store, m, txn, st)]
