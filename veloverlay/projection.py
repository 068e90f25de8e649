"""Lower layers: turn a manifest root into directories an overlay can stack, cached per root.

Two forms (DESIGN.md "Projection"), chosen by the probe (`probe.lower_form`), never by version:

* **data-only** — a *metadata layer*: per Tier-2 file a sparse file of the real size with the
  manifest's mode and mtime and the xattrs `user.overlay.metacopy` (empty) and
  `user.overlay.redirect` = `/<ab>/<id>`, a path in the *data-only layer* `<store>/ids-v1/`, which
  holds a second hard link of each object under a short name (`ab` + 18 more hex digits of the
  digest = 80 bits). Redirect values stay at 22 bytes: on ext4 a value above ~24 bytes no longer
  fits in the inode and costs a 4 KiB xattr block per file (measured: 80 MB per 20,000 files with
  the 71-byte object path, 0.5 MB with the short id; the short-name hard link costs ~10 µs per
  object on first use, ~98,000/s, and a symlink in the data-only layer is not followed by
  overlayfs: ENOENT, measured). Mounted as `lowerdir=<meta>` + data-only lower `ids-v1` with
  `userxattr`. That is the form kept in the store; where a per-boot tmpfs directory is usable
  (`volatile.py`) metadata layers are built there instead — an inode on tmpfs costs a fraction
  of an ext4 one and xattr size only memory — with redirects to the full object path
  `/<ab>/<cd>/<hex>` and `objects-v1` itself as the data-only lower: no short names to make.
* **links** — a tree of hard links to per-(digest, mode) *proxy* inodes in `trees-v1/proxies/`:
  copies (reflinks where the filesystem can) of the object with the entry's mode, never the 0444
  object itself (a non-root owner could not write the merged file). A proxy is shared by every
  path with that content and mode, so its mtime cannot be each path's: it is normalised to
  `PROXY_MTIME_NS` (1 s after the epoch, as Nix does), and harvest ignores that value on
  copied-up files whose content did not change. EMLINK (65,000 links on ext4) opens another proxy.

Both forms project Tier-1 entries as symlinks to their objects (absolute paths) and skip MASK
entries. When `protect` is set (real root with a working FS_IOC_SETFLAGS), every object a lower
references gets `chattr +i` after its short-name link exists (link() to a +i inode is EPERM,
measured); what was reached is returned, never assumed (P0-d).

Cost follows the change: a layer set ("stack") is cached per (form, root) in `trees-v1/stacks/`.
For a new root whose ancestor (a hint) has a cached stack, only the delta is built, as a small
extra layer on top (puts as entries, deletions as whiteouts — a 0/0 char device where mknod works,
else a zero-size file with `user.overlay.whiteout` inside a directory marked `user.overlay.opaque=x`
— replaced directories as `user.overlay.opaque=y`); after `FLATTEN_AFTER` layers the root is built
whole again. Builds run under a per-(form, root) flock, into a temp dir renamed into place.

Layout under the store (a per-boot cache has the same layers/ stacks/ locks/ tmp/):
    ids-v1/<ab>/<18 hex>                       short names of objects (data-only layer)
    trees-v1/layers/<name>/                    one layer (immutable once renamed into place)
    trees-v1/stacks/<form>-<root hex>.json     the layers (top first) that project that root
    trees-v1/proxies/<ab>/<hex>-<mode>[-<n>]   proxy inodes (links form)
    trees-v1/locks/  trees-v1/tmp/
A stack is looked up in the per-boot cache, then in the store; a delta layer is only stacked on
a base in the same place; a build that fills the cache (ENOSPC) is redone in the store.

Imports the kernel modules (`fsflags`, `linking`) and the manifest layer; nothing here mounts.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import stat
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from . import faults, fsflags, linking, paths
from .cas import Store, object_missing
from .digest import hash_fd
from .errors import Reason, SysError, VeloError
from .manifest import Manifests, Txn
from .records import Record, field
from .tree import Entry, Kind, Node, Op, OpKind

__all__ = [
    "FORMS",
    "PROXY_MTIME_NS",
    "FLATTEN_AFTER",
    "Lowers",
    "ensure_lowers",
    "ids_dir",
    "short_id_path",
    "stack_roots",
    "name_and_protect",
    "prune",
    "force_rmtree",
]

FORMS = ("data-only", "links")
PROXY_MTIME_NS = 1_000_000_000
FLATTEN_AFTER = 20
# A delta with more operations than this is cheaper to build whole (a layer per op would be big).
DELTA_MAX_OPS = 20_000
# Data-only delta layers copy the changed files' bytes (see _Writer); above this, rebuild.
DELTA_MAX_COPY = 256 << 20
_ID_HEX = 20  # 80 bits: "ab" directory + 18 hex digits
_XATTR_METACOPY = "user.overlay.metacopy"
_XATTR_REDIRECT = "user.overlay.redirect"
_XATTR_OPAQUE = "user.overlay.opaque"
_XATTR_WHITEOUT = "user.overlay.whiteout"
_DIRFLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEWFILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class Lowers(Record, frozen=True):
    """The layers that project `root`: pass `layers` (topmost first) and `data_layers` to mount."""

    form: str
    root: bytes
    layers: tuple[str, ...]
    data_layers: tuple[str, ...]
    built: str  # "cached" | "delta" | "full"
    seconds: float
    immutable: bool  # every object these layers reference carries +i
    protection_note: str
    home: str = ""  # the directory holding layers/ and stacks/ (store or per-boot cache)
    warning: str = ""  # e.g. the per-boot cache was full and the layers went to the store


def ids_dir(store: Store) -> Path:
    return store.root / "ids-v1"


def short_id_path(store: Store, short: str) -> bytes:
    return os.fsencode(ids_dir(store)) + b"/" + short[:2].encode() + b"/" + short[2:].encode()


def _trees(store: Store, *parts: str) -> Path:
    return store.trees.joinpath(*parts)


class _Home(Record, frozen=True):
    """Where layers, stacks, their locks and half-built layers live: the store's `trees-v1/`,
    or (data-only form) the per-boot tmpfs directory of `volatile.py`, whose layers redirect
    to full object paths under `objects-v1/` instead of short names under `ids-v1/`."""

    root: Path
    volatile: bool

    def sub(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)


def _disk_home(store: Store) -> _Home:
    return _Home(store.trees, False)


def _volatile_home(store: Store) -> _Home | None:
    from . import volatile

    path = volatile.home(store.root)
    return _Home(path, True) if path is not None else None


def _data_layers(store: Store, home: _Home, form: str) -> tuple[str, ...]:
    if form != "data-only":
        return ()
    return (os.fspath(store.objects if home.volatile else ids_dir(store)),)


def layer_homes(store: Store) -> list[Path]:
    """The directories holding this store's `layers/` and `stacks/` for the calling user: the
    per-boot cache (when there is one) and the store's `trees-v1/`."""
    fast = _volatile_home(store)
    return ([fast.root] if fast is not None else []) + [store.trees]


# --- small fs helpers --------------------------------------------------------------------------
def _rmdir_shallow(p: str) -> bool:
    """Remove `p` if it is an empty directory or holds only empty directories (an untouched
    session's upper and work dirs); False if it holds anything else."""
    try:
        os.rmdir(p)
        return True
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            return False
    try:
        with os.scandir(p) as it:
            entries = list(it)
        if not all(e.is_dir(follow_symlinks=False) for e in entries):
            return False  # files or symlinks (never chmod through a symlink): the full walk
        for sub in (e.path for e in entries):
            with contextlib.suppress(OSError):
                os.chmod(sub, 0o700)  # overlay leaves work/work at 000
            os.rmdir(sub)
        os.rmdir(p)
        return True
    except OSError:
        return False


def force_rmtree(path: str | os.PathLike[str]) -> None:
    """Remove a tree we own whatever its modes (0555/000 dirs, overlay's work/work)."""
    p = os.fspath(path)
    if not os.path.lexists(p):
        return
    if _rmdir_shallow(p):
        return
    import shutil  # here: a session's usual upper and work dirs go without it (start-up time)

    def onerror(_fn: object, failed: str, _exc: object) -> None:
        for target in (os.path.dirname(failed), failed):
            with contextlib.suppress(OSError):
                if not os.path.islink(target):
                    os.chmod(target, 0o700)
        with contextlib.suppress(FileNotFoundError):
            if os.path.isdir(failed) and not os.path.islink(failed):
                shutil.rmtree(failed, onerror=onerror)
            else:
                os.unlink(failed)

    if os.path.isdir(p) and not os.path.islink(p):
        with contextlib.suppress(OSError):
            os.chmod(p, 0o700)
        for root, dirs, _files in os.walk(p):
            for d in dirs:
                full = os.path.join(root, d)
                with contextlib.suppress(OSError):
                    if not os.path.islink(full):
                        os.chmod(full, 0o700)
        shutil.rmtree(p, onerror=onerror)
    else:
        os.unlink(p)


@contextlib.contextmanager
def _flock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _write_json_atomic(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}")
    tmp.write_text(json.dumps(data, sort_keys=True))
    os.rename(tmp, path)


# --- object names and protection ---------------------------------------------------------------
class _Objects:
    """Per-build bookkeeping for the objects a layer references: short names, +i, proxies."""

    def __init__(
        self,
        store: Store,
        m: Manifests,
        txn: Txn,
        *,
        protect: bool,
        form: str,
        volatile: bool = False,
    ) -> None:
        self.store = store
        self.volatile = volatile
        self.m = m
        self.txn = txn
        self.protect = protect
        self.form = form
        self.ids_b = os.fsencode(ids_dir(store))
        self.proxies_b = os.fsencode(_trees(store, "proxies"))
        self.seen_ids: dict[bytes, str] = {}
        self.made_dirs: set[bytes] = set()
        self.protected: set[bytes] = set()
        self.protect_failed: list[str] = []
        self.proxies: dict[tuple[bytes, int], tuple[bytes, int]] = {}
        if form == "links":  # parents made here, before a build sets umask 0
            os.makedirs(self.proxies_b, exist_ok=True)

    # -- +i
    def _immutable(self, digest: bytes) -> None:
        if not self.protect or digest in self.protected:
            return
        self.protected.add(digest)
        try:
            fsflags.set_immutable(os.fsdecode(self.store.object_path_b(digest)), True)
        except OSError as exc:
            if len(self.protect_failed) < 5:
                self.protect_failed.append(f"{digest.hex()[:16]}: {exc}")

    # -- redirects (data-only layer)
    def redirect(self, digest: bytes) -> bytes:
        """The `user.overlay.redirect` value naming `digest` in the data-only layer (the object
        is named there first and made +i when protecting)."""
        if self.volatile:  # the layer is objects-v1 itself; tmpfs does not mind 71 bytes
            h = digest.hex().encode()
            self._immutable(digest)
            return b"/%s/%s/%s" % (h[:2], h[2:4], h)
        short = self.short_id(digest)
        return b"/%s/%s" % (short[:2].encode(), short[2:].encode())

    def short_id(self, digest: bytes) -> str:
        """Ensure `ids-v1/<ab>/<rest>` is a hard link of the object; return the id."""
        known = self.seen_ids.get(digest)
        if known is not None:
            return known
        alt = self.txn.get(digest, db=self.m.ids)
        short = bytes(alt).decode() if alt is not None else digest.hex()[:_ID_HEX]
        short = self._link_id(digest, short)
        self.seen_ids[digest] = short
        return short

    def _link_id(self, digest: bytes, short: str) -> str:
        src = self.store.object_path_b(digest)
        dname = self.ids_b + b"/" + short[:2].encode()
        if dname not in self.made_dirs:
            os.makedirs(dname, 0o755, exist_ok=True)
            self.made_dirs.add(dname)
        dst = dname + b"/" + short[2:].encode()
        try:
            os.link(src, dst, follow_symlinks=False)
        except FileExistsError:
            a, b = os.lstat(src), os.lstat(dst)
            if (a.st_ino, a.st_dev) == (b.st_ino, b.st_dev):
                self._immutable(digest)
                return short
            return self._id_clash(digest, short, dst)
        except PermissionError:
            # The object is +i already (link() to an immutable inode is EPERM, measured): only
            # a process that may clear the flag can name it; it sets it again at once.
            if not self.protect:
                raise
            fsflags.set_immutable(os.fsdecode(src), False)
            try:
                os.link(src, dst, follow_symlinks=False)
            finally:
                fsflags.set_immutable(os.fsdecode(src), True)
        except FileNotFoundError:
            raise object_missing(digest) from None
        self._immutable(digest)
        return short

    def _id_clash(self, digest: bytes, short: str, dst: bytes) -> str:
        """`dst` names another inode: a stale name of this object (same bytes, e.g. after gc)
        is replaced; another object sharing the 80-bit prefix gets a longer id, kept in LMDB."""
        fd = os.open(dst, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            same = hash_fd(fd)[0] == digest
        finally:
            os.close(fd)
        if same:
            tmp = dst + b".%d.tmp" % os.getpid()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            os.link(self.store.object_path_b(digest), tmp, follow_symlinks=False)
            try:
                os.rename(tmp, dst)
            except PermissionError:
                if not self.protect:
                    raise
                fsflags.set_immutable(os.fsdecode(dst), False)
                os.rename(tmp, dst)
            self._immutable(digest)
            return short
        full = digest.hex()
        for n in range(_ID_HEX + 1, len(full) + 1):
            candidate = full[:n]
            if candidate == short:
                continue
            path = short_id_path(self.store, candidate)
            if os.path.lexists(path):
                st, ob = os.lstat(path), os.lstat(self.store.object_path_b(digest))
                if st.st_ino != ob.st_ino:
                    continue
            with self.m.write() as wtxn:
                wtxn.put(digest, candidate.encode(), db=self.m.ids)
            return self._link_id(digest, candidate)
        raise VeloError(f"no free short id for {full}", reason=Reason.OBJECT_CORRUPT)

    # -- proxies (links form)
    def proxy(self, digest: bytes, mode: int, *, bump: bool = False) -> bytes:
        key = (digest, mode)
        cur = self.proxies.get(key)
        index = 0 if cur is None else cur[1] + (1 if bump else 0)
        if cur is not None and not bump:
            return cur[0]
        hexname = digest.hex()
        pdir = self.proxies_b + b"/" + hexname[:2].encode()
        if pdir not in self.made_dirs:
            os.makedirs(pdir, 0o755, exist_ok=True)
            self.made_dirs.add(pdir)
        name = f"{hexname}-{mode:04o}" + (f"-{index}" if index else "")
        path = pdir + b"/" + name.encode()
        if not os.path.lexists(path):
            tmp = path + b".%d.%s" % (os.getpid(), os.urandom(3).hex().encode())
            src = self.store.object_path_b(digest)
            try:
                linking.clone_or_copy(os.fsdecode(src), os.fsdecode(tmp), mode=mode)
            except FileNotFoundError:
                raise object_missing(digest) from None
            os.utime(tmp, ns=(PROXY_MTIME_NS, PROXY_MTIME_NS))
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass
            os.unlink(tmp)
            self._immutable(digest)
        self.proxies[key] = (path, index)
        return path

    def link_proxy(self, digest: bytes, mode: int, name: bytes, dfd: int) -> None:
        path = self.proxy(digest, mode)
        for _ in range(64):
            try:
                os.link(path, name, dst_dir_fd=dfd, follow_symlinks=False)
                return
            except OSError as exc:
                if exc.errno != errno.EMLINK:
                    raise
                path = self.proxy(digest, mode, bump=True)
        raise SysError(errno.EMLINK, "link", path)

    def tier1(self, digest: bytes) -> bytes:
        if self.form == "data-only" and not self.volatile:
            self.short_id(digest)  # name it before +i so a later Tier-2 use needs no clearing
        else:
            if not self.store.has(digest):
                raise object_missing(digest)
            self._immutable(digest)
        return self.store.object_path_b(digest)


# --- writing entries ---------------------------------------------------------------------------
class _Writer:
    """Writes manifest entries into a layer directory (either form)."""

    def __init__(self, objs: _Objects, form: str, *, bottom: bool = True) -> None:
        self.objs = objs
        self.form = form
        # Without metacopy=on (impossible with userxattr) overlayfs honours a metacopy file only
        # in the bottom-most regular lower layer: in any layer above it, lookup is EPERM
        # ("refusing to follow metacopy origin", measured). Delta layers carry copies instead.
        self.metacopy = form == "data-only" and bottom
        self.whiteout_mknod = True
        self.entries = 0
        self.copied = 0

    def put(self, dfd: int, e: Entry) -> None:
        name = e.name
        self.entries += 1
        faults.point("lower.build")
        if e.kind is Kind.SYMLINK:
            os.symlink(e.target, name, dir_fd=dfd)
            os.utime(name, ns=(e.mtime_ns, e.mtime_ns), dir_fd=dfd, follow_symlinks=False)
        elif e.kind is Kind.FILE:
            if e.tier == 1:
                os.symlink(self.objs.tier1(e.digest), name, dir_fd=dfd)
                os.utime(name, ns=(e.mtime_ns, e.mtime_ns), dir_fd=dfd, follow_symlinks=False)
            elif self.form == "links":
                self.objs.link_proxy(e.digest, e.mode, name, dfd)
            elif self.metacopy or not e.size:
                self._metacopy(dfd, e)
            else:
                self.copy(dfd, e)
        # DIR entries are created by the caller (it needs the fd); MASK: nothing to show.

    def copy(self, dfd: int, e: Entry) -> None:
        """A private copy (reflink where possible) with the entry's mode and mtime.

        Used for Tier-2 files in data-only delta layers (see `metacopy` above).
        """
        self.copied += e.size
        dst = b"/proc/self/fd/%d/%s" % (dfd, e.name)
        linking.clone_or_copy(
            os.fsdecode(self.objs.store.object_path_b(e.digest)), os.fsdecode(dst), mode=e.mode
        )
        os.utime(dst, ns=(e.mtime_ns, e.mtime_ns), follow_symlinks=False)

    def _metacopy(self, dfd: int, e: Entry) -> None:
        fd = os.open(e.name, _NEWFILE, e.mode & 0o777, dir_fd=dfd)
        try:
            if e.size:
                redirect = self.objs.redirect(e.digest)
                os.ftruncate(fd, e.size)  # sparse: stat shows the real size, no blocks used
                os.setxattr(fd, _XATTR_METACOPY, b"")
                os.setxattr(fd, _XATTR_REDIRECT, redirect)
            if e.mode & 0o7000:
                os.fchmod(fd, e.mode)
            os.utime(fd, ns=(e.mtime_ns, e.mtime_ns))
        finally:
            os.close(fd)

    def whiteout(self, dfd: int, name: bytes, marked: set[int]) -> None:
        if self.whiteout_mknod:
            try:
                os.mknod(name, stat.S_IFCHR | 0o000, os.makedev(0, 0), dir_fd=dfd)
                return
            except PermissionError:
                self.whiteout_mknod = False
        fd = os.open(name, _NEWFILE, 0o000, dir_fd=dfd)
        try:
            os.setxattr(fd, _XATTR_WHITEOUT, b"")
        finally:
            os.close(fd)
        if dfd not in marked:
            # overlayfs looks for xattr whiteouts only in directories marked "x" (6.7+).
            with contextlib.suppress(OSError):
                if os.getxattr(dfd, _XATTR_OPAQUE) == b"y":
                    marked.add(dfd)
                    return
            os.setxattr(dfd, _XATTR_OPAQUE, b"x")
            marked.add(dfd)


class _DirMeta(Record):
    path: bytes  # relative to the layer's top
    mode: int
    mtime_ns: int


_MAX_OPEN_DIRS = 64


class _Build(Record):
    """An open layer under construction. Directories are addressed by path and their fds kept
    in a small LRU: a tree may have more directories than RLIMIT_NOFILE allows open at once."""

    path: Path
    top_fd: int
    dirs: list[_DirMeta] = field(default_factory=list)
    known: set[bytes] = field(default_factory=lambda: {b""})
    xmarked: set[int] = field(default_factory=set)
    _fds: OrderedDict[bytes, int] = field(default_factory=OrderedDict)

    def fd(self, rel: bytes) -> int:
        """An fd of the layer directory `rel`; valid until the next call that opens another."""
        if not rel:
            return self.top_fd
        fd = self._fds.get(rel)
        if fd is not None:
            self._fds.move_to_end(rel)
            return fd
        # Every component is a directory this build created: no symlink can be on the way.
        fd = os.open(rel, _DIRFLAGS, dir_fd=self.top_fd)
        self._fds[rel] = fd
        if len(self._fds) > _MAX_OPEN_DIRS:
            os.close(self._fds.popitem(last=False)[1])
        return fd

    def mkdir(self, rel: bytes, mode: int, mtime_ns: int) -> None:
        parent, _, leaf = rel.rpartition(b"/")
        os.mkdir(leaf, 0o700, dir_fd=self.fd(parent))
        self.dirs.append(_DirMeta(rel, mode, mtime_ns))
        self.known.add(rel)

    def close(self) -> None:
        for fd in self._fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()
        with contextlib.suppress(OSError):
            os.close(self.top_fd)

    def finish(self) -> None:
        """Directory modes and mtimes last, deepest first (children change a dir's mtime)."""
        for d in reversed(self.dirs):
            fd = self.fd(d.path)
            os.utime(fd, ns=(d.mtime_ns, d.mtime_ns))
            os.fchmod(fd, d.mode)


def _plan_subtree(
    m: Manifests, txn: Txn, b: _Build, node: Node, rel: bytes
) -> list[tuple[bytes, list[Entry]]]:
    """Make every directory below `rel` in the layer; return each directory's other entries."""
    jobs: list[tuple[bytes, list[Entry]]] = []
    stack: list[tuple[bytes, Node]] = [(rel, node)]
    while stack:
        where, n = stack.pop()
        files = []
        for e in n.entries:
            if e.kind is Kind.DIR:
                child = m.get_node(txn, e.digest)
                p = paths.join(where, e.name)
                b.mkdir(p, child.mode, child.mtime_ns)
                stack.append((p, child))
            elif e.kind is not Kind.MASK:
                files.append(e)
        if files:
            jobs.append((where, files))
    return jobs


def _fill(w: _Writer, b: _Build, jobs: list[tuple[bytes, list[Entry]]]) -> None:
    for rel, files in jobs:
        dfd = b.fd(rel)
        for e in files:
            w.put(dfd, e)


def _new_build(home: _Home, name: str) -> _Build:
    tmpdir = home.sub("tmp")
    tmpdir.mkdir(parents=True, exist_ok=True)
    path = tmpdir / f"{name}.{os.getpid()}.{os.urandom(4).hex()}"
    os.mkdir(path, 0o700)
    fd = os.open(path, _DIRFLAGS)
    return _Build(path, fd)


# A per-boot layer with at least this many entries is filled by worker processes (one per CPU,
# VELO_JOBS): its files need no LMDB access, and inode creation plus +i scale with cores.
PARALLEL_MIN_ENTRIES = 4000
# What the workers fill: set before they are forked, inherited (copy-on-write), never pickled.
_SHARES: list[list[tuple[bytes, list[Entry]]]] = []
_SHARE_CTX: list[tuple[str, _Objects, str]] = []


def _fill_share(k: int) -> tuple[int, list[str]]:
    """In a worker: write share `k` of the layer; (entries written, +i failures)."""
    layer, objs, form = _SHARE_CTX[0]
    objs.protected = set()
    objs.protect_failed = []
    w = _Writer(objs, form)
    top = os.open(layer, _DIRFLAGS)
    try:
        for rel, entries in _SHARES[k]:
            dfd = os.open(rel, _DIRFLAGS, dir_fd=top) if rel else top
            try:
                for e in entries:
                    w.put(dfd, e)
            finally:
                if dfd != top:
                    os.close(dfd)
    finally:
        os.close(top)
    return w.entries, objs.protect_failed


def _fill_parallel(
    b: _Build, objs: _Objects, form: str, jobs: list[tuple[bytes, list[Entry]]], n: int
) -> None:
    shares: list[list[tuple[bytes, list[Entry]]]] = [[] for _ in range(n)]
    load = [0] * n
    for job in sorted(jobs, key=lambda j: -len(j[1])):  # biggest first, onto the lightest
        k = load.index(min(load))
        shares[k].append(job)
        load[k] += len(job[1])
    _SHARES[:] = shares
    _SHARE_CTX[:] = [(os.fspath(b.path), objs, form)]
    from .workers import Workers

    try:
        with Workers(n) as pool:
            for _count, failed in pool.map_unordered(_fill_share, range(n)):
                objs.protect_failed.extend(failed[: max(0, 5 - len(objs.protect_failed))])
    finally:
        _SHARES.clear()
        _SHARE_CTX.clear()


def _full_layer(
    home: _Home, m: Manifests, txn: Txn, objs: _Objects, form: str, root: bytes, name: str
) -> Path:
    w = _Writer(objs, form)
    b = _new_build(home, name)
    old_umask = os.umask(0)
    try:
        top = m.get_node(txn, root)
        b.dirs.append(_DirMeta(b"", top.mode, top.mtime_ns))
        jobs = _plan_subtree(m, txn, b, top, b"")
        entries = sum(len(f) for _r, f in jobs)
        if home.volatile:
            _check_room(home, entries + len(b.dirs))
        from .workers import default_jobs

        n = default_jobs()
        if home.volatile and n > 1 and entries >= PARALLEL_MIN_ENTRIES:
            _fill_parallel(b, objs, form, jobs, n)
        else:
            _fill(w, b, jobs)
        b.finish()
    except BaseException:
        b.close()
        force_rmtree(b.path)
        raise
    finally:
        os.umask(old_umask)
    b.close()
    return b.path


def _delta_layer(
    home: _Home,
    m: Manifests,
    txn: Txn,
    objs: _Objects,
    form: str,
    base: bytes,
    root: bytes,
    ops: Sequence[Op],
    name: str,
) -> Path:
    """A layer that turns the view of `base` into the view of `root` when stacked on top."""
    w = _Writer(objs, form, bottom=False)
    b = _new_build(home, name)
    old_umask = os.umask(0)
    try:
        top = m.get_node(txn, root)
        b.dirs.append(_DirMeta(b"", top.mode, top.mtime_ns))

        def ensure_dir(path: bytes) -> int:
            """The directory `path` in the layer (non-opaque: merges with the layers below),
            created with every ancestor, carrying the new root's mode/mtime."""
            if path in b.known:
                return b.fd(path)
            parent, _, _leaf = path.rpartition(b"/")
            ensure_dir(parent)
            e = m.lookup(txn, root, path)
            if e is None or e.kind is not Kind.DIR:
                raise VeloError(
                    f"delta layer: {paths.display(path)} is not a directory in the new root",
                    reason=Reason.MANIFEST_CORRUPT,
                )
            node = m.get_node(txn, e.digest)
            b.mkdir(path, node.mode, node.mtime_ns)
            return b.fd(path)

        for op in sorted(ops, key=lambda o: o.path):
            if op.path == b"":
                continue  # the root's own mode/mtime: already taken from `root`
            parent, _, leaf = op.path.rpartition(b"/")
            new = m.lookup(txn, root, op.path)
            old = m.lookup(txn, base, op.path)
            visible_old = old is not None and old.kind is not Kind.MASK
            if op.kind is OpKind.META and new is not None and new.kind is Kind.DIR:
                ensure_dir(op.path)
                continue
            pfd = ensure_dir(parent)
            if new is None or new.kind is Kind.MASK:
                if visible_old:
                    w.whiteout(pfd, leaf, b.xmarked)
                continue
            if new.kind is Kind.DIR:
                node = m.get_node(txn, new.digest)
                b.mkdir(op.path, node.mode, node.mtime_ns)
                if visible_old:  # hide what the base had there
                    os.setxattr(b.fd(op.path), _XATTR_OPAQUE, b"y")
                _fill(w, b, _plan_subtree(m, txn, b, node, op.path))
            else:
                w.put(pfd, new)
        b.finish()
    except BaseException:
        b.close()
        force_rmtree(b.path)
        raise
    finally:
        os.umask(old_umask)
    b.close()
    return b.path


def _copy_bytes(m: Manifests, txn: Txn, root: bytes, ops: Sequence[Op]) -> int:
    """Bytes a data-only delta layer would copy for `ops` (Tier-2 file contents)."""
    total = 0
    for op in ops:
        if op.kind is OpKind.DELETE:
            continue
        e = m.lookup(txn, root, op.path)
        if e is None:
            continue
        if e.kind is Kind.DIR:
            if op.kind is OpKind.PUT:
                for _p, sub, _n in m.walk(txn, e.digest):
                    if sub.kind is Kind.FILE and sub.tier != 1:
                        total += sub.size
        elif e.kind is Kind.FILE and e.tier != 1:
            total += e.size
        if total > DELTA_MAX_COPY:
            break
    return total


# --- stacks ------------------------------------------------------------------------------------
def _stack_path(home: _Home, form: str, root: bytes) -> Path:
    return home.sub("stacks", f"{form}-{root.hex()}.json")


def _read_stack(home: _Home, form: str, root: bytes) -> tuple[list[str], bool] | None:
    """(layer names top first, whether every object they reference is +i) or None."""
    try:
        data = json.loads(_stack_path(home, form, root).read_text())
    except (FileNotFoundError, ValueError):
        return None
    layers = data.get("layers")
    if not isinstance(layers, list) or not layers:
        return None
    base = home.sub("layers")
    if not all(isinstance(n, str) and (base / n).is_dir() for n in layers):
        return None
    return [str(n) for n in layers], data.get("immutable") is True


def _write_stack(
    home: _Home, form: str, root: bytes, layers: list[str], built: str, immutable: bool
) -> None:
    _write_json_atomic(
        _stack_path(home, form, root),
        {
            "form": form,
            "root": root.hex(),
            "layers": layers,
            "built": built,
            "immutable": immutable,
        },
    )


def _protect_all(store: Store, m: Manifests, root: bytes, form: str, home: _Home) -> list[str]:
    """+i on every object `root` references (a stack built without it, now used by root)."""
    with m.read() as txn:
        objects: set[bytes] = set()
        m.reachable(txn, root, set(), objects)
        objs = _Objects(store, m, txn, protect=True, form=form, volatile=home.volatile)
        for d in sorted(objects):
            if form == "data-only" and not home.volatile:
                objs.short_id(d)
            else:
                objs._immutable(d)
    return objs.protect_failed


def _publish_layer(home: _Home, built: Path, name: str) -> Path:
    final = home.sub("layers", name)
    final.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(built, final)
    except OSError as exc:
        if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
            raise
        force_rmtree(built)  # built by an earlier, interrupted run: identical content
    return final


def _clean_tmp(home: _Home, name: str) -> None:
    """Remove half-built layers of `name` (we hold its lock, so their builders are dead)."""
    tmpdir = home.sub("tmp")
    with contextlib.suppress(FileNotFoundError):
        for entry in os.listdir(tmpdir):
            if entry.startswith(name + "."):
                force_rmtree(tmpdir / entry)


def ensure_lowers(
    store: Store,
    m: Manifests,
    root: bytes,
    *,
    form: str,
    protect: bool,
    hints: Iterable[bytes] = (),
) -> Lowers:
    """The layers projecting `root` in `form`, building what is missing (locked, crash-safe).

    `hints` are roots whose layers may already exist (e.g. the ref's earlier commits, newest
    first): the first one cached is used as the base of a delta layer. Data-only layers are
    built in the per-boot directory (`volatile.py`) when there is one that holds user xattrs,
    else in the store; a stack already in the store is used as it is.
    """
    if form not in FORMS:
        raise VeloError(f"unknown lower form {form!r}", reason=Reason.USAGE)
    t0 = time.perf_counter()
    disk = _disk_home(store)
    fast = _volatile_home(store) if form == "data-only" else None
    homes = [fast, disk] if fast is not None else [disk]
    key = f"{form}-{root.hex()}"
    failed: list[str] = []
    warning = ""
    built = "cached"
    found = next(((h, c) for h in homes if (c := _read_stack(h, form, root)) is not None), None)
    if found is None or (protect and not found[1][1]):
        home = found[0] if found is not None else homes[0]
        with _flock(home.sub("locks", key + ".lock")):
            cached = _read_stack(home, form, root)  # another session may have built it
            if cached is None and home.volatile and not _holds_xattrs(home):
                home = disk  # e.g. tmpfs before Linux 6.6: keep the layers in the store
                cached = _read_stack(home, form, root)
            if cached is None:
                result: tuple[list[str], str, bool, list[str]] | None
                try:
                    result = _build(store, home, m, root, form, protect, hints)
                except (_TooBig, OSError) as exc:
                    if not home.volatile or (isinstance(exc, OSError) and exc.errno not in _FULL):
                        raise
                    warning = _fallback_note(home, exc)
                    home, result = disk, None
                if result is None:  # the per-boot cache could not take it: in the store
                    with _flock(home.sub("locks", key + ".lock")):
                        cached = _read_stack(home, form, root)
                        if cached is None:
                            result = _build(store, home, m, root, form, protect, hints)
                if result is not None:
                    layers, built, immutable, failed = result
                    _write_stack(home, form, root, layers, built, immutable)
                    cached = layers, immutable
            elif protect and not cached[1]:
                failed = _protect_all(store, m, root, form, home)
                cached = cached[0], not failed
                _write_stack(home, form, root, cached[0], "upgraded", cached[1])
            assert cached is not None  # built, or found by the store fallback
            found = home, cached
    home, (names, immutable) = found
    if form == "data-only" and not home.volatile:
        ids_dir(store).mkdir(exist_ok=True)
    return Lowers(
        form,
        root,
        tuple(os.fspath(home.sub("layers", n)) for n in names),
        _data_layers(store, home, form),
        built,
        time.perf_counter() - t0,
        protect and immutable,
        _note(protect, failed, form),
        os.fspath(home.root),
        warning,
    )


_FULL = (errno.ENOSPC, errno.EDQUOT, errno.ENOMEM)
# Kernel memory a per-boot layer takes per entry (measured: ~1.3 KB, bench/bench_session.py), and
# the share of available memory one layer may take before it is built in the store instead.
_BYTES_PER_ENTRY = 1400
_MEMORY_SHARE = 0.25


def _fallback_note(home: _Home, exc: BaseException) -> str:
    if isinstance(exc, OSError):
        code = errno.errorcode.get(exc.errno or 0, "?")
        return f"the per-boot layer cache {home.root} is full ({code}): layers built in the store"
    return f"{exc}: layers built in the store"


class _TooBig(Exception):
    """A layer that would take too much of the machine's memory in the per-boot cache."""


def _check_room(home: _Home, entries: int) -> None:
    """Raise _TooBig when `entries` would take more than a quarter of MemAvailable."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            avail = next(
                int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")
            )
    except (OSError, StopIteration, ValueError):
        return
    need = entries * _BYTES_PER_ENTRY
    if need > avail * _MEMORY_SHARE:
        raise _TooBig(
            f"{entries} entries would take ~{need >> 20} MiB of the per-boot layer cache "
            f"{home.root} (more than a quarter of the {avail >> 20} MiB available)"
        )


def _holds_xattrs(home: _Home) -> bool:
    """Can the cache's filesystem hold user xattrs (tmpfs: since Linux 6.6)? Tried on the
    directory itself: no probe module, no temp file (this runs on every build there)."""
    try:
        os.setxattr(home.root, "user.velo.probe", b"1")
        os.removexattr(home.root, "user.velo.probe")
        return True
    except OSError:
        return False


def _build(
    store: Store,
    home: _Home,
    m: Manifests,
    root: bytes,
    form: str,
    protect: bool,
    hints: Iterable[bytes],
) -> tuple[list[str], str, bool, list[str]]:
    """Build what projects `root` in `home` (caller holds its lock): (layers, built,
    immutable, failed). A delta is only stacked on a base in the same home."""
    key = f"{form}-{root.hex()}"
    _clean_tmp(home, key)
    if home.volatile:  # at each build: drop the layers of stores deleted since
        from . import volatile

        volatile.reap_orphans(home.root)
    with m.read() as txn:
        objs = _Objects(store, m, txn, protect=protect, form=form, volatile=home.volatile)
        base: tuple[list[str], bool] | None = None
        base_root = b""
        for h in hints:
            if h != root and (found := _read_stack(home, form, h)) is not None:
                base, base_root = found, h
                break
        ops: list[Op] | None = None
        if base is not None and len(base[0]) < FLATTEN_AFTER:
            ops = m.diff(txn, base_root, root)
            if len(ops) > DELTA_MAX_OPS:
                ops = None
            elif form == "data-only" and _copy_bytes(m, txn, root, ops) > DELTA_MAX_COPY:
                ops = None  # cheaper to write a new metadata layer than to copy the data
        if base is not None and ops is not None:
            name = f"{key}-on-{base_root.hex()[:16]}"
            _clean_tmp(home, name)
            path = _delta_layer(home, m, txn, objs, form, base_root, root, ops, name)
            _publish_layer(home, path, name)
            immutable = protect and base[1] and not objs.protect_failed
            return [name, *base[0]], "delta", immutable, objs.protect_failed
        path = _full_layer(home, m, txn, objs, form, root, key)
        _publish_layer(home, path, key)
        return [key], "full", protect and not objs.protect_failed, objs.protect_failed


def _note(protect: bool, failed: list[str], form: str) -> str:
    if not protect:
        return "objects are not immutable (chattr +i needs real root)"
    if failed:
        return "chattr +i failed for some objects: " + "; ".join(failed)
    return "every object referenced is immutable (chattr +i)"


def name_and_protect(store: Store, m: Manifests, digests: Iterable[bytes]) -> list[str]:
    """Give new objects (e.g. just harvested) their short names, then +i (root only).

    Done at once rather than at the next lower build so that, when root, no object of the
    store stays mutable in between (P0-a). Returns what failed (empty when all went well).
    """
    ids_dir(store).mkdir(exist_ok=True)
    with m.read() as txn:
        objs = _Objects(store, m, txn, protect=True, form="data-only")
        for d in digests:
            objs.short_id(d)
    return objs.protect_failed


def prune(store: Store, keep: set[bytes]) -> int:
    """Evict cached layers: stacks of roots not in `keep`, layers no stack uses, proxies no
    layer links — in the store and in this user's per-boot cache for it. For `gc`, which holds
    the store lock exclusively (no session can be starting); a running session keeps its layers
    mounted whatever happens to their names. Returns the number of layers removed."""
    homes = [_disk_home(store)]
    if (fast := _volatile_home(store)) is not None:
        homes.append(fast)
    removed = sum(_prune_home(home, keep) for home in homes)
    with contextlib.suppress(FileNotFoundError):
        for shard in os.scandir(_trees(store, "proxies")):
            for proxy in os.scandir(shard.path):
                if proxy.stat(follow_symlinks=False).st_nlink == 1:
                    os.unlink(proxy.path)
    return removed


def _prune_home(home: _Home, keep: set[bytes]) -> int:
    stacks, layers = home.sub("stacks"), home.sub("layers")
    used: set[str] = set()
    with contextlib.suppress(FileNotFoundError):
        for name in os.listdir(stacks):
            path = stacks / name
            try:
                data = json.loads(path.read_text())
                root = bytes.fromhex(data["root"])
            except (OSError, ValueError, KeyError):
                continue
            if root in keep:
                used.update(str(n) for n in data.get("layers", []))
            else:
                path.unlink()
    removed = 0
    with contextlib.suppress(FileNotFoundError):
        for name in os.listdir(layers):
            if name not in used:
                force_rmtree(layers / name)
                removed += 1
    return removed


# --- stacked refs ------------------------------------------------------------------------------
def stack_roots(m: Manifests, txn: Txn, roots: Sequence[bytes]) -> bytes:
    """The view of refs stacked bottom to top (later wins, MASK hides what is below).

    Writes the merged directory nodes (content-addressed, so harmless to add) and returns the
    merged root. One root is returned as is. Needs a write transaction.
    """
    if not roots:
        raise VeloError("no roots to stack", reason=Reason.USAGE)
    merged = roots[0]
    for upper in roots[1:]:
        merged = _overlay_nodes(m, txn, merged, upper)
    return merged


def _overlay_nodes(m: Manifests, txn: Txn, lower: bytes, upper: bytes) -> bytes:
    lo, up = m.get_node(txn, lower), m.get_node(txn, upper)
    entries = lo.as_dict()
    for e in up.entries:
        below = entries.get(e.name)
        if e.kind is Kind.MASK:
            entries.pop(e.name, None)
        elif e.kind is Kind.DIR and below is not None and below.kind is Kind.DIR:
            entries[e.name] = Entry(
                e.name, Kind.DIR, digest=_overlay_nodes(m, txn, below.digest, e.digest)
            )
        else:
            entries[e.name] = e
    return m.put_node(txn, up.mode, up.mtime_ns, entries.values())
