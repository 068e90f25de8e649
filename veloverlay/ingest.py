"""Ingest a directory into the store and commit it as a version of a ref.

Pipeline: walk (main process, lstat only) → hash and stage the files whose stat changed (forked
worker processes, each reading a source under `flock(LOCK_SH|LOCK_NB)` and re-reading it if it
changed while read) → build the Merkle nodes bottom-up → publish the staged objects durably → one
LMDB transaction that compare-and-swaps the ref (merging with session commits made since the last
ingest) and updates the stat cache.

Stat cache: per ref and path, (ino, size, mtime_ns, ctime_ns) → digest. An unchanged stat skips the
read. git's "racy" rule: a file whose mtime is within `RACY_NS` of the scan is hashed but not
cached, so a write in the same timestamp tick is never missed by the next ingest.

Workers are forked before any thread exists and never touch LMDB.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import stat
import time
from collections.abc import Callable, Iterator

from . import faults, paths, statcache
from .cas import Stage, Store
from .digest import Digest, hash_bytes, hash_fd
from .errors import Reason, VeloError
from .manifest import Manifests, Txn
from .merge import three_way
from .records import Record, field
from .tiers import Rules
from .tree import Entry, Kind
from .workers import Workers, default_jobs

__all__ = ["IngestResult", "ingest", "scan"]

RACY_NS = 1_000_000_000
MAX_REREADS = 8
LOCK_TRIES = 200  # × 5 ms: a writer holding an exclusive lock for > 1 s makes the source unstable
_SMALL = 1 << 20
_CHUNK_FILES = 256
_SETID = stat.S_ISUID | stat.S_ISGID

Progress = Callable[[int, int], None]


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
    merged: bool = False
    overridden: list[str] = field(default_factory=list)  # --force: session changes left out
    unchanged: bool = False
    seconds: float = 0.0
    adopted_to: str | None = None

    def to_dict(self) -> dict[str, object]:
        d = self.field_dict()
        d["skipped"] = [{"path": p, "kind": k} for p, k in self.skipped]
        d["dedup_bytes"] = self.bytes - self.new_bytes
        return d


# -- reading a source file stably --------------------------------------------------------------


def _flock(fd: int, op: int) -> None:
    """fcntl.flock, as a seam for tests that inject ENOTSUP/ENOLCK."""
    fcntl.flock(fd, op)


def _lock_source(fd: int, path: bytes, store: Store) -> int:
    """Take a shared lock on the source; return a sidecar fd to release, or -1."""
    for _ in range(LOCK_TRIES):
        try:
            _flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return -1
        except BlockingIOError:
            time.sleep(0.005)
        except OSError as exc:
            if exc.errno not in (errno.ENOTSUP, errno.ENOLCK, errno.EOPNOTSUPP):
                raise
            # The filesystem cannot lock: a sidecar lock in the store, keyed by (dev, ino),
            # never a file written into the tree being ingested.
            side = _lock_sidecar(_sidecar_path(store, fd))
            if side >= 0:
                return side
            break
    raise VeloError(
        f"a writer holds {os.fsdecode(path)} locked", reason=Reason.SOURCE_UNSTABLE, path=path
    )


def _sidecar_path(store: Store, fd: int) -> str:
    st = os.fstat(fd)
    return os.fspath(store.locks / f"{st.st_dev:x}-{st.st_ino:x}.lock")


def _lock_sidecar(path: str) -> int:
    """flock(LOCK_SH) on the sidecar file at `path` (made if missing); -1 if it stays held.

    A finishing reader removes the file when it is the last holder (`_release_sidecar`), so the
    lock is good only if the file locked is still the one at `path` afterwards: else retry."""
    for _ in range(LOCK_TRIES):
        side = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(side, fcntl.LOCK_SH | fcntl.LOCK_NB)
            mine, cur = os.fstat(side), os.stat(path)
        except (BlockingIOError, FileNotFoundError):
            os.close(side)
            time.sleep(0.005)
            continue
        if (mine.st_dev, mine.st_ino) == (cur.st_dev, cur.st_ino):
            return side
        os.close(side)
    return -1


def _release_sidecar(side: int, path: str) -> None:
    """Remove the sidecar if no one else holds it (then close): locks-v1 does not grow by one
    file per file ever ingested."""
    try:
        fcntl.flock(side, fcntl.LOCK_EX | fcntl.LOCK_NB)
        mine, cur = os.fstat(side), os.stat(path)
        if (mine.st_dev, mine.st_ino) == (cur.st_dev, cur.st_ino):
            os.unlink(path)
    except (BlockingIOError, FileNotFoundError):
        pass  # another reader holds it (it removes it when done), or it is gone already
    finally:
        os.close(side)


def _write_barrier(fd: int) -> None:
    """Wait until no write(2) to this file is in flight.

    Buffered writes hold the inode's i_rwsem for their whole copy on tmpfs, ext4 and btrfs, and
    lseek(SEEK_DATA) takes it there too, so this returns only once a concurrent write has
    finished (elsewhere it is a cheap no-op: the double read still narrows the window). Without
    it an unlocked in-place writer could be read half-old, half-new with identical stats
    before and after (measured on tmpfs: ~half the reads of a 1-3 MiB file under a writer
    that pwrite()s without a lock).
    """
    try:
        os.lseek(fd, 0, os.SEEK_DATA)
    except OSError:
        pass  # ENXIO (empty file), or a filesystem without SEEK_DATA


def _same(a: os.stat_result, b: os.stat_result) -> bool:
    return (
        a.st_size == b.st_size
        and a.st_mtime_ns == b.st_mtime_ns
        and a.st_ctime_ns == b.st_ctime_ns
        and a.st_ino == b.st_ino
    )


_NOT_COMMITTED = "nothing was committed; fix the source and retry"


def read_stable(path: bytes, stage: Stage, store: Store) -> tuple[Digest, os.stat_result, bool]:
    """Hash and stage one complete version of `path`. Returns (digest, stat of it, racy)."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    for _ in range(MAX_REREADS):
        try:
            fd = os.open(path, flags)
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EPERM):
                raise VeloError(
                    f"cannot read {os.fsdecode(path)}: {exc.strerror}",
                    reason=Reason.SOURCE_UNREADABLE,
                    path=path,
                ) from None
            raise
        side = -1
        try:
            # Lock first (O_NONBLOCK made the open safe for FIFOs), then one fstat before and
            # one after the read: any write in between changes size, mtime or ctime.
            side = _lock_source(fd, path, store)
            st1 = os.fstat(fd)
            if not stat.S_ISREG(st1.st_mode):
                raise _Changed
            racy = time.time_ns() - st1.st_mtime_ns < RACY_NS
            if racy:
                # A write(2) stamps mtime/ctime when it starts, then copies: one still copying
                # now was stamped before st1, and st2 would not see it. Wait it out first.
                _write_barrier(fd)
            if st1.st_size <= _SMALL:
                data = _read_all(fd, st1.st_size)
                st2 = os.fstat(fd)
                if not _same(st1, st2) or len(data) != st1.st_size:
                    continue
                # Within the timestamp's resolution a write may leave no trace in the stat:
                # for a file modified just now, a second read (after any write in flight
                # during the first has finished) must agree with the first.
                if racy:
                    _write_barrier(fd)
                    if os.pread(fd, st1.st_size + 1, 0) != data:
                        continue
                return stage.add_bytes(data), st1, racy
            digest, size, new = stage.add_fd(fd)
            st2 = os.fstat(fd)
            ok = _same(st1, st2) and size == st1.st_size
            if ok and racy:  # the same second look for large files: hash once more
                _write_barrier(fd)
                os.lseek(fd, 0, os.SEEK_SET)
                ok = hash_fd(fd) == (digest, size)
            if not ok:
                if new:
                    os.unlink(stage.staged.pop(digest))
                continue
            return digest, st1, racy
        finally:
            if side >= 0:
                _release_sidecar(side, _sidecar_path(store, fd))
            os.close(fd)
    raise VeloError(
        f"{os.fsdecode(path)} kept changing while it was read ({MAX_REREADS} tries)",
        reason=Reason.SOURCE_UNSTABLE,
        path=path,
        hint="stop the writer, or retry the ingest",
    )


class _Changed(Exception):
    """The path stopped being a regular file between walk and read."""


def _read_all(fd: int, size: int) -> bytes:
    """Read `size` bytes (a file that grows or shrinks meanwhile shows in the second fstat)."""
    data = os.read(fd, size)
    if len(data) < size:  # a short read: keep going until EOF
        parts = [data]
        got = len(data)
        while got < size:
            more = os.read(fd, size - got)
            if not more:
                break
            parts.append(more)
            got += len(more)
        data = b"".join(parts)
    return data


# -- worker processes ----------------------------------------------------------------------------

_W: dict[str, object] = {}


def _worker_init(store_root: str, stage_name: str) -> None:
    store = Store(store_root)
    _W["store"] = store
    _W["stage"] = Stage.attach(store, stage_name)


_Job = tuple[int, bytes]  # (index in the pending list, absolute path)
_Done = tuple[int, bytes, int, int, int, int, int, bool]  # index, digest, size, mtime, ctime,
# ino, mode, racy
_Fail = tuple[int, str, str]


def _hash_chunk(
    jobs: list[_Job],
) -> tuple[list[_Done], list[_Fail], dict[bytes, tuple[bytes, int]]]:
    store = _W["store"]
    stage = _W["stage"]
    assert isinstance(store, Store) and isinstance(stage, Stage)
    stage.staged = {}
    sizes: dict[bytes, int] = {}
    done: list[_Done] = []
    failed: list[_Fail] = []
    for i, absp in jobs:
        try:
            digest, st, racy = read_stable(absp, stage, store)
        except _Changed:
            failed.append((i, "changed", "no longer a regular file"))
            continue
        except FileNotFoundError:
            failed.append((i, "vanished", "deleted during ingest"))
            continue
        except VeloError as exc:
            failed.append((i, exc.reason.value, exc.message))
            continue
        done.append(
            (i, digest, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_mode, racy)
        )
        if digest in stage.staged and digest not in sizes:
            sizes[digest] = st.st_size
    return done, failed, {d: (p, sizes[d]) for d, p in stage.staged.items()}


# -- walking -------------------------------------------------------------------------------------


class _Dir(Record):
    rel: bytes
    mode: int
    mtime_ns: int
    ino: int
    ctime_ns: int
    cached: statcache.DirCache | None = None
    dirty: bool = True
    entries: list[Entry] = field(default_factory=list)  # hashed files (and the rest at rebuild)
    hits: list[tuple[bytes, int, int, int, bytes, int, int]] = field(default_factory=list)
    links: list[tuple[bytes, int, int, int]] = field(
        default_factory=list
    )  # name, ino, mtime, ctime
    subs: list[_Dir] = field(default_factory=list)
    hashed: dict[bytes, tuple[int, int, int, int, bytes]] = field(default_factory=dict)
    digest: bytes = b""


def _special_kind(m: int) -> str:
    return "fifo" if stat.S_ISFIFO(m) else "socket" if stat.S_ISSOCK(m) else "device"


def _new_dir(rel: bytes, st: os.stat_result, raw: bytes | None) -> _Dir:
    d = _Dir(rel, stat.S_IMODE(st.st_mode), st.st_mtime_ns, st.st_ino, st.st_ctime_ns)
    if raw is not None:
        dc = statcache.decode(raw)
        d.cached = dc
        d.dirty = dc is None or (dc.ino, dc.mtime_ns, dc.ctime_ns, dc.mode) != (
            d.ino,
            d.mtime_ns,
            d.ctime_ns,
            d.mode,
        )
    return d


def scan(
    store: Store,
    top: bytes,
    cache: dict[bytes, bytes],
    res: IngestResult,
    *,
    stage: Stage,
    pool: Workers | None,
    keep_setid: bool,
    progress: Progress | None = None,
) -> list[_Dir]:
    """Walk `top`, hashing what the stat cache cannot vouch for. Returns the dirs in pre-order.

    The walk is one tight loop (it is the whole cost of a re-ingest): lstat via scandir; a file
    whose stat matches the cache is taken as is, anything else is queued for the hash workers; a
    directory stays clean (its cached node reusable) only if its own stat and every name in it
    match what the cache recorded.
    """
    root = _new_dir(b"", os.lstat(top), cache.get(b""))
    dirs: list[_Dir] = [root]
    pending: list[tuple[_Dir, bytes]] = []  # small: 200,000 files must ingest in < 300 MB
    stack: list[tuple[bytes, _Dir]] = [(top, root)]
    cache_get = cache.get
    S_ISDIR, S_ISREG, S_ISLNK = stat.S_ISDIR, stat.S_ISREG, stat.S_ISLNK
    nfiles = nbytes = nlinks = nsetid = 0
    while stack:
        absdir, d = stack.pop()
        prefix = d.rel + b"/" if d.rel else b""
        dc = d.cached
        cfiles = dc.files if dc is not None else {}
        clinks = dc.links if dc is not None else {}
        hits = d.hits
        try:
            it = os.scandir(absdir)
        except PermissionError as exc:
            raise VeloError(
                f"cannot list {os.fsdecode(absdir)}: {exc.strerror}",
                reason=Reason.SOURCE_UNREADABLE,
                path=absdir,
                hint=_NOT_COMMITTED,
            ) from None
        with it:
            for de in it:
                name = de.name
                est = de.stat(follow_symlinks=False)
                m = est.st_mode
                if S_ISREG(m):
                    nfiles += 1
                    nbytes += est.st_size
                    if m & _SETID:
                        nsetid += 1
                    c = cfiles.get(name)
                    if (
                        c is not None
                        and c[0] == est.st_ino
                        and c[1] == est.st_size
                        and c[2] == est.st_mtime_ns
                        and c[3] == est.st_ctime_ns
                    ):
                        hits.append((name, m, est.st_size, est.st_mtime_ns, c[4], c[0], c[3]))
                    else:
                        pending.append((d, name))
                        d.dirty = True
                elif S_ISDIR(m):
                    rel = prefix + name
                    sub = _new_dir(rel, est, cache_get(rel))
                    d.subs.append(sub)
                    dirs.append(sub)
                    stack.append((os.fsencode(de.path), sub))
                elif S_ISLNK(m):
                    link = (name, est.st_ino, est.st_mtime_ns, est.st_ctime_ns)
                    d.links.append(link)
                    nlinks += 1
                    if clinks.get(name) != link[1:]:
                        d.dirty = True
                else:
                    res.skipped.append((paths.display(prefix + name), _special_kind(m)))
        if (
            dc is not None
            and not d.dirty
            and (
                len(hits) != len(cfiles)
                or len(d.links) != len(clinks)
                or len(d.subs) != len(dc.subs)
            )
        ):
            d.dirty = True
    res.files += nfiles
    res.bytes += nbytes
    res.symlinks += nlinks
    if not keep_setid:
        res.stripped_setid += nsetid
    res.dirs = len(dirs) - 1
    if pending:
        _hash_pending(store, top, pending, res, stage, pool, keep_setid, progress)
    return dirs


def _perm(mode: int, keep_setid: bool) -> int:
    perm = stat.S_IMODE(mode)
    return perm if keep_setid else perm & ~_SETID


def _hash_pending(
    store: Store,
    top: bytes,
    pending: list[tuple[_Dir, bytes]],
    res: IngestResult,
    stage: Stage,
    pool: Workers | None,
    keep_setid: bool,
    progress: Progress | None,
) -> None:
    total = len(pending)

    def rel_of(i: int) -> bytes:
        d, name = pending[i]
        return paths.join(d.rel, name)

    def chunks() -> Iterator[list[_Job]]:  # made as workers ask for them, not all at once
        for start in range(0, total, _CHUNK_FILES):
            yield [
                (i, os.path.join(top, rel_of(i)))
                for i in range(start, min(start + _CHUNK_FILES, total))
            ]

    done_count = 0
    failures: list[_Fail] = []

    def consume(result: tuple[list[_Done], list[_Fail], dict[bytes, tuple[bytes, int]]]) -> None:
        nonlocal done_count
        done, failed, staged = result
        for dg, (p, size) in staged.items():
            if dg in stage.staged:
                os.unlink(p)  # two workers staged the same new content
            else:
                stage.staged[dg] = p
                res.new_objects += 1
                res.new_bytes += size
        failures.extend(failed)
        for i, digest, size, mtime, ctime, ino, mode, racy in done:
            d, name = pending[i]
            # The tier is decided when the node is built (_build_nodes), as for cache hits.
            d.entries.append(Entry(name, Kind.FILE, _perm(mode, keep_setid), size, mtime, digest))
            if not racy:
                d.hashed[name] = (ino, size, mtime, ctime, digest)
            res.hashed += 1
        done_count += len(done) + len(failed)
        if progress is not None:
            progress(done_count, total)

    if pool is None or total <= _CHUNK_FILES:
        _worker_init(os.fspath(store.root), stage.name)
        for ch in chunks():
            consume(_hash_chunk(ch))
    else:
        for result in pool.map_unordered(_hash_chunk, chunks()):
            consume(result)
    # Files that vanished or stopped being regular during the ingest are reported, not fatal;
    # anything else (unreadable, unstable) fails the whole ingest before anything is committed.
    for i, reason, msg in failures:
        rel = rel_of(i)
        if reason in ("vanished", "changed"):
            res.files -= 1
            res.skipped.append((paths.display(rel), reason))
            continue
        raise VeloError(  # the workers' messages name the file (absolute)
            msg,
            reason=Reason(reason),
            path=os.path.join(top, rel),
            hint=_NOT_COMMITTED,
        )


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
) -> IngestResult:
    """Ingest `src` as a new version of ref `name` (created if missing).

    `adopt`: afterwards, check that the source still matches what was committed and move it
    aside (`<src>.velo-adopted`), so that a shim session can materialise the ref at its path.
    """
    from .manifest import check_ref_name

    t0 = time.perf_counter()
    check_ref_name(name)
    if "@" in name:
        raise VeloError("cannot ingest into a session ref", reason=Reason.BAD_REF)
    top = _check_source(src, store)
    store.writable()
    jobs = jobs or default_jobs()
    with m.read() as txn:
        existing = m.get_ref(txn, name)
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
        scan_ns = time.time_ns()
        pool = None
        if jobs > 1:
            # Forked workers; they never touch LMDB, and die with this process.
            pool = stack.enter_context(
                Workers(jobs, _worker_init, (os.fspath(store.root), stage.name))
            )
        dirs = scan(
            store,
            top,
            cache,
            res,
            stage=stage,
            pool=pool,
            keep_setid=keep_setid,
            progress=progress,
        )
        # Durability order: objects first (syncfs, rename, syncfs), then the manifest.
        stage.publish(pool.map if pool is not None else None)
        with m.write() as txn:
            root = _build_nodes(m, txn, top, dirs, rules, keep_setid, res)
            res.root = root.hex()
            ref = m.get_ref(txn, name)
            msg = message or f"ingest {os.fsdecode(top)}"
            target: bytes = root
            if ref is not None:
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
            if not res.unchanged:
                delta = m.diff(txn, head_root, target) if ref is not None else None
                c = m.commit(
                    txn,
                    name,
                    target,
                    expect_head=ref.head if ref else None,
                    message=msg,
                    delta=delta,
                    path=os.fsdecode(top),
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
            statcache.write(
                m, txn, name, config, cache_keys, cache, _cache_values(dirs, cache, scan_ns)
            )
    faults.point("commit.after")
    if adopt:
        res.adopted_to = _adopt(store, m, src, name, res, rules, keep_setid)
    res.seconds = time.perf_counter() - t0
    return res


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


def _build_nodes(
    m: Manifests,
    txn: Txn,
    top: bytes,
    dirs: list[_Dir],
    rules: Rules,
    keep_setid: bool,
    res: IngestResult,
) -> Digest:
    """Nodes bottom-up (reverse pre-order: children before parents); clean dirs reuse theirs."""
    classify = rules.classify
    for d in reversed(dirs):
        dc = d.cached
        if (
            not d.dirty
            and dc is not None
            and all(dc.subs.get(_base(s.rel)) == s.digest for s in d.subs)
            and m.has_node(txn, dc.node)
        ):
            d.digest = dc.node
            continue
        prefix = d.rel + b"/" if d.rel else b""
        entries = [
            Entry(
                e.name,
                Kind.FILE,
                e.mode,
                e.size,
                e.mtime_ns,
                e.digest,
                b"",
                classify(prefix + e.name),
            )
            for e in d.entries
        ]
        for name, mode, size, mtime, digest, _ino, _ctime in d.hits:
            entries.append(
                Entry(
                    name,
                    Kind.FILE,
                    _perm(mode, keep_setid),
                    size,
                    mtime,
                    digest,
                    b"",
                    classify(prefix + name),
                )
            )
        for name, _ino, mtime, _ctime in d.links:
            try:
                target = os.readlink(os.path.join(top, prefix + name))
            except OSError:
                res.skipped.append((paths.display(prefix + name), "vanished"))
                continue
            if not target or len(target) > 4095:
                res.skipped.append((paths.display(prefix + name), "bad-symlink"))
                continue
            entries.append(Entry(name, Kind.SYMLINK, 0o777, len(target), mtime, b"", target, 0))
        for sub in d.subs:
            entries.append(Entry(_base(sub.rel), Kind.DIR, digest=sub.digest))
        d.digest = m.put_node(txn, d.mode, d.mtime_ns, entries)
    return Digest(dirs[0].digest)


def _base(rel: bytes) -> bytes:
    return rel.rpartition(b"/")[2]


def _cache_values(dirs: list[_Dir], old: dict[bytes, bytes], scan_ns: int) -> dict[bytes, bytes]:
    """What the stat cache keeps after this ingest (racy directories are left out)."""
    out: dict[bytes, bytes] = {}
    for d in dirs:
        if scan_ns - d.mtime_ns < RACY_NS:
            continue
        dc = d.cached
        if not d.dirty and dc is not None and dc.node == d.digest:
            out[d.rel] = old[d.rel]  # unchanged: the stored value stays as it is
            continue
        files = {n: (ino, size, mt, ct, dg) for n, _m, size, mt, dg, ino, ct in d.hits}
        files.update(d.hashed)
        out[d.rel] = statcache.encode(
            statcache.DirCache(
                d.ino,
                d.mtime_ns,
                d.ctime_ns,
                d.mode,
                d.digest,
                files,
                {name: (ino, mt, ct) for name, ino, mt, ct in d.links},
                {_base(s.rel): s.digest for s in d.subs},
            )
        )
    return out


def drop_cache(m: Manifests, txn: Txn, name: str) -> None:
    statcache.drop(m, txn, name)
