"""What a session projects and where: the refs resolved and stacked, and the target directory.

Both backends resolve their refs the same way (several stack, later wins; the change goes to the
top ref; a stack's merged nodes are written, content-addressed, so a single ref only reads). The
overlay backend projects over an existing directory (or one it may create); the shim backend
materialises into a new or empty one (session/shim/materialize.prepare_target).
"""

from __future__ import annotations

import contextlib
import os

from veloverlay import files, pathtrust
from veloverlay.errors import Reason, VeloError
from veloverlay.lower.homes import refuse_inside
from veloverlay.mount import pin_dir
from veloverlay.records import Record
from veloverlay.session import state
from veloverlay.store.access import refuse_overlap
from veloverlay.store.cas import Store
from veloverlay.store.checkout import claim_dir
from veloverlay.store.manifest import Commit, Manifests, Ref, Txn
from veloverlay.store.stack import stack_roots

__all__ = [
    "Stack",
    "resolve_stack",
    "ancestors",
    "inside",
    "overlay_target",
    "remove_made_target",
    "unmake_target",
]


class Stack(Record, frozen=True):
    refs: list[Ref]
    commits: list[Commit]
    view: bytes  # the projected tree: the refs stacked, later wins (one ref: its root)
    below: bytes | None  # the stack without the top ref (None: one ref)
    hints: list[bytes]  # roots of the top ref's earlier commits (one ref only): cached lowers


def resolve_stack(m: Manifests, specs: list[str], *, hints: bool = True) -> Stack:
    if not specs:
        raise VeloError("name at least one ref", reason=Reason.USAGE)
    # A stack writes its merged nodes; a single ref only reads (no write lock on the warm path).
    with m.write() if len(specs) > 1 else m.read() as txn:
        resolved = [m.resolve(txn, spec) for spec in specs]
        refs = [r for r, _ in resolved]
        commits = [c for _, c in resolved]
        _refuse_top_below(specs, refs)
        roots = [bytes.fromhex(c.root) for c in commits]
        view = stack_roots(m, txn, roots)
        below = stack_roots(m, txn, roots[:-1]) if len(roots) > 1 else None
        older = ancestors(m, txn, commits[-1]) if hints and len(roots) == 1 else []
    return Stack(refs, commits, view, below, older)


def _refuse_top_below(specs: list[str], refs: list[Ref]) -> None:
    """A stack whose top ref is also below it (`run r r`, `run r@{1} r`) would record each
    deletion of a path the lower copy provides as a MASK in the ref itself: a single ref then
    carries masks of its own paths, which `diff` and a checkout of it do not show."""
    top = refs[-1].name
    for spec, ref in zip(specs[:-1], refs[:-1], strict=True):
        if ref.name == top:
            raise VeloError(
                f"{specs[-1]!r} is also below itself in the stack (as {spec!r}): its deletions "
                f"would be recorded as masks in {top} itself",
                reason=Reason.USAGE,
                hint=f"name {top} once, on top; stack other refs below it",
            )


def ancestors(m: Manifests, txn: Txn, commit: Commit, limit: int = 32) -> list[bytes]:
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


def inside(a: str, b: str) -> bool:
    return a == b or a.startswith(b.rstrip("/") + "/")


def overlay_target(store: Store, at: str | None, top: Ref) -> tuple[str, tuple[int, int] | None]:
    """(the resolved target, the (dev, ino) of the directory made for it, None: it existed)."""
    where = at if at is not None else top.path
    if not where:
        raise VeloError(
            f"ref {top.name!r} has no recorded path to project at",
            reason=Reason.TARGET_INVALID,
            hint="pass --at DIR",
        )
    real = pathtrust.realpath_safe(where, Reason.TARGET_INVALID)
    refuse_overlap(
        real, store.root, what="the target", hint="project somewhere outside the store (--at DIR)"
    )
    refuse_inside(
        real, store.root, what="the target", hint="project somewhere outside it (--at DIR)"
    )
    if real == "/":
        raise VeloError("cannot project over /", reason=Reason.TARGET_INVALID, path=real)
    if os.path.isdir(real):
        return real, None
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
    # made through its parent, pinned: never in a directory a symlink put on the way since
    fd, created = claim_dir(real, 0o755)
    try:
        st = os.fstat(fd)
    finally:
        os.close(fd)
    return real, (st.st_dev, st.st_ino) if created else None


def remove_made_target(store: Store, st: state.State) -> None:
    """Remove the target directory the session `st` made (`overlay_target`), as the shim backend
    removes its tree: only that directory (still the same (dev, ino), reached through its pinned
    parent, never followed), only while it is empty (rmdir: whatever anyone put there since
    keeps it), and not while another session of the store that has not ended projects there
    (removing it would take its mount away). A target that existed before stays. Best effort:
    a directory that cannot go now is left as it is."""
    if not st.target_created or len(st.target_id) != 2:
        return
    real = st.target_real or st.target
    for other in state.iter_states(store):
        same = other.id != st.id and (other.target_real or other.target) == real
        if same and other.state not in state.DONE_STATES:
            return
    unmake_target(real, (st.target_id[0], st.target_id[1]))


def unmake_target(real: str, made: tuple[int, int]) -> None:
    """rmdir the directory `made` (dev, ino) at `real` through its pinned parent, if it is still
    there and empty (a session that did not start: nothing was projected there)."""
    parent, name = os.path.split(real)
    try:
        pfd = pin_dir(parent or "/")
    except VeloError:
        return
    try:
        with contextlib.suppress(OSError):  # not empty, busy, replaced (TreeChanged), gone
            files.rmdir_at(pfd, name, expect=made)
    finally:
        os.close(pfd)
