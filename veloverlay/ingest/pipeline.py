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
import json
import os
import time

from veloverlay import faults, paths
from veloverlay.errors import Reason, VeloError
from veloverlay.ingest import statcache
from veloverlay.ingest.scan import (
    IngestResult,
    Progress,
    build,
    publish,
    walk,
    worker_init,
    worker_state,
)
from veloverlay.ingest.source import RACY_NS
from veloverlay.store import quarantine
from veloverlay.store.cas import Store
from veloverlay.store.digest import hash_bytes
from veloverlay.store.manifest import Manifests, Ref, Txn
from veloverlay.store.merge import three_way
from veloverlay.tiers import Rules
from veloverlay.workers import Workers, default_jobs

__all__ = ["IngestResult", "ingest", "drop_cache"]


def _check_source(src: str, store: Store) -> bytes:
    real = os.path.realpath(src)
    if not os.path.isdir(real):
        raise VeloError(
            f"{src} is not a directory",
            reason=Reason.NOT_A_DIRECTORY if os.path.exists(real) else Reason.NOT_FOUND,
            path=src,
        )
    sroot = os.path.realpath(store.root)
    if real == sroot or real.startswith(sroot + "/") or sroot.startswith(real.rstrip("/") + "/"):
        raise VeloError(
            f"{src} contains or lies inside the store {sroot}",
            reason=Reason.BAD_PATH,
            hint="ingest a directory outside the store",
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
) -> IngestResult:
    """Ingest `src` as a new version of ref `name` (created if missing).

    A ref that came from another directory is refused (OTHER_SOURCE: a directory with the same
    basename is often another tree) unless `moved` (the same tree, now at `src`: merged as any
    re-ingest) or `force` (this tree is the ref's next version whatever it was). The path is
    part of the version: a new path is recorded by a commit even when the tree is unchanged.
    `adopt`: afterwards, check that the source still matches what was committed and move it
    aside (`<src>.velo-adopted`), so that a shim session can materialise the ref at its path.
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
    config = (
        hash_bytes(json.dumps([rules.to_json(), keep_setid, os.fsdecode(top)]).encode())
        .hex()[:16]
        .encode()
    )
    with store.lock(), store.stage() as stage, contextlib.ExitStack() as stack:
        store.reclaim_tmp()
        cache, cache_keys = statcache.load(m, name, config)
        if quarantine.wanted(store):
            # fsck set corrupt objects aside: read every file, so that one holding their right
            # bytes restores them (the stat cache would vouch for it and skip it)
            cache = {}
        scan_ns = time.time_ns()
        state = worker_state(store, stage, top, cache, rules, keep_setid)
        pool = None
        if jobs > 1:
            # Forked workers; they never touch LMDB, and die with this process.
            pool = stack.enter_context(Workers(jobs, worker_init, state))
        recs, staged = walk(m, top, res, pool, state, progress)
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
        res.adopted_to = _adopt(store, m, src, name, res, rules, keep_setid)
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
        f"ref {ref.name!r} was ingested from {ref.path}, not from {new}",
        reason=Reason.OTHER_SOURCE,
        hint=f"if this is the same tree moved, re-run with --moved; to make this tree the next "
        f"version of {ref.name} anyway, --force; else choose another --name",
        path=new,
    )


def _adopt(
    store: Store, m: Manifests, src: str, name: str, res: IngestResult, rules: Rules, keep: bool
) -> str:
    """Move a just-ingested source aside, after checking nothing changed it meanwhile."""
    real = os.path.realpath(src)
    aside = real + ".velo-adopted"
    if os.path.lexists(aside):
        raise VeloError(
            f"cannot adopt {src}: {aside} already exists",
            reason=Reason.EXISTS,
            hint="the ingest itself was committed; move or remove the old copy and re-run",
        )
    again = ingest(store, m, src, name, rules=rules, jobs=1, keep_setid=keep)
    if again.root != res.root:
        raise VeloError(
            f"{src} changed while it was ingested; not moved aside",
            reason=Reason.SOURCE_UNSTABLE,
            hint="stop whatever writes there and run 'veloverlay ingest --adopt' again",
        )
    os.rename(real, aside)
    return aside


def drop_cache(m: Manifests, txn: Txn, name: str) -> None:
    statcache.drop(m, txn, name)
