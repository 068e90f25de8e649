"""Writing layers: full metadata/proxy-link layers and delta layers over a cached base."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

from veloverlay import _libc, faults, paths
from veloverlay.errors import Reason, VeloError
from veloverlay.files import DIRFLAGS, NEWFILE, force_rmtree, makedirs
from veloverlay.lower.homes import Home, check_room
from veloverlay.lower.objects import Objects, verified_copy
from veloverlay.progress import Progress
from veloverlay.records import Record, field
from veloverlay.store.cas import object_corrupt, object_missing
from veloverlay.store.dirstack import open_dirs_max
from veloverlay.store.manifest import Manifests, Txn
from veloverlay.store.tree import Entry, Kind, Node, Op, OpKind
from veloverlay.store.tree import extent as tree_extent

__all__ = [
    "XATTR_PREFIXES",
    "full_layer",
    "delta_layer",
    "copy_bytes",
    "publish_layer",
    "clean_tmp",
]


FORMS = ("data-only", "links")
# A delta with more operations than this is cheaper to build whole (a layer per op would be big).
DELTA_MAX_OPS = 20_000
# Data-only delta layers copy the changed files' bytes (see _Writer); above this, rebuild.
DELTA_MAX_COPY = 256 << 20
# Overlay markers (metacopy/redirect, opaque, xattr whiteouts) carry the prefix of the mount that
# reads them: `user` for userxattr mounts (user namespaces), `trusted` for root-native ones.
XATTR_PREFIXES = ("user", "trusted")


def _x(prefix: str, name: str) -> str:
    return f"{prefix}.overlay.{name}"


# --- writing entries ---------------------------------------------------------------------------
class _Writer:
    """Writes manifest entries into a layer directory (either form)."""

    def __init__(
        self, objs: Objects, form: str, *, bottom: bool = True, prefix: str = "user"
    ) -> None:
        self.objs = objs
        self.form = form
        self.prefix = prefix
        # Without metacopy=on (impossible with userxattr) overlayfs honours a metacopy file only
        # in the bottom-most regular lower layer: in any layer above it, lookup is EPERM
        # ("refusing to follow metacopy origin", measured). Delta layers carry copies instead.
        self.metacopy = form == "data-only" and bottom
        self.whiteout_mknod = True
        self.dac_override = os.geteuid() == 0
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

        Used for Tier-2 files in data-only delta layers (see `metacopy` above). The copy is
        hashed before it is kept: a cached layer outlives the object it was made from (a damaged
        object set aside and fetched again), so a copy of damaged bytes would go on showing them
        to every later session until fsck looked. The copy is read, not the object: what is
        checked is what sessions will read. Measured (200 x 1 MiB changed files, store on ext4,
        per-boot cache on tmpfs, medians of 9): the cold delta build took 0.13 s without the
        hash, 0.37-0.45 s with it (one thread: a session's manager must stay single-threaded);
        raw BLAKE3 of 200 MiB is 0.12 s here. Bounded by DELTA_MAX_COPY, paid once per version.
        """
        self.copied += e.size
        self._check_size(e)
        dst = b"/proc/self/fd/%d/%s" % (dfd, e.name)
        verified_copy(self.objs.store, e.digest, dst, e.mode)
        os.utime(dst, ns=(e.mtime_ns, e.mtime_ns), follow_symlinks=False)

    def _check_size(self, e: Entry) -> None:
        """The entry's size is its object's: a metadata file claiming more would make the
        kernel's copy-up write that much (zeros past the object's end) into the session.

        The same statx tells whether the object is +i already (root's are, from publish): then
        protecting it later costs no open and ioctl."""
        try:
            have, immutable = _libc.statx_size_immutable(self.objs.store.object_path_b(e.digest))
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                raise object_missing(e.digest) from None
            raise
        if have != e.size:
            raise object_corrupt(e.digest, f"it is {have} bytes, its manifest entry says {e.size}")
        if immutable:
            self.objs.protected.add(e.digest)

    def _metacopy(self, dfd: int, e: Entry) -> None:
        # Created writable by its owner, xattrs set, then the entry's mode: without
        # CAP_DAC_OVERRIDE (root-free), setxattr on a 0444 file is EACCES, and every git
        # repository has 0444 files.
        # With CAP_DAC_OVERRIDE the file is created with its mode at once (one fchmod fewer per
        # file), unless the mode has setid/sticky bits (fchmod sets those exactly).
        direct = self.dac_override and not e.mode & 0o7000
        fd = os.open(e.name, NEWFILE, e.mode if direct else 0o600, dir_fd=dfd)
        try:
            if e.size:
                self._check_size(e)
                redirect = self.objs.redirect(e.digest)
                os.ftruncate(fd, e.size)  # sparse: stat shows the real size, no blocks used
                try:
                    os.setxattr(fd, _x(self.prefix, "metacopy"), b"")
                except PermissionError:
                    if not direct:
                        raise
                    direct = self.dac_override = False  # e.g. root in a user namespace
                    os.fchmod(fd, 0o600)
                    os.setxattr(fd, _x(self.prefix, "metacopy"), b"")
                os.setxattr(fd, _x(self.prefix, "redirect"), redirect)
            if not direct:
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
        fd = os.open(name, NEWFILE, 0o600, dir_fd=dfd)  # writable for setxattr (see above)
        try:
            os.setxattr(fd, _x(self.prefix, "whiteout"), b"")
            os.fchmod(fd, 0o000)
        finally:
            os.close(fd)
        if dfd not in marked:
            # overlayfs looks for xattr whiteouts only in directories marked "x" (6.7+).
            with contextlib.suppress(OSError):
                if os.getxattr(dfd, _x(self.prefix, "opaque")) == b"y":
                    marked.add(dfd)
                    return
            os.setxattr(dfd, _x(self.prefix, "opaque"), b"x")
            marked.add(dfd)


class _DirMeta(Record):
    path: bytes  # relative to the layer's top
    mode: int
    mtime_ns: int


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
        try:
            fd = os.open(rel, DIRFLAGS, dir_fd=self.top_fd)
        except OSError as exc:
            if exc.errno != errno.EMFILE or not self._fds:
                raise
            # A low `ulimit -n` (or descriptors the caller holds): the cached ones are only
            # a speed-up, each valid until this call; give them back and open this one alone.
            self._drop_cached()
            fd = os.open(rel, DIRFLAGS, dir_fd=self.top_fd)
        self._fds[rel] = fd
        if len(self._fds) > open_dirs_max():  # (a low `ulimit -n`: a quarter of it)
            os.close(self._fds.popitem(last=False)[1])
        return fd

    def _drop_cached(self) -> None:
        for fd in self._fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()

    def mkdir(self, rel: bytes, mode: int, mtime_ns: int) -> None:
        parent, _, leaf = rel.rpartition(b"/")
        os.mkdir(leaf, 0o700, dir_fd=self.fd(parent))
        self.dirs.append(_DirMeta(rel, mode, mtime_ns))
        self.known.add(rel)

    def close(self) -> None:
        self._drop_cached()
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


def _fill(
    w: _Writer, b: _Build, jobs: list[tuple[bytes, list[Entry]]], progress: Progress | None
) -> None:
    total, done = sum(len(f) for _r, f in jobs), 0
    for rel, files in jobs:
        dfd = b.fd(rel)
        for e in files:
            w.put(dfd, e)
        done += len(files)
        if progress is not None:
            progress(done, total)


def _new_build(home: Home, name: str) -> _Build:
    tmpdir = home.sub("tmp")
    makedirs(tmpdir)
    path = tmpdir / f"{name}.{os.getpid()}.{os.urandom(4).hex()}"
    os.mkdir(path, 0o700)
    fd = os.open(path, DIRFLAGS)
    return _Build(path, fd)


# A per-boot layer with at least this many entries is filled by worker processes (one per CPU,
# VELO_JOBS): its files need no LMDB access, and inode creation plus +i scale with cores.
PARALLEL_MIN_ENTRIES = 4000
# What the workers fill: set before they are forked, inherited (copy-on-write), never pickled.
_SHARES: list[list[tuple[bytes, list[Entry]]]] = []
_SHARE_CTX: list[tuple[str, Objects, str, str]] = []


def _fill_share(k: int) -> tuple[int, list[str]]:
    """In a worker: write share `k` of the layer; (entries written, +i failures)."""
    layer, objs, form, prefix = _SHARE_CTX[0]
    objs.protected = set()
    objs.protect_failed = []
    w = _Writer(objs, form, prefix=prefix)
    top = os.open(layer, DIRFLAGS)
    try:
        for rel, entries in _SHARES[k]:
            dfd = os.open(rel, DIRFLAGS, dir_fd=top) if rel else top
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
    b: _Build,
    objs: Objects,
    form: str,
    jobs: list[tuple[bytes, list[Entry]]],
    n: int,
    prefix: str,
    progress: Progress | None = None,
) -> None:
    # With a progress callback, 8 shares a worker, so that it hears back as the build goes.
    k_shares = n * 8 if progress is not None else n
    shares: list[list[tuple[bytes, list[Entry]]]] = [[] for _ in range(k_shares)]
    load = [0] * k_shares
    for job in sorted(jobs, key=lambda j: -len(j[1])):  # biggest first, onto the lightest
        k = load.index(min(load))
        shares[k].append(job)
        load[k] += len(job[1])
    _SHARES[:] = shares
    _SHARE_CTX[:] = [(os.fspath(b.path), objs, form, prefix)]
    from veloverlay.workers import Workers

    try:
        total, done = sum(load), 0
        with Workers(n) as pool:
            for count, failed in pool.map_unordered(_fill_share, range(k_shares)):
                objs.protect_failed.extend(failed[: max(0, 5 - len(objs.protect_failed))])
                done += count
                if progress is not None:
                    progress(min(done, total), total)
    finally:
        _SHARES.clear()
        _SHARE_CTX.clear()


def full_layer(
    home: Home,
    m: Manifests,
    txn: Txn,
    objs: Objects,
    form: str,
    root: bytes,
    name: str,
    progress: Progress | None = None,
    *,
    xattr: str = "user",
) -> Path:
    # A tree beyond the depth bound (a store made before it existed) is refused before anything
    # is built: its paths could not be opened under the projection anyway.
    depth, length, _entries = tree_extent(root, lambda d: m.get_node(txn, d))
    paths.check_extent(depth, length)
    w = _Writer(objs, form, prefix=xattr)
    b = _new_build(home, name)
    old_umask = os.umask(0)
    try:
        top = m.get_node(txn, root)
        b.dirs.append(_DirMeta(b"", top.mode, top.mtime_ns))
        jobs = _plan_subtree(m, txn, b, top, b"")
        entries = sum(len(f) for _r, f in jobs)
        if home.volatile:
            check_room(home, entries + len(b.dirs))
        from veloverlay.workers import default_jobs

        n = default_jobs()
        if home.volatile and n > 1 and entries >= PARALLEL_MIN_ENTRIES:
            _fill_parallel(b, objs, form, jobs, n, xattr, progress)
        else:
            _fill(w, b, jobs, progress)
        b.finish()
    except BaseException:
        b.close()
        force_rmtree(b.path)
        raise
    finally:
        os.umask(old_umask)
    b.close()
    return b.path


def delta_layer(
    home: Home,
    m: Manifests,
    txn: Txn,
    objs: Objects,
    form: str,
    base: bytes,
    root: bytes,
    ops: Sequence[Op],
    name: str,
    *,
    xattr: str = "user",
) -> Path:
    """A layer that turns the view of `base` into the view of `root` when stacked on top."""
    w = _Writer(objs, form, bottom=False, prefix=xattr)
    b = _new_build(home, name)
    old_umask = os.umask(0)
    try:
        b.dirs.append(_DirMeta(b"", *m.node_attrs(txn, root)))

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
            b.mkdir(path, *m.node_attrs(txn, e.digest))
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
                    os.setxattr(b.fd(op.path), _x(xattr, "opaque"), b"y")
                _fill(w, b, _plan_subtree(m, txn, b, node, op.path), None)
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


def copy_bytes(m: Manifests, txn: Txn, root: bytes, ops: Sequence[Op]) -> int:
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


def publish_layer(home: Home, built: Path, name: str) -> str:
    """Rename the layer just built into `layers/` as `name`; returns the name it got.

    A layer already there under that name (no stack names it: its build was interrupted
    before the stack was written, or the stack was dropped) is never taken for this one: it
    may have been built by an older veloverlay, or changed by its owner since (the layers are
    plain files of the store's owner), and a session would mount it as this root's tree. The
    new build goes in under a name of its own (`name~<random>`), which is what its stack
    records; the old one is left for gc (a stack of another root may still name it, and a
    running session may have it mounted) and evicted once no stack names it. Nothing is
    hashed: the build was done anyway."""
    base = home.sub("layers")
    makedirs(base)
    try:
        _rename_dir(built, base / name)
        return name
    except OSError as exc:
        if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
            raise
    final = f"{name}~{os.urandom(6).hex()}"
    _rename_dir(built, base / final)
    return final


def _rename_dir(src: Path, dst: Path) -> None:
    """rename(2) of the directory `src` into another parent, which needs write permission on
    `src` itself (its ".." changes): a layer whose root carries a tree's mode without u+w (a Go
    module, a Nix store path: 0555) gets u+w for the rename, then its mode back."""
    try:
        os.rename(src, dst)
        return
    except PermissionError:
        mode = stat.S_IMODE(os.lstat(src).st_mode)
        if mode & stat.S_IWUSR:
            raise
    os.chmod(src, mode | stat.S_IWUSR)
    try:
        os.rename(src, dst)
    except BaseException:
        os.chmod(src, mode)
        raise
    os.chmod(dst, mode)


def clean_tmp(home: Home, name: str) -> None:
    """Remove half-built layers of `name` (we hold its lock, so their builders are dead)."""
    tmpdir = home.sub("tmp")
    with contextlib.suppress(FileNotFoundError):
        for entry in os.listdir(tmpdir):
            if entry.startswith(name + "."):
                force_rmtree(tmpdir / entry)
