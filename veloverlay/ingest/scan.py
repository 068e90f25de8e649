"""Walking, hashing and encoding a source tree in the worker processes (ingest's parallel part).

A task is a directory. The worker that takes it lists it (`scandir` + `lstat`), compares every name
with the stat cache (the coordinator loaded it before forking, so each worker has it without a
copy), reads and stages the files whose stat changed (`read_stable`), reads the symlinks, and
encodes the node entries of the files and symlinks itself; then it goes on into the
subdirectories, depth first, until it has done about `BUDGET` units of work, and hands the
subdirectories it did not reach back as new tasks.

The walk goes by directory descriptors, never by paths from `/` (dirfd.py): the tree may belong to
another user, who can swap a directory for a symlink to root's files while root walks it. The top
is opened once, before the workers fork; a subdirectory is opened relative to its parent's
descriptor and must be the (dev, ino) its parent's listing saw; files and symlinks are read
relative to their directory's descriptor; a task handed back is opened beneath the top's
descriptor. A directory replaced meanwhile fails the ingest (SOURCE_UNSTABLE). Only the ancestors
of the directory being walked that still have subdirectories to walk keep a descriptor open
(at most `_HELD` per task: beyond, subdirectories are handed back as tasks).

A task's result is one record per directory: its entries already encoded (split where the
subdirectories' entries go) and its stat-cache values, also encoded, or, for a directory the cache
vouches for, only the digest of the node the last ingest built.

Each worker keeps the list of what it staged until the coordinator (coordinator.py: `walk`,
`publish`, `build`) has it rename its own objects (`publish_own`).
"""

from __future__ import annotations

import os
import stat
from typing import Any, NamedTuple

from veloverlay import _libc, paths, posixacl, workers
from veloverlay.errors import Reason, VeloError
from veloverlay.ingest import dirfd, source, statcache
from veloverlay.ingest.source import NOT_COMMITTED
from veloverlay.progress import Progress as ProgressCallback
from veloverlay.store.cas import Stage, Store
from veloverlay.store.digest import allow_threads
from veloverlay.store.tree import Kind, entry_bytes
from veloverlay.tiers import Rules

__all__ = [
    "DirRec",
    "Progress",
    "open_top",
    "Task",
    "run_task",
    "publish_own",
    "worker_init",
    "worker_state",
]

BUDGET = 4096  # units of work per task: one per name listed, 16 per file read
_HELD = 64  # directory descriptors one task keeps open for subdirectories still to walk
_REPORT_FILES = 64  # a worker reports its progress after reading this many files, or bytes
_REPORT_BYTES = 16 << 20
_SETID = stat.S_ISUID | stat.S_ISGID
_ACL = statcache.ACL

# (files hashed, None, bytes hashed, None): the totals are never known before the end, as the
# walk and the reads run together (and a total that changes restarts a bar's rate).
Progress = ProgressCallback
_Stat = tuple[int, int, int, int]  # a directory's mode (permissions), mtime_ns, ino, ctime_ns
Task = tuple[bytes, _Stat, bool, int]  # rel path, its stat, solo (this directory only, dirty), dev
_Sub = tuple[bytes, bytes, _Stat, int]  # a subdirectory listed: rel path, name, stat, dev


class DirRec(NamedTuple):
    """What a worker found in one directory."""

    rel: bytes
    st: _Stat
    dev: int
    subs: list[bytes]  # subdirectory names, sorted
    nents: int  # entries other than subdirectories
    segs: list[bytes] | None  # encoded entries, split at the subdirectories (None: clean)
    node: bytes  # clean: the node the last ingest built for it
    cached_subs: dict[bytes, bytes] | None  # clean: the subdirectories' digests then
    nfiles: int  # stat-cache values (dirty only): files, encoded
    cfiles: bytes
    nlinks: int  # symlinks, encoded
    clinks: bytes


class _Result(NamedTuple):
    dirs: list[DirRec]
    more: list[Task]
    staged: int  # objects newly staged (kept by the worker until `publish_own`)
    failures: list[tuple[bytes, str, str]]  # rel, reason, message
    skipped: list[tuple[str, str]]
    # files, bytes, symlinks, hashed, hashed files and bytes not reported yet, setid files,
    # files and directories with an extended ACL (posixacl: stored narrowed, named entries dropped),
    # files other users cannot read and directories they cannot list or enter (`private`)
    counts: tuple[int, int, int, int, int, int, int, int, int]


class _State:
    def __init__(
        self,
        store: Store,
        stage: Stage,
        top: bytes,
        top_fd: int,
        cache: dict[bytes, bytes],
        rules: Rules,
        keep_setid: bool,
    ) -> None:
        self.store, self.stage, self.top, self.cache = store, stage, top, cache
        self.top_fd = top_fd  # opened before the fork: only ever a dir_fd (a shared offset)
        self.classify = rules.classify
        self.keep_setid = keep_setid
        self.fs: dict[int, int] = {}  # st_dev -> statfs's f_type


_S: list[_State] = []


def worker_state(
    store: Store,
    stage: Stage,
    top: bytes,
    top_fd: int,
    cache: dict[bytes, bytes],
    rules: Rules,
    keep: bool,
) -> tuple[Any, ...]:
    """The worker initialiser's arguments (objects handed over by fork, never pickled)."""
    return (store, stage.name, top, top_fd, cache, rules, keep, os.getpid())


def worker_init(
    store: Store,
    stage_name: str,
    top: bytes,
    top_fd: int,
    cache: dict[bytes, bytes],
    rules: Rules,
    keep: bool,
    coordinator: int,
) -> None:
    if os.getpid() != coordinator:  # a forked worker: room for the objects it holds open,
        workers.allow_files(16384)
        allow_threads()  # and all cores for a large file (it never makes a namespace)
    _S[:] = [_State(store, Stage.attach(store, stage_name), top, top_fd, cache, rules, keep)]


def race_point(what: str, rel: bytes) -> None:
    """A seam for the race tests (they replace it to swap a directory at that moment); does
    nothing. `what`: "top" (before the top is opened), "task" (before a task's directory is
    opened), "listed" (a directory listed, before its subdirectories are opened), "file" (before
    a file or symlink is read), "adopt" (before --adopt moves the source aside)."""


def open_top(top: bytes) -> int:
    """A descriptor of the top directory `top` (resolved by the caller), opened with no symlink
    followed on the way, for the whole ingest: nothing is reached by a path from `/` again."""
    race_point("top", b"")
    try:
        return dirfd.open_path(top)
    except (dirfd.Replaced, FileNotFoundError, NotADirectoryError):
        raise VeloError(
            f"{os.fsdecode(top)} was removed or replaced (a directory on the way by a symlink) "
            "while it was ingested",
            reason=Reason.SOURCE_UNSTABLE,
            path=top,
            hint=NOT_COMMITTED,
        ) from None
    except PermissionError as exc:
        raise VeloError(
            f"cannot list {os.fsdecode(top)}: {exc.strerror}",
            reason=Reason.SOURCE_UNREADABLE,
            path=top,
        ) from None


class _Acc:
    __slots__ = (
        "files",
        "nbytes",
        "links",
        "hashed",
        "hbytes",
        "setid",
        "acl",
        "private",
        "failures",
        "skipped",
        "unrep",
        "unrep_bytes",
    )

    def __init__(self) -> None:
        self.files = self.nbytes = self.links = self.hashed = self.hbytes = self.setid = 0
        self.acl = self.private = 0
        self.unrep = self.unrep_bytes = 0  # hashed since the last progress report
        self.failures: list[tuple[bytes, str, str]] = []
        self.skipped: list[tuple[str, str]] = []


class _Parent:
    """A directory's descriptor, kept open while subdirectories of it are still to walk."""

    __slots__ = ("fd", "left")

    def __init__(self, fd: int, left: int) -> None:
        self.fd, self.left = fd, left


def run_task(task: Task) -> _Result:
    s = _S[0]
    before = s.stage.pending()
    acc = _Acc()
    rel, st, solo, dev = task
    race_point("task", rel)
    # Depth first: (rel, name, stat, dev, the parent's descriptor: None for the task's own
    # directory, opened beneath the top).
    stack: list[tuple[bytes, bytes, _Stat, int, _Parent | None]] = [(rel, b"", st, dev, None)]
    dirs: list[DirRec] = []
    more: list[Task] = []
    held: list[_Parent] = []  # every parent made (closed ones have fd -1)
    nheld = spent = 0
    try:
        while stack and spent < BUDGET:
            rel, name, st, dev, parent = stack.pop()
            fd = _open_dir(s, rel, name, st, dev, parent, acc)
            if parent is not None:
                parent.left -= 1
                if not parent.left:
                    os.close(parent.fd)
                    parent.fd = -1
                    nheld -= 1
            if fd < 0:
                spent += 1
                continue
            try:
                rec, subs, cost = _one_dir(s, fd, rel, st, dev, solo, acc)
            except BaseException:
                os.close(fd)
                raise
            spent += cost
            if rec is None or solo or not subs:
                os.close(fd)
                if rec is not None:
                    dirs.append(rec)
                continue
            dirs.append(rec)
            race_point("listed", rel)
            if nheld >= _HELD:  # a deep tree: hand these back, reopened beneath the top
                os.close(fd)
                more += [(r, st_, False, dv) for r, _n, st_, dv in subs]
                continue
            p = _Parent(fd, len(subs))
            held.append(p)
            nheld += 1
            stack += [(r, n, st_, dv, p) for r, n, st_, dv in subs]
    finally:
        for p in held:
            if p.fd >= 0:
                os.close(p.fd)
    staged = s.stage.pending() - before
    counts = (
        acc.files,
        acc.nbytes,
        acc.links,
        acc.hashed,
        acc.unrep,
        acc.unrep_bytes,
        acc.setid,
        acc.acl,
        acc.private,
    )
    more += [(r, st, False, dv) for r, _n, st, dv, _p in stack]
    return _Result(dirs, more, staged, acc.failures, acc.skipped, counts)


def _open_dir(
    s: _State, rel: bytes, name: bytes, st: _Stat, dev: int, parent: _Parent | None, acc: _Acc
) -> int:
    """A descriptor of the directory `rel` listed as (dev, st), or -1 and a failure."""
    try:
        if parent is None:
            return dirfd.open_beneath(s.top_fd, rel, dev, st[2])
        return dirfd.open_child(parent.fd, name, dev, st[2])
    except PermissionError as exc:
        shown = os.fsdecode(s.top + b"/" + rel if rel else s.top)
        acc.failures.append(
            (rel, Reason.SOURCE_UNREADABLE.value, f"cannot list {shown}: {exc.strerror}")
        )
    except (FileNotFoundError, NotADirectoryError, dirfd.Replaced):
        shown = os.fsdecode(s.top + b"/" + rel if rel else s.top)
        msg = f"the directory {shown} was removed or replaced while it was ingested"
        acc.failures.append((rel, Reason.SOURCE_UNSTABLE.value, msg))
    return -1


def _special_kind(m: int) -> str:
    return "fifo" if stat.S_ISFIFO(m) else "socket" if stat.S_ISSOCK(m) else "device"


def _one_dir(
    s: _State, dfd: int, rel: bytes, st: _Stat, dev: int, solo: bool, acc: _Acc
) -> tuple[DirRec | None, list[_Sub], int]:
    """List the directory `dfd` (`rel`); hash and encode what the cache cannot vouch for."""
    magic = dirfd.fs_magic(dfd, dev, s.fs)
    if magic in _libc.PSEUDO_FS_MAGIC:  # /proc, /sys... mounted in the tree: kept empty
        acc.skipped.append((paths.display(rel or b"."), "pseudo-filesystem"))
        return DirRec(rel, st, dev, [], 0, [b""], b"", None, 0, b"", 0, b""), [], 1
    # The directory's own mode as its access ACL allows (posixacl), read by its descriptor.
    perm, extended = posixacl.mode_of(dfd, st[0])
    if extended:
        acc.acl += 1
        st = (perm, st[1], st[2], st[3])
    if perm & 0o005 != 0o005:  # other users can neither list nor enter it
        acc.private += 1
    absdir = s.top + b"/" + rel if rel else s.top  # for messages only
    prefix = rel + b"/" if rel else b""
    raw = s.cache.get(rel)
    dc = statcache.decode(raw) if raw is not None else None
    dirty = solo or dc is None or (dc.mode, dc.mtime_ns, dc.ino, dc.ctime_ns) != st
    cfiles = dc.files if dc is not None else {}
    clinks = dc.links if dc is not None else {}
    hits: list[tuple[bytes, int, int, int, bytes, int, int]] = []
    todo: list[bytes] = []
    links: list[tuple[bytes, int, int, int]] = []
    subs: list[_Sub] = []
    it = os.scandir(dfd)  # names; each entry's lstat is fstatat(dfd, name)
    S_ISDIR, S_ISREG, S_ISLNK, S_IMODE = stat.S_ISDIR, stat.S_ISREG, stat.S_ISLNK, stat.S_IMODE
    n = 0
    # The depth bound (paths.DEPTH_MAX levels, PATH_MAX bytes), checked per name only in the
    # rare directories where a name could cross it.
    level = rel.count(b"/") + 2 if rel else 1  # of the entries listed here
    near_limit = level > paths.DEPTH_MAX or len(prefix) + paths.NAME_MAX > paths.PATH_MAX
    with it:
        for de in it:
            n += 1
            name = os.fsencode(de.name)
            if near_limit and (level > paths.DEPTH_MAX or len(prefix) + len(name) > paths.PATH_MAX):
                msg = (
                    f"the tree is too deep at {paths.display((prefix + name)[:60])}...: at most "
                    f"{paths.DEPTH_MAX} levels and {paths.PATH_MAX}-byte paths are kept"
                )
                acc.failures.append((prefix + name, Reason.TOO_DEEP.value, msg))
                return None, [], 1
            try:
                est = de.stat(follow_symlinks=False)
            except FileNotFoundError:  # listed, then removed: as a file gone when it is read
                acc.skipped.append((paths.display(prefix + name), "vanished"))
                dirty = True
                continue
            m = est.st_mode
            if S_ISREG(m):
                acc.files += 1
                acc.nbytes += est.st_size
                if m & _SETID:
                    acc.setid += 1
                if not m & 0o004:
                    acc.private += 1
                c = cfiles.get(name)
                if (
                    c is not None
                    and c[0] == est.st_ino
                    and c[1] == est.st_size
                    and c[2] == est.st_mtime_ns
                    and c[3] == est.st_ctime_ns
                    and c[5] == m & 0o7777
                ):
                    # the mode as stored: narrowed by an extended ACL (statcache.ACL) then
                    hits.append((name, c[6], est.st_size, est.st_mtime_ns, c[4], c[0], c[3]))
                    if c[6] & _ACL:
                        acc.acl += 1
                else:
                    todo.append(name)
                    dirty = True
            elif S_ISDIR(m):
                mst = (S_IMODE(m), est.st_mtime_ns, est.st_ino, est.st_ctime_ns)
                subs.append((prefix + name, name, mst, est.st_dev))
            elif S_ISLNK(m):
                acc.links += 1
                links.append((name, est.st_ino, est.st_mtime_ns, est.st_ctime_ns))
                if clinks.get(name) != (est.st_ino, est.st_mtime_ns, est.st_ctime_ns):
                    dirty = True
            else:
                acc.skipped.append((paths.display(prefix + name), _special_kind(m)))
    subnames = sorted(n for _r, n, _st, _dev in subs)
    if (
        not dirty
        and dc is not None
        and len(hits) == len(cfiles)
        and len(links) == len(clinks)
        and len(subs) == len(dc.subs)
    ):
        rec = DirRec(rel, st, dev, subnames, 0, None, dc.node, dc.subs, 0, b"", 0, b"")
        return rec, subs, n
    # Dirty: read what changed, encode every entry (and the cache values) here.
    classify, keep = s.classify, s.keep_setid
    ents: list[tuple[bytes, bytes | None]] = [(n_, None) for n_ in subnames]
    cache_files: list[bytes] = []
    cache_links: list[bytes] = []
    FILE, SYMLINK = Kind.FILE, Kind.SYMLINK
    for name, m, size, mtime, digest, ino, ctime in hits:
        perm = m & 0o7777 if keep else m & 0o7777 & ~_SETID
        blob = entry_bytes(name, FILE, classify(prefix + name), perm, size, mtime, digest)
        ents.append((name, blob))
        modes = cfiles[name][5:]  # as listed and as stored
        cache_files.append(statcache.file_bytes(name, ino, size, mtime, ctime, digest, *modes))
    stage, store, coarse = s.stage, s.store, dirfd.coarse_ctime(magic)
    for name in todo:
        race_point("file", prefix + name)
        try:
            digest, fst, racy, acl = source.read_stable(
                dfd, name, absdir, stage, store, coarse, dev
            )
        except (source.Changed, source.Pseudo) as exc:
            acc.files -= 1
            why = "changed" if isinstance(exc, source.Changed) else "pseudo-filesystem"
            acc.skipped.append((paths.display(prefix + name), why))
            continue
        except FileNotFoundError:
            acc.files -= 1
            acc.skipped.append((paths.display(prefix + name), "vanished"))
            continue
        except VeloError as exc:
            acc.failures.append((prefix + name, exc.reason.value, exc.message))
            continue
        acc.hashed += 1
        acc.hbytes += fst.st_size
        acc.unrep += 1
        acc.unrep_bytes += fst.st_size
        if acc.unrep >= _REPORT_FILES or acc.unrep_bytes >= _REPORT_BYTES:
            workers.report((acc.unrep, acc.unrep_bytes))
            acc.unrep = acc.unrep_bytes = 0
        size = fst.st_size
        # An extended ACL narrows the group bits; the cache keeps the mode as stored (a hit
        # reads no ACL) with the mode as listed (a hit must list the same).
        listed = fst.st_mode & 0o7777
        narrowed, extended = posixacl.narrow(listed, acl)
        acc.acl += extended
        perm = narrowed if keep else narrowed & ~_SETID
        blob = entry_bytes(name, FILE, classify(prefix + name), perm, size, fst.st_mtime_ns, digest)
        ents.append((name, blob))
        if not racy:
            stored = narrowed | _ACL if extended else narrowed
            cache_files.append(
                statcache.file_bytes(
                    name, fst.st_ino, size, fst.st_mtime_ns, fst.st_ctime_ns, digest, listed, stored
                )
            )
    for name, ino, mtime, ctime in links:
        cache_links.append(statcache.link_bytes(name, ino, mtime, ctime))
        race_point("file", prefix + name)
        try:
            target = os.readlink(name, dir_fd=dfd)
        except OSError:
            acc.skipped.append((paths.display(prefix + name), "vanished"))
            continue
        if not target or len(target) > 4095:
            acc.skipped.append((paths.display(prefix + name), "bad-symlink"))
            continue
        ents.append((name, entry_bytes(name, SYMLINK, 0, 0o777, len(target), mtime, target)))
    for name, _b in ents:
        try:
            paths.check_name(name)  # never write a node that decode() would refuse
        except VeloError as exc:
            acc.failures.append((prefix + name, exc.reason.value, exc.message))
    ents.sort(key=lambda e: e[0])
    segs: list[bytes] = []
    cur: list[bytes] = []
    for _name, piece in ents:
        if piece is None:
            segs.append(b"".join(cur))
            cur = []
        else:
            cur.append(piece)
    segs.append(b"".join(cur))
    count = len(ents) - len(subnames)
    cf, cl = b"".join(cache_files), b"".join(cache_links)
    nf, nl = len(cache_files), len(cache_links)
    rec = DirRec(rel, st, dev, subnames, count, segs, b"", None, nf, cf, nl, cl)
    return rec, subs, n + 16 * len(todo)


def publish_own(_: None) -> tuple[int, int]:
    return _S[0].stage.rename_own()
