"""Walking the source tree (main process, lstat only) against the ingest stat cache."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator

from veloverlay import paths
from veloverlay.errors import Reason, VeloError
from veloverlay.ingest import statcache
from veloverlay.ingest.source import NOT_COMMITTED, Changed, read_stable
from veloverlay.progress import Progress as ProgressCallback
from veloverlay.records import Record, field
from veloverlay.store.cas import Stage, Store
from veloverlay.store.tree import Entry, Kind
from veloverlay.workers import Workers

__all__ = ["ScanDir", "scan", "Progress", "IngestResult", "worker_init", "entry_mode"]


# -- walking -------------------------------------------------------------------------------------


class ScanDir(Record):
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
    subs: list[ScanDir] = field(default_factory=list)
    hashed: dict[bytes, tuple[int, int, int, int, bytes]] = field(default_factory=dict)
    digest: bytes = b""


def _special_kind(m: int) -> str:
    return "fifo" if stat.S_ISFIFO(m) else "socket" if stat.S_ISSOCK(m) else "device"


def _new_dir(rel: bytes, st: os.stat_result, raw: bytes | None) -> ScanDir:
    d = ScanDir(rel, stat.S_IMODE(st.st_mode), st.st_mtime_ns, st.st_ino, st.st_ctime_ns)
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
) -> list[ScanDir]:
    """Walk `top`, hashing what the stat cache cannot vouch for. Returns the dirs in pre-order.

    The walk is one tight loop (it is the whole cost of a re-ingest): lstat via scandir; a file
    whose stat matches the cache is taken as is, anything else is queued for the hash workers; a
    directory stays clean (its cached node reusable) only if its own stat and every name in it
    match what the cache recorded.
    """
    root = _new_dir(b"", os.lstat(top), cache.get(b""))
    dirs: list[ScanDir] = [root]
    pending: list[tuple[ScanDir, bytes]] = []  # small: 200,000 files must ingest in < 300 MB
    pending_bytes = 0
    stack: list[tuple[bytes, ScanDir]] = [(top, root)]
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
                hint=NOT_COMMITTED,
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
                        pending_bytes += est.st_size
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
        _hash_pending(store, top, pending, res, stage, pool, keep_setid, progress, pending_bytes)
    return dirs


_CHUNK_FILES = 256


_SETID = stat.S_ISUID | stat.S_ISGID


Progress = ProgressCallback  # (files hashed, files to hash, bytes hashed, bytes to hash)


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
    moved_from: str | None = None  # the ref's path before this ingest (a new path was recorded)

    def to_dict(self) -> dict[str, object]:
        d = self.field_dict()
        d["skipped"] = [{"path": p, "kind": k} for p, k in self.skipped]
        d["dedup_bytes"] = self.bytes - self.new_bytes
        return d


_W: dict[str, object] = {}


def worker_init(store_root: str, stage_name: str) -> None:
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
        except Changed:
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


def entry_mode(mode: int, keep_setid: bool) -> int:
    perm = stat.S_IMODE(mode)
    return perm if keep_setid else perm & ~_SETID


def _hash_pending(
    store: Store,
    top: bytes,
    pending: list[tuple[ScanDir, bytes]],
    res: IngestResult,
    stage: Stage,
    pool: Workers | None,
    keep_setid: bool,
    progress: Progress | None,
    total_bytes: int = 0,
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

    done_count = done_bytes = 0
    failures: list[_Fail] = []

    def consume(result: tuple[list[_Done], list[_Fail], dict[bytes, tuple[bytes, int]]]) -> None:
        nonlocal done_count, done_bytes
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
            d.entries.append(
                Entry(name, Kind.FILE, entry_mode(mode, keep_setid), size, mtime, digest)
            )
            if not racy:
                d.hashed[name] = (ino, size, mtime, ctime, digest)
            res.hashed += 1
            done_bytes += size
        done_count += len(done) + len(failed)
        if progress is not None:
            progress(done_count, total, done_bytes, max(total_bytes, done_bytes))

    if pool is None or total <= _CHUNK_FILES:
        worker_init(os.fspath(store.root), stage.name)
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
            hint=NOT_COMMITTED,
        )
