"""What a session projects and where: the refs resolved and stacked, and the target directory.

Both backends resolve their refs the same way (several stack, later wins; the change goes to the
top ref; a stack's merged nodes are written, content-addressed, so a single ref only reads). The
overlay backend projects over an existing directory (or one it may create); the shim backend
materialises into a new or empty one (session/shim/materialize.prepare_target).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time

from veloverlay import files, pathtrust, progress
from veloverlay.errors import Reason, VeloError
from veloverlay.lower.homes import refuse_inside
from veloverlay.mount import pin_dir
from veloverlay.records import Record
from veloverlay.session import state
from veloverlay.store.access import refuse_kernel_fs, refuse_overlap
from veloverlay.store.cas import Store
from veloverlay.store.dest import claim_dir
from veloverlay.store.manifest import Commit, Manifests, Ref, Txn
from veloverlay.store.stack import stack_roots

__all__ = [
    "Stack",
    "resolve_stack",
    "ancestors",
    "inside",
    "overlay_target",
    "remove_made_target",
    "target_free",
    "hold_shared",
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
                f"'{specs[-1]}' is also below itself in the stack (as '{spec}'): its deletions "
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


# How long a session waits for a target another process holds exclusively: a session's own
# removal holds it only for one rmdir; anyone else who holds it longer is refused (LOCKED).
_HOLD_TRIES, _HOLD_PAUSE = 500, 0.01


def overlay_target(
    store: Store, at: str | None, top: Ref
) -> tuple[str, tuple[int, int] | None, int]:
    """(the resolved target, the (dev, ino) of the directory made for it, None: it existed,
    a descriptor of it holding a shared flock: -1 for a directory we may not open).

    The flock is the target's lock, whatever store the session is of: every overlay session
    holds it shared from here until its projection is gone (the descriptor is inherited by its
    pid 1, closed at exec), and a session that made the directory removes it at its end only
    under the exclusive lock (`remove_made_target`). An rmdir of a directory that is a mount
    point in another mount namespace succeeds and detaches that mount: without the lock a
    session starting at the same path between another's check and its rmdir lost its tree."""
    for _ in range(_HOLD_TRIES):
        real, made = _find_target(store, at, top)
        fd = _hold(real, made)
        if fd != -2:
            return real, made, fd
        # removed (by the session that made it) between finding and holding it: again
    raise VeloError(
        f"the target {at or top.path} keeps being removed and made again",
        reason=Reason.TARGET_INVALID,
    )


def _hold(real: str, made: tuple[int, int] | None) -> int:
    """A descriptor of the directory at `real` with a shared flock on it (made: it must be that
    (dev, ino)); -2 when it was removed or replaced meanwhile, -1 when we may not open it."""
    parent, name = os.path.split(real)
    try:
        pfd = pin_dir(parent or "/")
    except VeloError:
        return -2
    try:
        try:
            fd = os.open(name, files.DIRFLAGS, dir_fd=pfd)
        except PermissionError:
            return -1  # a directory we may search but not read: no lock to hold (nor to make)
        except OSError:
            return -2
        try:
            # still the directory at that path (not removed while we waited for the lock)
            if not hold_shared(fd, real):
                os.close(fd)
                return -2
            have = os.fstat(fd)
            try:
                now = os.stat(name, dir_fd=pfd, follow_symlinks=False)
            except OSError:
                now = None
            ident = (have.st_dev, have.st_ino)
            if now is None or (now.st_dev, now.st_ino) != ident or made not in (None, ident):
                os.close(fd)
                return -2
            return fd
        except BaseException:
            with contextlib.suppress(OSError):
                os.close(fd)
            raise
    finally:
        os.close(pfd)


def hold_shared(fd: int, real: str) -> bool:
    """Lock the target directory `fd` shared for as long as `fd` stays open, as every session
    at `real` does while it projects or writes there; False when it was removed meanwhile (the
    session that made it ended): then find or make it again.

    Anyone who may open the directory can flock it: one that holds it exclusively for longer
    than a removal takes is not a session's removal, and the session goes on without the lock
    (said), instead of letting any reader of the directory stop every session there. What the
    lock guards is then only the other sessions' removal of a target this one made."""
    for _ in range(_HOLD_TRIES):
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return os.fstat(fd).st_nlink > 0
        except BlockingIOError:
            time.sleep(_HOLD_PAUSE)
    progress.notice(
        f"another process holds the target {real} locked (see: fuser -v {real}); "
        "going on without its lock"
    )
    return os.fstat(fd).st_nlink > 0


def _find_target(store: Store, at: str | None, top: Ref) -> tuple[str, tuple[int, int] | None]:
    """(the resolved target, the (dev, ino) of the directory made for it, None: it existed)."""
    if at == "":
        raise VeloError("--at names no directory (an empty path)", reason=Reason.USAGE)
    where = at if at is not None else top.path
    if not where:
        raise VeloError(
            f"ref '{top.name}' has no recorded path to project at",
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
    refuse_kernel_fs(real, what="the target", hint="project into an ordinary directory (--at DIR)")
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
        why = "is not writable" if os.path.isdir(parent) else "does not exist either"
        raise VeloError(
            f"the target {real} does not exist and its parent {why}",
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


def remove_made_target(store: Store, st: state.State, hold: int = -1) -> None:
    """Remove the target directory the session `st` made (`overlay_target`), as the shim backend
    removes its tree: only that directory (still the same (dev, ino), reached through its pinned
    parent, never followed), only while it is empty (rmdir: whatever anyone put there since
    keeps it), and only under its exclusive lock: not while any other session, of this store or
    another, projects there or is about to (removing it would take its mount away). A session
    that crashed holds nothing. `hold`: this session's own descriptor (`overlay_target`), let go
    here. A target that existed before stays. Best effort: a directory that cannot go now is
    left as it is."""
    if hold >= 0:
        os.close(hold)
    if not st.target_created or len(st.target_id) != 2:
        return
    unmake_target(st.target_real or st.target, (st.target_id[0], st.target_id[1]))


def target_free(fd: int) -> bool:
    """Take the exclusive lock of the target directory `fd` (held until `fd` is closed), if no
    overlay session holds it (`overlay_target`): only then may the directory be removed."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def unmake_target(real: str, made: tuple[int, int], hold: int = -1) -> None:
    """rmdir the directory `made` (dev, ino) at `real` through its pinned parent, if it is still
    there, empty, and no other process holds its lock (`overlay_target`); `hold`: our own
    descriptor of it, let go first."""
    if hold >= 0:
        os.close(hold)
    parent, name = os.path.split(real)
    try:
        pfd = pin_dir(parent or "/")
    except VeloError:
        return
    try:
        with contextlib.suppress(OSError):  # not empty, replaced, gone
            fd, _st = files.open_dir_at(pfd, name, expect=made)
            try:
                if target_free(fd):
                    files.rmdir_at(pfd, name, expect=made)
            finally:
                os.close(fd)
    finally:
        os.close(pfd)
