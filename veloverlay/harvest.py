"""Harvest: turn a session's overlay upper directory into path operations against its view.

Walks the upper directory ONLY — never the projected tree — so the cost follows what the session
changed. The session is over when this runs (every process of it is dead), so reading is
close-to-open: nothing writes any more.

What the upper holds, and what it becomes:
* whiteout (0/0 char device, or a zero-size file with `user.overlay.whiteout`) -> DELETE
* directory marked `user.overlay.opaque=y` -> PUT of a directory built from the upper only
  (the kernel marks a directory made where a lower entry was deleted, e.g. an EXDEV rename or a
  file replaced by a directory); a new directory the same way; a copied-up directory is walked
  and gets META when its own mode/mtime changed
* regular file -> PUT (content staged into the store); a copy-up whose content equals the
  lower's (chmod, utime, an open for writing that wrote nothing, a metacopy copy-up) -> META only.
  In the links form a copied-up file still carries the proxy's normalised mtime
  (`projection.PROXY_MTIME_NS`); when its content did not change that mtime is not the user's
  and the manifest's is kept.
* symlink -> SYMLINK; a symlink into this store's objects (a Tier-1 entry a program copied, e.g.
  `cp -a`, npm) -> back to a FILE entry of that object
* hard links are two files (v1 does not model link identity); fifos, sockets and devices are
  skipped with a warning; setuid/setgid bits a session sets are removed (as ingest does unless
  asked), bits the manifest already had are kept.
Files and directories the harvester cannot read as created (mode 000, 0555 dirs for a non-root
owner) are chmod-ed to read them; the manifest records the mode they had.

Staged objects are published by the caller, before its LMDB write transaction; directory nodes
built here are returned as encodings (pure) and written by the caller in that transaction.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import stat
from collections.abc import Callable, Sequence

from . import faults, paths, tree
from .cas import Stage, Store
from .digest import hash_fd
from .manifest import Manifests, Txn
from .projection import PROXY_MTIME_NS
from .records import Record, field
from .tiers import Rules
from .tree import Entry, Kind, Node, Op, OpKind

__all__ = ["HarvestResult", "harvest_upper", "is_whiteout", "leaf_op", "other_leaf", "to_top_ref"]

_XATTR_OPAQUE = "user.overlay.opaque"
_XATTR_WHITEOUT = "user.overlay.whiteout"
_XATTR_METACOPY = "user.overlay.metacopy"
_DIRFLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_SETID = stat.S_ISUID | stat.S_ISGID
_OBJ_RE = re.compile(rb"^([0-9a-f]{2})/([0-9a-f]{2})/([0-9a-f]{64})$")


class StoreLinks:
    """A symlink into the store that a program copied (`cp -a`, npm) from a Tier-1 entry: the
    program meant to keep the file, so it is harvested back into a FILE entry of that object,
    with the mode the manifest records. Shared by the overlay harvester and the shim's daemon."""

    def __init__(self, store: Store) -> None:
        self.store = store
        prefixes = {os.fsencode(store.objects) + b"/"}
        with contextlib.suppress(OSError):
            prefixes.add(os.fsencode(os.path.realpath(store.objects)) + b"/")
        self.prefixes = tuple(prefixes)
        self._root: bytes | None = None
        self._modes: dict[bytes, int] = {}

    def object_of(self, target: bytes) -> bytes | None:
        """The digest of the stored object `target` names, or None."""
        for prefix in self.prefixes:
            if target.startswith(prefix):
                mt = _OBJ_RE.match(target[len(prefix) :])
                if mt and mt.group(1) == mt.group(3)[:2] and mt.group(2) == mt.group(3)[2:4]:
                    digest = bytes.fromhex(mt.group(3).decode())
                    if self.store.has(digest):
                        return digest
        return None

    def entry(
        self,
        m: Manifests,
        txn: Txn,
        root: bytes,
        name: bytes,
        target: bytes,
        mtime_ns: int,
        low: Entry | None,
        tier: Callable[[], int],
    ) -> Entry | None:
        """The FILE entry for a copied store symlink, or None for any other symlink."""
        digest = self.object_of(target)
        if digest is None:
            return None
        if low is not None and low.kind is Kind.FILE and low.digest == digest:
            return Entry(name, Kind.FILE, low.mode, low.size, mtime_ns, digest, b"", low.tier)
        size = os.stat(self.store.object_path_b(digest)).st_size
        return Entry(
            name, Kind.FILE, self._mode(m, txn, root, digest), size, mtime_ns, digest, b"", tier()
        )

    def _mode(self, m: Manifests, txn: Txn, root: bytes, digest: bytes) -> int:
        """The mode `root` records for the object (what `cp -a` of the file keeps). Built on
        first need by one walk of the root: copies of Tier-1 symlinks are rare."""
        if root != self._root:
            self._root = root
            self._modes = {}
            for _p, e, _n in m.walk(txn, root):
                if e.kind is Kind.FILE and e.tier == 1:
                    self._modes.setdefault(e.digest, e.mode)
        return self._modes.get(digest, 0o644)


class HarvestResult(Record):
    ops: list[Op] = field(default_factory=list)
    nodes: dict[bytes, bytes] = field(default_factory=dict)  # digest -> encoding
    files_read: int = 0
    bytes_read: int = 0
    warnings: list[str] = field(default_factory=list)
    stripped_setid: int = 0


def leaf_op(p: bytes, low: Entry | None, entry: Entry) -> Op | None:
    """The op that makes the leaf `low` (None: absent) at `p` into `entry`: None when equal, a
    META when only mode or mtime differ, else a PUT."""
    if (
        low is not None
        and low.kind is entry.kind
        and low.payload == entry.payload
        and low.size == entry.size
        and low.tier == entry.tier
    ):
        if (low.mode, low.mtime_ns) == (entry.mode, entry.mtime_ns):
            return None
        return Op(OpKind.META, p, mode=entry.mode, mtime_ns=entry.mtime_ns)
    return Op(OpKind.PUT, p, entry)


def other_leaf(
    links: StoreLinks,
    m: Manifests,
    txn: Txn,
    root: bytes,
    rules: Rules,
    dfd: int,
    name: bytes,
    st: os.stat_result,
    p: bytes,
    low: Entry | None,
    warnings: list[str],
) -> Entry | None:
    """The entry of a non-regular, non-directory leaf at `p` (the harvester's and the shim
    daemon's): a symlink (a copied Tier-1 store link becomes its file again), else — fifo,
    socket, device — nothing, with a warning."""
    mtime = st.st_mtime_ns
    if stat.S_ISLNK(st.st_mode):
        target = os.readlink(name, dir_fd=dfd)
        copied = links.entry(m, txn, root, name, target, mtime, low, lambda: rules.classify(p))
        if copied is not None:
            return copied
        return Entry(name, Kind.SYMLINK, 0o777, len(target), mtime, b"", target, 0)
    kind = (
        "fifo" if stat.S_ISFIFO(st.st_mode) else "socket" if stat.S_ISSOCK(st.st_mode) else "device"
    )
    warnings.append(f"skipped {paths.display(p)}: a {kind} is not modelled in v1")
    return None


def is_whiteout(st: os.stat_result, dfd: int, name: bytes) -> bool:
    """A 0/0 character device, or a zero-size file carrying `user.overlay.whiteout`."""
    if stat.S_ISCHR(st.st_mode):
        return st.st_rdev == 0
    if stat.S_ISREG(st.st_mode) and st.st_size == 0:
        try:
            _getx(dfd, name, _XATTR_WHITEOUT)
        except OSError:
            return False
        return True
    return False


def _getx(dfd: int, name: bytes, attr: str) -> bytes:
    """getxattr relative to a directory fd (no *xattrat in Python): via /proc/self/fd."""
    return os.getxattr(b"/proc/self/fd/%d/%s" % (dfd, name), attr, follow_symlinks=False)


def _getx_fd(fd: int, attr: str) -> bytes | None:
    try:
        return os.getxattr(fd, attr)
    except OSError:
        return None


class _Harvester:
    def __init__(
        self,
        store: Store,
        m: Manifests,
        txn: Txn,
        stage: Stage,
        *,
        form: str,
        rules: Rules,
    ) -> None:
        self.store = store
        self.m = m
        self.txn = txn
        self.stage = stage
        self.form = form
        self.rules = rules
        self.res = HarvestResult()
        self.links = StoreLinks(store)
        self.view_root = b""

    # -- opening what the session made unreadable
    def _open_dir(self, dfd: int, name: bytes, st: os.stat_result) -> int:
        try:
            return os.open(name, _DIRFLAGS, dir_fd=dfd)
        except PermissionError:
            os.chmod(name, stat.S_IMODE(st.st_mode) | 0o700, dir_fd=dfd, follow_symlinks=False)
            return os.open(name, _DIRFLAGS, dir_fd=dfd)

    def _open_file(self, dfd: int, name: bytes, st: os.stat_result) -> int:
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
        try:
            return os.open(name, flags, dir_fd=dfd)
        except PermissionError:
            os.chmod(name, stat.S_IMODE(st.st_mode) | 0o400, dir_fd=dfd, follow_symlinks=False)
            return os.open(name, flags, dir_fd=dfd)

    @staticmethod
    def _names(dfd: int) -> list[bytes]:
        return sorted(os.fsencode(n) for n in os.listdir(dfd))

    # -- the walk
    def run(self, upper: str, view_root: bytes) -> HarvestResult:
        self.view_root = view_root
        top = os.open(upper, _DIRFLAGS)
        try:
            st = os.fstat(top)
            node = self.m.get_node(self.txn, view_root)
            mode, mtime = stat.S_IMODE(st.st_mode), st.st_mtime_ns
            if (mode, mtime) != (node.mode, node.mtime_ns):
                self.res.ops.append(Op(OpKind.META, b"", mode=mode, mtime_ns=mtime))
            self._merged(top, b"", node)
        finally:
            os.close(top)
        return self.res

    def _merged(self, dfd: int, rel: bytes, lower: Node) -> None:
        ops = self.res.ops
        for name in self._names(dfd):
            p = paths.join(rel, name)
            st = os.lstat(name, dir_fd=dfd)
            low = lower.lookup(name)
            if low is not None and low.kind is Kind.MASK:
                low = None
            if is_whiteout(st, dfd, name):
                if low is not None:
                    ops.append(Op(OpKind.DELETE, p))
                continue
            if stat.S_ISDIR(st.st_mode):
                cfd = self._open_dir(dfd, name, st)
                try:
                    opaque = _getx_fd(cfd, _XATTR_OPAQUE) == b"y"
                    if low is not None and low.kind is Kind.DIR and not opaque:
                        child = self.m.get_node(self.txn, low.digest)
                        mode, mtime = stat.S_IMODE(st.st_mode), st.st_mtime_ns
                        if (mode, mtime) != (child.mode, child.mtime_ns):
                            ops.append(Op(OpKind.META, p, mode=mode, mtime_ns=mtime))
                        self._merged(cfd, p, child)
                    else:
                        ops.append(Op(OpKind.PUT, p, self._new_dir(cfd, name, st, p)))
                finally:
                    os.close(cfd)
                continue
            entry = self._leaf(dfd, name, st, p, low)
            op = leaf_op(p, low, entry) if entry is not None else None
            if op is not None:
                ops.append(op)

    def _new_dir(self, dfd: int, name: bytes, st: os.stat_result, rel: bytes) -> Entry:
        """A directory from the upper only (new, or opaque): its whole subtree."""
        entries: list[Entry] = []
        for child in self._names(dfd):
            p = paths.join(rel, child)
            cst = os.lstat(child, dir_fd=dfd)
            if is_whiteout(cst, dfd, child):
                continue  # hides a lower entry this directory does not show anyway
            if stat.S_ISDIR(cst.st_mode):
                cfd = self._open_dir(dfd, child, cst)
                try:
                    entries.append(self._new_dir(cfd, child, cst, p))
                finally:
                    os.close(cfd)
                continue
            e = self._leaf(dfd, child, cst, p, None)
            if e is not None:
                entries.append(e)
        digest, data = tree.encode(stat.S_IMODE(st.st_mode), st.st_mtime_ns, entries)
        self.res.nodes[digest] = data
        return Entry(name, Kind.DIR, digest=digest)

    def _leaf(
        self, dfd: int, name: bytes, st: os.stat_result, p: bytes, low: Entry | None
    ) -> Entry | None:
        if stat.S_ISREG(st.st_mode):
            return self._file(dfd, name, st, p, low)
        return other_leaf(
            self.links,
            self.m,
            self.txn,
            self.view_root,
            self.rules,
            dfd,
            name,
            st,
            p,
            low,
            self.res.warnings,
        )

    def _file(
        self, dfd: int, name: bytes, st: os.stat_result, p: bytes, low: Entry | None
    ) -> Entry:
        mode, mtime = stat.S_IMODE(st.st_mode), st.st_mtime_ns
        low_file = low if low is not None and low.kind is Kind.FILE else None
        fd = self._open_file(dfd, name, st)
        try:
            if low_file is not None and _getx_fd(fd, _XATTR_METACOPY) is not None:
                # A metacopy copy-up: only the metadata is in the upper, the data is the lower's.
                digest, size = low_file.digest, low_file.size
            elif low_file is not None and st.st_size == low_file.size:
                digest, size = hash_fd(fd)
                self.res.files_read += 1
                self.res.bytes_read += size
                if digest != low_file.digest:
                    os.lseek(fd, 0, os.SEEK_SET)
                    digest, size, _new = self.stage.add_fd(fd)
            else:
                digest, size, _new = self.stage.add_fd(fd)
                self.res.files_read += 1
                self.res.bytes_read += size
        finally:
            os.close(fd)
        faults.point("harvest.file")
        if mode & _SETID and not (low_file is not None and low_file.mode & _SETID == mode & _SETID):
            # As ingest does unless asked (keep_setid): a session does not mint setuid/setgid
            # files; bits the manifest already had are kept.
            mode &= ~_SETID
            self.res.stripped_setid += 1
        if low_file is not None and digest == low_file.digest:
            if self.form == "links" and mtime == PROXY_MTIME_NS:
                mtime = low_file.mtime_ns  # the proxy's normalised mtime, not the user's
            tier = low_file.tier
        else:
            tier = low_file.tier if low_file is not None else self.rules.classify(p)
        return Entry(name, Kind.FILE, mode, size, mtime, digest, b"", tier)


def harvest_upper(
    store: Store,
    m: Manifests,
    txn: Txn,
    upper: str | os.PathLike[str],
    view_root: bytes,
    stage: Stage,
    *,
    form: str,
    rules: Rules,
) -> HarvestResult:
    """Path operations that turn `view_root` into what the session left in `upper`.

    `txn` is a read transaction (the view's nodes are only looked up); new file contents go to
    `stage`; new directory nodes are in the result's `nodes`.
    """
    h = _Harvester(store, m, txn, stage, form=form, rules=rules)
    try:
        res = h.run(os.fspath(upper), view_root)
        if res.stripped_setid:
            res.warnings.append(
                f"setuid/setgid bits removed from {res.stripped_setid} file(s) made in the session"
            )
        return res
    except OSError as exc:
        if exc.errno == errno.ENOENT and not os.path.isdir(upper):
            from .errors import Reason, VeloError

            raise VeloError(
                f"the session's upper directory {os.fspath(upper)} is missing",
                reason=Reason.SESSION_NOT_FOUND,
            ) from exc
        raise


def to_top_ref(
    m: Manifests, txn: Txn, ops: Sequence[Op], top_root: bytes, below: bytes, view: bytes
) -> list[Op]:
    """Re-express ops against the stacked view as ops on the top ref alone.

    Deleting what a lower ref provides records a MASK; a path only a lower ref had gets its
    directories created in the top ref (they merge with the lower ones); a replaced directory
    masks the lower ref's names it no longer has.
    """
    out: list[Op] = []
    made: set[bytes] = set()

    def in_top(p: bytes) -> Entry | None:
        e = m.lookup(txn, top_root, p)
        return None if e is None or e.kind is Kind.MASK else e

    def below_has(p: bytes) -> Entry | None:
        e = m.lookup(txn, below, p)
        return None if e is None or e.kind is Kind.MASK else e

    def ensure_parents(p: bytes) -> None:
        parts = p.split(b"/")[:-1]
        cur = b""
        for name in parts:
            cur = paths.join(cur, name)
            if cur in made or in_top(cur) is not None:
                continue
            v = m.lookup(txn, view, cur)
            node = m.get_node(txn, v.digest) if v is not None and v.kind is Kind.DIR else None
            mode, mtime = (node.mode, node.mtime_ns) if node else (0o755, 0)
            out.append(
                Op(OpKind.PUT, cur, Entry(name, Kind.DIR, digest=m.put_node(txn, mode, mtime, [])))
            )
            made.add(cur)

    for op in ops:
        p = op.path
        if p == b"":
            out.append(op)
            continue
        ensure_parents(p)
        if op.kind is OpKind.DELETE:
            if below_has(p) is not None:
                out.append(Op(OpKind.PUT, p, Entry(p.rsplit(b"/", 1)[-1], Kind.MASK)))
            else:
                out.append(op)
        elif op.kind is OpKind.PUT:
            e = op.entry
            assert e is not None
            lower = below_has(p)
            if e.kind is Kind.DIR and lower is not None and lower.kind is Kind.DIR:
                e = Entry(e.name, Kind.DIR, digest=_mask_below(m, txn, e.digest, lower.digest))
            out.append(Op(OpKind.PUT, p, e))
            made.add(p)
        else:  # META
            if in_top(p) is not None or p in made:
                out.append(op)
                continue
            v = m.lookup(txn, view, p)
            if v is None:
                continue
            if v.kind is Kind.DIR:
                d = m.put_node(txn, op.mode, op.mtime_ns, [])
                out.append(Op(OpKind.PUT, p, Entry(v.name, Kind.DIR, digest=d)))
            else:
                out.append(
                    Op(
                        OpKind.PUT,
                        p,
                        Entry(
                            v.name, v.kind, op.mode, v.size, op.mtime_ns, v.digest, v.target, v.tier
                        ),
                    )
                )
            made.add(p)
    return out


def _mask_below(m: Manifests, txn: Txn, new: bytes, lower: bytes) -> bytes:
    """`new` plus MASK entries for what `lower` would otherwise show through it."""
    n, lo = m.get_node(txn, new), m.get_node(txn, lower)
    entries = n.as_dict()
    changed = False
    for e in lo.entries:
        if e.kind is Kind.MASK:
            continue
        mine = entries.get(e.name)
        if mine is None:
            entries[e.name] = Entry(e.name, Kind.MASK)
            changed = True
        elif mine.kind is Kind.DIR and e.kind is Kind.DIR:
            d = _mask_below(m, txn, mine.digest, e.digest)
            if d != mine.digest:
                entries[e.name] = Entry(e.name, Kind.DIR, digest=d)
                changed = True
    if not changed:
        return new
    return m.put_node(txn, n.mode, n.mtime_ns, entries.values())
