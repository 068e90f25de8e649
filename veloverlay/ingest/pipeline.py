"""Ingest a directory into the store and commit it as a version of a ref.

Pipeline: walk, hash, stage and encode in forked worker processes (scan.py: each takes a directory
subtree, lists it, reads every source whose stat changed under `flock(LOCK_SH|LOCK_NB)`, re-reading
it if it changed while read, and encodes the node entries there) → publish the staged objects
durably → one LMDB transaction that stores the Merkle nodes bottom-up (children before parents),
compare-and-swaps the ref (merging with session commits made since the last ingest) and updates
the stat cache.

Stat cache: per ref and path, (ino, size, mtime_ns, ctime_ns) → digest. An unchanged stat skips the
read. git's "racy" rule: a file whose mtime is within `RACY_NS` of the scan is hashed but not
cached, so a write in the same timestamp tick is never missed by the next ingest.

Workers are forked before any thread exists and never touch LMDB.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import time

from veloverlay import _libc, faults, files, paths, pathtrust
from veloverlay.errors import Reason, VeloError
from veloverlay.ingest import dirfd, scan, statcache
from veloverlay.ingest.coordinator import build, publish, walk
from veloverlay.ingest.scan import Progress, open_top, worker_init, worker_state
from veloverlay.ingest.source import RACY_NS
from veloverlay.records import Record, field
from veloverlay.store import quarantine
from veloverlay.store.access import refuse_kernel_fs, refuse_overlap
from veloverlay.store.cas import Store
from veloverlay.store.manifest import Manifests, Ref, Txn
from veloverlay.store.merge import three_way
from veloverlay.tiers import Rules
from veloverlay.workers import Workers, default_jobs

__all__ = ["IngestResult", "ingest", "drop_cache"]


class IngestResult(Record):
    ref: str
    root: str
    commit: str | None
    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    bytes: int = 0
    hashed: int = 0
    new_objects: int = 0
    new_bytes: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    stripped_setid: int = 0
    acl_narrowed: int = 0  # files and directories whose POSIX ACL was narrowed (posixacl)
    # in a shared store: files other users could not read at the source, and directories they
    # could not list or enter, now readable by every local user (0 in a private store)
    exposed: int = 0
    merged: bool = False
    overridden: list[str] = field(default_factory=list)  # --force: session changes left out
    unchanged: bool = False
    seconds: float = 0.0
    adopted_to: str | None = None
    moved_from: str | None = None  # the ref's path before this ingest (a new path was recorded)

    def to_dict(self) -> dict[str, object]:
        d = self.field_dict()
        d["skipped"] = [{"path": p, "kind": k} for p, k in self.skipped]
        d["dedup_bytes"] = self.bytes - self.new_bytes
        return d


def _check_source(src: str, store: Store) -> bytes:
    files.given_path(src, "the directory to ingest")
    real = pathtrust.realpath_safe(src, Reason.BAD_PATH)
    if not os.path.isdir(real):
        raise VeloError(
            f"{src} is not a directory",
            reason=Reason.NOT_A_DIRECTORY if os.path.exists(real) else Reason.NOT_FOUND,
            path=src,
        )
    refuse_overlap(
        real,
        store.root,
        what="the source",
        hint="ingest a directory outside the store",
        reason=Reason.BAD_PATH,
    )
    refuse_kernel_fs(
        real,
        what="the source",
        hint="ingest a directory tree; /proc and /sys are the kernel's",
        reason=Reason.NOT_A_DIRECTORY,
    )
    return os.fsencode(real)


def ingest(
    store: Store,
    m: Manifests,
    src: str,
    name: str,
    *,
    rules: Rules | None = None,
    jobs: int | None = None,
    force: bool = False,
    keep_setid: bool = False,
    message: str | None = None,
    progress: Progress | None = None,
    adopt: bool = False,
    moved: bool = False,
    _expect: tuple[int, int] | None = None,
) -> IngestResult:
    """Ingest `src` as a new version of ref `name` (created if missing).

    A ref that came from another directory is refused (OTHER_SOURCE: a directory with the same
    basename is often another tree) unless `moved` (the same tree, now at `src`: merged as any
    re-ingest) or `force` (this tree is the ref's next version whatever it was). The path is
    part of the version: a new path is recorded by a commit even when the tree is unchanged.
    `adopt`: afterwards, check that the source still matches what was committed and move it
    aside (`<src>.velo-adopted`), so that a shim session can materialise the ref at its path.
    `_expect`: the (dev, ino) the top must be (adopt's re-ingest), else SOURCE_UNSTABLE.
    """
    from veloverlay.store.manifest import check_ref_name

    t0 = time.perf_counter()
    check_ref_name(name)
    if "@" in name:
        raise VeloError("cannot ingest into a session ref", reason=Reason.BAD_REF)
    top = _check_source(src, store)
    store.writable()
    jobs = jobs or default_jobs()
    with m.read() as txn:
        existing = m.get_ref(txn, name)
    if existing is not None:
        _check_same_source(existing, top, force=force, moved=moved)
    if rules is None:
        rules = Rules.from_json(existing.tiers if existing else None)
    res = IngestResult(name, "", None)
    config = statcache.config(rules.to_json(), keep_setid, os.fsdecode(top))
    with store.lock(), store.stage() as stage, contextlib.ExitStack() as stack:
        # The top, opened once (no symlink on the way) before the workers fork: the walk goes
        # by descriptors from here, never by path.
        top_fd = open_top(top)
        stack.callback(os.close, top_fd)
        top_st = os.fstat(top_fd)
        top_id = (top_st.st_dev, top_st.st_ino)
        if _expect is not None and top_id != _expect:
            raise _replaced(src)
        store.reclaim_tmp()
        cache, cache_keys = statcache.load(m, name, config)
        want = quarantine.wanted(store)
        if want:
            # fsck set corrupt objects aside: a file the stat cache last saw holding one of
            # them is read again (the cache would vouch for it and skip it), so that its right
            # bytes restore the object. Only those directories: an object no file holds any
            # more must not cost every later ingest its stat cache.
            cache = statcache.without_digests(cache, want)
        scan_ns = time.time_ns()
        state = worker_state(store, stage, top, top_fd, cache, rules, keep_setid)
        pool = None
        if jobs > 1:
            # Forked workers; they never touch LMDB, and die with this process.
            pool = stack.enter_context(Workers(jobs, worker_init, state))
        recs, staged = walk(m, top, top_fd, res, pool, state, progress)
        if not store.shared:
            res.exposed = 0  # counted by the walk, told only where every user can read it
        # Durability order: objects first (syncfs, rename, syncfs), then the manifest.
        publish(stage, pool, res, staged)
        with m.write() as txn:
            root, values = build(m, txn, recs, cache, scan_ns - RACY_NS)
            res.root = root.hex()
            ref = m.get_ref(txn, name)
            msg = message or f"ingest {os.fsdecode(top)}"
            target: bytes = root
            new_path = os.fsdecode(top)
            path_changed = ref is not None and ref.path != new_path
            if ref is not None:
                _check_same_source(ref, top, force=force, moved=moved)
                if path_changed:
                    res.moved_from = ref.path
                    if message is None and ref.path is not None:
                        msg += f" (the ref came from {ref.path})"
                head_root = bytes.fromhex(m.get_commit(txn, ref.head).root)
                base = bytes.fromhex(ref.ingest_root) if ref.ingest_root else head_root
                if base != head_root:
                    mr = three_way(m, txn, base, root, head_root)
                    if mr.root is None and not force:
                        shown = ", ".join(paths.display(p) for p in mr.conflicts[:5])
                        raise VeloError(
                            f"sessions changed {name} since the last ingest, and the source "
                            f"changed the same paths: {shown}",
                            reason=Reason.CONFLICT,
                            hint="nothing was committed; re-run with --force to take the "
                            "source's version of those paths (session changes elsewhere are "
                            "kept)",
                        )
                    if mr.root is None:
                        # --force: the sessions' changes merged onto the source, theirs left out
                        # where they conflict (they stay in the ref's history).
                        mr = three_way(m, txn, base, head_root, root, drop_conflicts=True)
                        res.overridden = [paths.display(p) for p in mr.conflicts]
                    assert mr.root is not None
                    target = mr.root
                    res.merged = True
                if target == head_root:
                    res.unchanged = True
            if not res.unchanged or path_changed:  # a new path is a new version
                delta = m.diff(txn, head_root, target) if ref is not None else None
                c = m.commit(
                    txn,
                    name,
                    target,
                    expect_head=ref.head if ref else None,
                    message=msg,
                    delta=delta,
                    path=new_path,
                    tiers=rules.to_json(),
                    ingest_root=root,
                )
                res.commit = c.id
            else:
                assert ref is not None
                res.commit = ref.head
                if ref.ingest_root != root.hex():
                    ref.ingest_root = root.hex()
                    m.put_ref(txn, ref)
            statcache.write(m, txn, name, config, cache_keys, cache, values)
    faults.point("commit.after")
    if adopt:
        res.adopted_to = _adopt(store, m, src, top, top_id, name, res, rules, keep_setid)
    res.seconds = time.perf_counter() - t0
    return res


def _check_same_source(ref: Ref, top: bytes, *, force: bool, moved: bool) -> None:
    """Refuse to ingest a directory other than the one `ref` came from, unless told."""
    if ref.path is None or force or moved:
        return
    new = os.fsdecode(top)
    if ref.path == new or os.path.realpath(ref.path) == new:
        return
    raise VeloError(
        f"ref '{ref.name}' was ingested from {ref.path}, not from {new}",
        reason=Reason.OTHER_SOURCE,
        hint=f"if this is the same tree moved, re-run with --moved; to make this tree the next "
        f"version of {ref.name} anyway, --force; else choose another --name",
        path=new,
    )


def _replaced(src: str) -> VeloError:
    return VeloError(
        f"{src} was replaced while it was ingested (another directory is there now); not moved "
        "aside",
        reason=Reason.SOURCE_UNSTABLE,
        path=src,
        hint="make sure nothing else moves the source and run 'veloverlay ingest --adopt' again",
    )


def _adopt(
    store: Store,
    m: Manifests,
    src: str,
    top: bytes,
    top_id: tuple[int, int],
    name: str,
    res: IngestResult,
    rules: Rules,
    keep: bool,
) -> str:
    """Move a just-ingested source aside, after checking nothing changed it meanwhile.

    The rename goes through a descriptor of the source's parent, pinned (no symlink on the way)
    before the verifying re-ingest, and only when the entry there is still the directory both
    ingests read (dev, ino): never by the path again, whose directories may belong to another
    user who can swap one for a symlink to root's own."""
    parent, base = os.path.split(top)
    aside = base + b".velo-adopted"
    shown = os.fsdecode(top + b".velo-adopted")
    if not base:
        raise VeloError(f"cannot adopt {src}", reason=Reason.BAD_PATH, path=src)
    try:
        pfd = dirfd.open_path(parent or b"/")
    except (dirfd.Replaced, FileNotFoundError, NotADirectoryError):
        raise _replaced(src) from None
    try:
        if _entry_id(pfd, aside) is not None:
            raise VeloError(
                f"cannot adopt {src}: {shown} already exists",
                reason=Reason.EXISTS,
                hint="the ingest itself was committed; move or remove the old copy and re-run",
            )
        if _entry_id(pfd, base) != top_id:
            raise _replaced(src)
        again = ingest(store, m, src, name, rules=rules, jobs=1, keep_setid=keep, _expect=top_id)
        if again.root != res.root:
            raise VeloError(
                f"{src} changed while it was ingested; not moved aside",
                reason=Reason.SOURCE_UNSTABLE,
                hint="stop whatever writes there and run 'veloverlay ingest --adopt' again",
            )
        scan.race_point("adopt", b"")
        if _entry_id(pfd, base) != top_id:
            raise _replaced(src)
        try:
            _libc.renameat2(pfd, base, pfd, aside, _libc.RENAME_NOREPLACE)
        except OSError as exc:
            if exc.errno == errno.EEXIST:
                raise VeloError(
                    f"cannot adopt {src}: {shown} already exists",
                    reason=Reason.EXISTS,
                    hint="the ingest itself was committed; move or remove it and re-run",
                ) from None
            if exc.errno not in (errno.EINVAL, errno.ENOSYS):
                raise
            # no RENAME_NOREPLACE on this filesystem: checked just above instead
            os.rename(base, aside, src_dir_fd=pfd, dst_dir_fd=pfd)
    finally:
        os.close(pfd)
    return shown


def _entry_id(dfd: int, name: bytes) -> tuple[int, int] | None:
    """(dev, ino) of the directory entry `name` in `dfd` (not followed), None if missing."""
    try:
        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISDIR(st.st_mode) else (-1, -1)


def drop_cache(m: Manifests, txn: Txn, name: str) -> None:
    statcache.drop(m, txn, name)
