"""Harvest and commit a finished session: the part both backends share.

A backend says how its changes are read (`Harvest`: the overlay's upper dir, or the shim's
stat-diff of the materialised tree); this module does the rest in one order, for both:

1. under the store lock and a stage: if an earlier run of this session already committed (a
   resume after a crash between commit and state save), report that commit and stop;
2. harvest into the stage, publish the staged objects durably (`Stage.publish`), give them their
   short names and +i when the session protects objects;
3. one LMDB write transaction: the harvested nodes, the change restated on the top ref for a
   stack (`harvest.to_top_ref`), then compare-and-swap on the ref from the session's base commit;
   when the ref moved meanwhile a three-way merge per path; a conflict, `--no-commit` or a
   vanished ref keeps the session's tree as `REF@<session>` and says which paths. Nothing is
   ever dropped.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from veloverlay import faults, paths
from veloverlay.errors import Reason, SysError, VeloError, errno_hint
from veloverlay.session.options import SessionResult
from veloverlay.session.state import State
from veloverlay.store.cas import Stage, Store
from veloverlay.store.manifest import Manifests, Ref, Txn
from veloverlay.store.tree import Op, OpKind
from veloverlay.words import exposed

if TYPE_CHECKING:
    from veloverlay.store.changes import Change
    from veloverlay.tiers import Rules

__all__ = ["Harvested", "result_for", "session_ref_name", "already_committed", "harvest_and_commit"]


class Harvested(Protocol):
    """What a backend's harvest returns: path operations against the view, the directory
    nodes they need (digest -> encoding), and what to tell the user."""

    ops: list[Op]
    nodes: dict[bytes, bytes]
    warnings: list[str]


def result_for(st: State, exit_status: int) -> SessionResult:
    """The result of session `st` before its harvest (filled in as it goes)."""
    return SessionResult(
        session_id=st.id,
        exit_status=exit_status,
        commit=None,
        conflict_ref=None,
        changed=0,
        backend=st.backend,
        lower_form=st.form,
        protection=st.protection,
        ref=st.top,
        mode=st.mode if st.backend == "overlay" else "",
    )


def session_ref_name(top: str, sid: str) -> str:
    return f"{top.split('@', 1)[0]}@{sid}"


def already_committed(
    m: Manifests, txn: Txn, st: State, *, live_message: str | None = None
) -> tuple[str | None, str | None]:
    """(commit on the ref, kept session ref) when an earlier finish of `st` got that far.

    A shim session's `REF@<id>` exists from its start (the live view, whose commits carry
    `live_message`): only a session ref whose head is this session's own commit and not a
    live-view one counts as kept. (Another commit there — a session run on the live view, a
    rollback of it — says nothing of this session: taken for "kept", it skipped the harvest
    and the session's changes were lost.)"""
    sref = st.session_ref or session_ref_name(st.top, st.id)
    r = m.get_ref(txn, sref)
    head = m.get_commit(txn, r.head) if r is not None else None
    if head is not None and head.session == st.id and head.message != live_message:
        return None, sref
    ref = m.get_ref(txn, st.top)
    cid = ref.head if ref is not None else None
    # Back from the head to the session's base, however many commits other sessions made since:
    # a walk cut short (it stopped after 200) took a committed session for one that was not,
    # and its resume merged the same changes into the ref a second time. Commit ids are
    # hashes of their parent's, so the walk ends; at the first finish of a session it is one
    # step (the head is its base) or the commits made while it ran.
    while cid is not None and m.has_commit(txn, cid):  # (a log cut by gc --keep ends here)
        c = m.get_commit(txn, cid)
        if c.session == st.id:
            return c.id, None
        if c.id in st.bases:
            break
        cid = c.parent
    return None, None


def harvest_and_commit(
    store: Store,
    m: Manifests,
    st: State,
    res: SessionResult,
    harvest: Callable[[Txn, Stage, Rules], Harvested],
    *,
    protect_new: bool = False,
    live_message: str | None = None,
) -> float | None:
    """Steps 1-3 above; fills `res` (commit, conflict_ref, conflicts, changed, warnings).
    Returns when (perf_counter) the harvest was done, None when an earlier run had committed.
    A failure (a full store, ...) leaves the session to `harvest --resume`, and says so."""
    try:
        return _harvest_and_commit(
            store, m, st, res, harvest, protect_new=protect_new, live_message=live_message
        )
    except VeloError as exc:
        raise _resumable(exc, st.id) from exc
    except OSError as exc:  # a damaged session directory, a disk error: said as any failure
        raise _resumable(_os_failure(exc), st.id) from exc


def _os_failure(exc: OSError) -> VeloError:
    code = errno.errorcode.get(exc.errno or 0, str(exc.errno))
    where = f": {os.fsdecode(exc.filename)}" if isinstance(exc.filename, (str, bytes)) else ""
    path = os.fsdecode(exc.filename) if isinstance(exc.filename, (str, bytes)) else None
    return VeloError(
        f"{exc.strerror or exc} ({code}){where}",
        reason=Reason.STORE_FULL if exc.errno in (errno.ENOSPC, errno.EDQUOT) else Reason.SYSCALL,
        hint=exc.hint if isinstance(exc, SysError) else errno_hint(exc.errno),
        path=path,
    )


def _resumable(exc: VeloError, sid: str) -> VeloError:
    """`exc` with what to do next: the session's changes are kept, not committed; the store's
    own hints ("retry", "nothing stored was changed") would send the user to run it again."""
    resume = f"veloverlay harvest --resume {sid} (nothing is committed yet; its changes are kept)"
    if exc.reason is Reason.STORE_FULL:
        hint = (
            "free space (e.g. 'veloverlay refs --delete REF', then 'veloverlay gc'), "
            f"then: {resume}"
        )
    elif exc.reason is Reason.TOO_DEEP:
        # The session is over: its files can no longer be shortened by its programs.
        hint = (
            "to commit everything else and move what is too deep into a new directory DIR "
            "(on the filesystem of the session's files): veloverlay harvest --resume "
            f"{sid} --set-aside DIR; or, to keep it whole: {resume}, once it is shortened "
            "where the session's files are kept"
        )
    elif exc.hint:
        hint = f"{exc.hint}; then: {resume}"
    else:
        hint = f"once that is fixed: {resume}"
    return VeloError(
        f"session {sid} could not be harvested: {exc.message}",
        reason=exc.reason,
        hint=hint,
        detail=exc.detail,
        path=exc.path,
    )


def _harvest_and_commit(
    store: Store,
    m: Manifests,
    st: State,
    res: SessionResult,
    harvest: Callable[[Txn, Stage, Rules], Harvested],
    *,
    protect_new: bool,
    live_message: str | None,
) -> float | None:
    # Imported here, not at the top: a session that changed nothing never needs them (start-up
    # time of every `run`).
    from veloverlay.lower.objects import name_and_protect
    from veloverlay.session.harvest import to_top_ref
    from veloverlay.session.relocation import carry_forward
    from veloverlay.store.changes import changes
    from veloverlay.tiers import Rules

    with store.lock(), store.stage() as stage:
        store.reclaim_tmp()  # stages of writers that died, e.g. a manager killed mid-harvest
        with m.read() as txn:
            done, kept = already_committed(m, txn, st, live_message=live_message)
            ref = m.get_ref(txn, st.top)
            # the rules the session started with: not those of a ref made anew (or deleted)
            # under the name since, which its tree never had
            rules = Rules.from_json(st.start_tiers(ref.tiers if ref is not None else None))
            h = harvest(txn, stage, rules) if done is None and kept is None else None
            if h is None:
                _told_earlier(m, txn, st, res, done, kept)
        if h is None:
            res.commit, res.conflict_ref = done, kept
            return None
        t_harvested = time.perf_counter()
        res.warnings.extend(h.warnings)
        new_objects = list(stage.staged)
        stage.publish()
        if protect_new and new_objects:
            failed = name_and_protect(store, m, new_objects)
            if failed:
                res.warnings.append("chattr +i failed for new objects: " + "; ".join(failed))
        with m.write() as txn:
            for digest, data in h.nodes.items():
                m.put_raw_node(txn, digest, data)
            base_root = bytes.fromhex(m.get_commit(txn, st.bases[-1]).root)
            ops = h.ops
            if st.below_root:  # a stack: the same change, on the top ref alone
                below = bytes.fromhex(st.below_root)
                ops = to_top_ref(m, txn, ops, base_root, below, bytes.fromhex(st.view_root))
                res.warnings.extend(_shadowed(m, txn, st, below, ops))
            new_root = m.apply(txn, base_root, ops) if ops else base_root
            # What changed is told as `diff REF@{1} REF` tells what was committed: of a stack,
            # the top ref's change (a lower ref's directory deleted is one masked `D DIR`, a
            # lower ref's file changed is added to the top ref). Told in the stacked view, the
            # summary listed the lower ref's entries one by one where that diff said `D DIR`.
            # (Merged into a ref that moved meanwhile: the merged commit's change, `_commit`.)
            chs = changes(m, txn, base_root, new_root)
            res.changes = [(c.status, paths.display(c.path)) for c in chs]
            res.changed = len(res.changes)
            if chs and store.shared:
                res.warnings.extend(_exposed(m, txn, new_root, chs))
            live = live_message is not None
            if new_root != base_root or live:  # a shim session's live ref is settled either way
                _commit(m, txn, st, base_root, new_root, ops, res, live=live)
        faults.point("commit.after")  # committed; the session's state not saved yet
        if res.commit is not None and not st.below_root:
            # what the next session's start would otherwise find out again with a diff
            carry_forward(store, base_root, new_root, ops)
    return t_harvested


def _exposed(m: Manifests, txn: Txn, root: bytes, chs: list[Change]) -> list[str]:
    """A warning for a shared store (every local user reads it): the files this commit adds or
    changes that other users could not read in the session (no o+r, or below a directory
    without o+rx), as ingest says it (`exposed`)."""
    from veloverlay.store.tree import Kind

    hidden: dict[bytes, bool] = {}

    def dir_hidden(d: bytes) -> bool:
        if d not in hidden:
            e = m.lookup(txn, root, d)
            mode = m.node_attrs(txn, e.digest)[0] if e is not None and e.kind is Kind.DIR else 0
            hidden[d] = mode & 0o005 != 0o005 or (d != b"" and dir_hidden(d.rpartition(b"/")[0]))
        return hidden[d]

    n = sum(
        1
        for c in chs
        if c.new is not None
        and c.new.kind is not Kind.MASK
        and (
            (c.new.kind is Kind.FILE and not c.new.mode & 0o004)
            or dir_hidden(c.path.rpartition(b"/")[0])
        )
    )
    if not n:
        return []
    return [exposed(n, "in the session", "mode without o+r, or under a directory without o+rx")]


def _told_earlier(
    m: Manifests, txn: Txn, st: State, res: SessionResult, done: str | None, kept: str | None
) -> None:
    """`res` of a session an earlier run already committed (a resume after a crash between the
    commit and the state's save): what that commit changed (as the commit shows it, against its
    parent), and a warning saying nothing was harvested again. Without it the result listed no
    change, shown as 'only timestamps changed' for a session that had added files."""
    from veloverlay.store.changes import changes

    cid = done
    if kept is not None:
        ref = m.get_ref(txn, kept)
        cid = ref.head if ref is not None else None
    if cid is None or not m.has_commit(txn, cid):
        return
    c = m.get_commit(txn, cid)
    if c.parent is not None and m.has_commit(txn, c.parent):
        before = bytes.fromhex(m.get_commit(txn, c.parent).root)
        now = bytes.fromhex(c.root)
        res.changes = [(x.status, paths.display(x.path)) for x in changes(m, txn, before, now)]
        res.changed = len(res.changes)
    where = kept if kept is not None else st.top
    res.warnings.append(
        f"session {st.id} was already committed to {where} by an earlier run (commit "
        f"{cid[:12]}): nothing was harvested again"
    )


def _shadowed(m: Manifests, txn: Txn, st: State, below: bytes, ops: list[Op]) -> list[str]:
    """The paths where the session's change to the top ref now hides a change a lower ref of
    the stack got while it ran (re-ingested, another session): the top ref's entry (or mask)
    wins in the stack, so the lower ref's new version is not seen there. Said, not merged:
    the lower ref is not the session's to change."""
    from veloverlay.store.stack import stack_roots

    heads = []
    for name in st.refs[:-1]:
        ref = m.get_ref(txn, name)
        if ref is None:
            return []  # (a lower ref deleted: the stack itself changed; nothing to compare)
        heads.append(ref.head)
    if heads == st.bases[:-1]:
        return []
    now = stack_roots(m, txn, [bytes.fromhex(m.get_commit(txn, h).root) for h in heads])
    hidden = []
    for op in ops:
        if op.kind is OpKind.META:
            continue
        if m.lookup(txn, below, op.path) != m.lookup(txn, now, op.path):
            hidden.append(paths.display(op.path))
    if not hidden:
        return []
    lower = ", ".join(
        r for r, b, h in zip(st.refs[:-1], st.bases[:-1], heads, strict=True) if b != h
    )
    shown = ", ".join(hidden[:10]) + (f" and {len(hidden) - 10} more" if len(hidden) > 10 else "")
    return [
        f"{lower} changed while the session ran: the session's change to {shown}, now in "
        f"{st.top}, hides what {lower} has there now (see 'veloverlay diff')"
    ]


def _commit(
    m: Manifests,
    txn: Txn,
    st: State,
    base_root: bytes,
    new_root: bytes,
    ops: list[Op],
    res: SessionResult,
    *,
    live: bool,
) -> None:
    sid, top = st.id, st.top
    sref = st.session_ref or session_ref_name(top, sid)
    base_id = st.bases[-1]
    message = st.message or f"session {sid}"
    ref = m.get_ref(txn, top)
    if st.commit_to_ref and ref is not None and _made_anew(m, txn, ref, st):
        res.warnings.append(
            f"{top} was deleted and made anew while the session ran: its changes are kept as "
            f"{sref}, not merged into a tree they did not start from"
        )
        _keep(m, txn, sref, ref, base_id, new_root, ops, message, st, res)
        return
    if st.commit_to_ref and ref is not None:
        if new_root == base_root:
            res.commit = None
        elif ref.head == base_id:
            c = m.commit(
                txn, top, new_root, expect_head=base_id, message=message, session=sid, delta=ops
            )
            res.commit = c.id
        else:
            head_root = bytes.fromhex(m.get_commit(txn, ref.head).root)
            from veloverlay.store.merge import three_way

            mr = three_way(m, txn, base_root, new_root, head_root)
            if mr.root is None:
                res.conflicts = [paths.display(p) for p in mr.conflicts]
                _keep(m, txn, sref, ref, base_id, new_root, ops, message, st, res)
                return
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
                res.commit = ref.head  # the ref already holds every change of the session
                res.up_to_date = True
                res.warnings.append(
                    f"{top} already had every change of this session (made meanwhile, commit "
                    f"{ref.head[:12]}): nothing was committed"
                )
            # What the merged commit changed, as `diff REF@{1} REF` (and `rollback REF`) tell
            # it: the session's change less what the ref had got the same meanwhile. Told as
            # the session's own change, it listed paths that commit did not change.
            from veloverlay.store.changes import changes

            merged = changes(m, txn, head_root, mr.root)
            res.changes = [(x.status, paths.display(x.path)) for x in merged]
            res.changed = len(res.changes)
        if live:
            m.delete_ref(txn, sref)  # the live view has served its purpose
        return
    # --no-commit, or the ref vanished: the session's tree stays as REF@<session>.
    if st.commit_to_ref and new_root != base_root:
        res.warnings.append(
            f"{top} was deleted while the session ran: its changes are kept as {sref}"
        )
    _keep(m, txn, sref, ref, base_id, new_root, ops, message, st, res)


def _made_anew(m: Manifests, txn: Txn, ref: Ref, st: State) -> bool:
    """Was the session's top ref deleted and made again meanwhile (so that its changes must not
    be merged into a tree they did not start from)? By the ref's lineage, given when a ref is
    made, where the ref or the session knows one: another lineage, or one where there was none,
    is another ref. Only between a ref and a session of earlier versions (neither knows one):
    when the walk back from the ref's head ends at a first commit without meeting the base; a
    log cut (a commit missing) or longer than the walk goes is taken as the same ref."""
    if ref.lineage is not None or st.base_lineage is not None:
        return ref.lineage != st.base_lineage
    base_id = st.bases[-1]
    cid: str | None = ref.head
    for _ in range(100_000):
        if cid is None:
            return True
        if cid == base_id or not m.has_commit(txn, cid):
            return False
        cid = m.get_commit(txn, cid).parent
    return False


def _keep(
    m: Manifests,
    txn: Txn,
    sref: str,
    ref: Ref | None,
    base_id: str,
    new_root: bytes,
    ops: list[Op],
    message: str,
    st: State,
    res: SessionResult,
) -> None:
    # The kept ref is the session's tree: it projects where the tree it started from was
    # ingested (its base commit's path), not where a ref made anew under the name since was,
    # nor nowhere when the ref was deleted.
    base_path = m.get_commit(txn, base_id).path if m.has_commit(txn, base_id) else None
    path = base_path if base_path is not None else (ref.path if ref else None)
    c = m.put_commit(
        txn,
        ref=sref,
        root=new_root,
        parent=base_id,
        message=message,
        session=st.id,
        delta=ops,
        path=path,
    )
    tiers = st.start_tiers(ref.tiers if ref else None)
    m.put_ref(txn, Ref(sref, c.id, path, tiers, None))
    res.conflict_ref = sref
