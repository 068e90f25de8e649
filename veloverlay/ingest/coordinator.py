"""Ingest's coordinator: queue the walk's tasks to the workers (scan.py), publish what they
staged, and join the directory records into nodes.

Each worker keeps the list of what it staged: after the coordinator's first syncfs, every worker
renames its own objects (`publish`), then the coordinator syncs again. The coordinator only
queues tasks and, once every object is published, joins each directory's parts with its
subdirectories' digests (children before parents) in the LMDB transaction: its cost is per
directory, not per file. A directory the cache vouches for but whose subtree changed
is rewritten from its stored node (cost follows the change); one whose stored node is gone is
listed again, dirty, before anything is published.
"""

from __future__ import annotations

import os
import stat
from collections import deque
from typing import Any

from veloverlay import workers
from veloverlay.errors import Reason, VeloError
from veloverlay.ingest import statcache
from veloverlay.ingest.scan import DirRec, Progress, Task, publish_own, run_task, worker_init
from veloverlay.ingest.source import NOT_COMMITTED
from veloverlay.store.cas import Stage
from veloverlay.store.digest import Digest
from veloverlay.store.manifest import Manifests, Txn
from veloverlay.store.reserve import FULL_HINT
from veloverlay.store.tree import Entry, Kind, dir_entry_bytes, encode_parts
from veloverlay.workers import Workers

__all__ = ["walk", "publish", "build"]


def walk(
    m: Manifests,
    top: bytes,
    top_fd: int,
    res: Any,
    pool: Workers | None,
    state: tuple[Any, ...],
    progress: Progress | None = None,
) -> tuple[dict[bytes, DirRec], int]:
    """Walk `top` (opened as `top_fd`, `open_top`) in the workers (or here, without a pool):
    every directory's record by path, and how many objects were staged. Each worker keeps what
    it staged (`publish`)."""
    st = os.fstat(top_fd)
    root: Task = (
        b"",
        (stat.S_IMODE(st.st_mode), st.st_mtime_ns, st.st_ino, st.st_ctime_ns),
        False,
        st.st_dev,
    )
    recs: dict[bytes, DirRec] = {}
    failures: list[tuple[bytes, str, str]] = []
    hashed = hbytes = staged = 0
    if pool is None:
        worker_init(*state)

    def on_report(value: tuple[int, int]) -> None:
        nonlocal hashed, hbytes
        hashed += value[0]
        hbytes += value[1]
        if progress is not None:
            progress(hashed, None, hbytes, None)

    def run(queue: deque[Task], recount: bool) -> None:
        nonlocal hashed, hbytes, staged
        results = (
            pool.map_queue(run_task, queue, on_report)
            if pool is not None
            else (run_task(queue.popleft()) for _ in iter(lambda: bool(queue), False))
        )
        for r in results:
            staged += r.staged
            for d in r.dirs:
                recs[d.rel] = d
            queue.extend(r.more)
            failures.extend(r.failures)
            files, nbytes, links, nhashed, unrep, unrep_bytes, setid, acl, private = r.counts
            res.hashed += nhashed
            on_report((unrep, unrep_bytes))
            if not recount:  # a second listing: counted the first time
                continue
            res.skipped.extend(r.skipped)
            res.files += files
            res.bytes += nbytes
            res.symlinks += links
            res.acl_narrowed += acl
            res.exposed += private
            if not state[6]:  # keep_setid
                res.stripped_setid += setid

    workers.local_reports(on_report if pool is None else None)
    try:
        run(deque([root]), True)
        if not failures:
            # A directory the cache vouches for whose node is gone (gc): list it again, dirty.
            with m.read() as txn:
                gone = [d for d in recs.values() if d.segs is None and not m.has_node(txn, d.node)]
            run(deque((d.rel, d.st, True, d.dev) for d in gone), False)
    finally:
        workers.local_reports(None)
    # Files that vanished or stopped being regular are reported (skipped), not fatal; anything
    # else (unreadable, unstable) fails the whole ingest before anything is committed.
    if failures:
        # The store's own failure (full, read-only) first: no fix of the source helps there.
        ours = [f for f in failures if f[1].startswith("store-")]
        rel, reason, msg = min(ours or failures)
        where = os.path.join(top, rel) if rel else top
        if ours:
            full = reason == Reason.STORE_FULL.value
            raise VeloError(
                f"{msg} (while storing {os.fsdecode(where)})",
                reason=Reason(reason),
                path=where,
                hint=f"{FULL_HINT}; nothing was committed" if full else "nothing was committed",
            )
        raise VeloError(msg, reason=Reason(reason), path=where, hint=NOT_COMMITTED)
    res.dirs = len(recs) - 1
    return recs, staged


def publish(stage: Stage, pool: Workers | None, res: Any, staged: int) -> None:
    """The durability order: syncfs, every worker renames what it staged, syncfs."""
    if not staged:
        return

    def others() -> int:
        outs = pool.each(publish_own, None) if pool is not None else [publish_own(None)]
        res.new_objects = sum(n for n, _b in outs)
        res.new_bytes = sum(b for _n, b in outs)
        return int(res.new_objects)

    stage.publish(others=others)


def build(
    m: Manifests,
    txn: Txn,
    recs: dict[bytes, DirRec],
    cache: dict[bytes, bytes],
    racy_since: int,
) -> tuple[Digest, dict[bytes, bytes]]:
    """Store the nodes, children before parents; returns the root digest and the stat-cache
    values to keep (directories modified after `racy_since` are left out)."""
    digests: dict[bytes, bytes] = {}
    out: dict[bytes, bytes] = {}
    for rel in sorted(recs, reverse=True):  # a parent's path is a prefix: it sorts before
        d = recs[rel]
        prefix = rel + b"/" if rel else b""
        try:
            subs = [(n, digests[prefix + n]) for n in d.subs]
        except KeyError:
            raise VeloError(
                f"{os.fsdecode(rel) or '.'} changed while it was ingested",
                reason=Reason.SOURCE_UNSTABLE,
                hint="retry the ingest",
            ) from None
        mode, mtime, ino, ctime = d.st
        value: bytes | None = None
        if d.segs is None:
            old = d.cached_subs or {}
            if all(old.get(n) == dg for n, dg in subs):
                digest = d.node
                value = cache.get(rel)
            else:  # only a subdirectory changed: rewrite the stored node (files are as cached)
                node = m.get_node(txn, d.node)
                keep = [e for e in node.entries if e.kind is not Kind.DIR]
                keep += [Entry(n, Kind.DIR, digest=dg) for n, dg in subs]
                digest = m.put_node(txn, mode, mtime, keep)
                dc = statcache.decode(cache[rel])
                assert dc is not None  # the worker decoded it to call the directory clean
                dc.node, dc.subs = digest, dict(subs)
                value = statcache.encode(dc)
        else:
            parts: list[bytes] = []
            for seg, (n, dg) in zip(d.segs, subs, strict=False):
                parts += (seg, dir_entry_bytes(n, dg))
            parts.append(d.segs[-1])
            digest, data = encode_parts(mode, mtime, d.nents + len(subs), parts)
            m.put_raw_node(txn, digest, data)
            head = (ino, mtime, ctime, mode, digest)
            value = statcache.encode_parts(head, d.nfiles, d.cfiles, d.nlinks, d.clinks, subs)
        digests[rel] = digest
        if mtime <= racy_since and value is not None:
            out[rel] = value
    return Digest(digests[b""]), out
