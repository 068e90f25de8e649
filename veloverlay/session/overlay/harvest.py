"""Harvest: turn a session's overlay upper directory into path operations against its view.

Walks the upper directory ONLY — never the projected tree — so the cost follows what the session
changed. The session is over when this runs (every process of it is dead), so reading is
close-to-open: nothing writes any more.

What the upper holds, and what it becomes:
The overlay markers are read with the prefix the session's mount used, and only that one:
`user.overlay.*` for userxattr (userns) sessions, `trusted.overlay.*` for root-native ones. A
marker of the other prefix is an ordinary xattr a program set (the kernel ignored it), so reading
both would invent opaque dirs or whiteouts. Neither prefix ever reaches the store: only file
contents are staged (v1 does not model xattrs).

* whiteout (0/0 char device, or a zero-size file with `<prefix>.overlay.whiteout`) -> DELETE
* directory with `trusted.overlay.redirect` (root-native: a directory renamed with rename(2);
  the kernel moved the upper dir, set the redirect to its origin — relative to the parent's
  origin, or absolute from the root — and left a whiteout at the old name) -> PUT of the whole
  directory: the origin's subtree from the view, changed by what the upper holds below it
  (untouched children keep their nodes); the old name's whiteout is the DELETE
* directory marked `<prefix>.overlay.opaque=y` -> PUT of a directory built from the upper only
  (the kernel marks a directory made where a lower entry was deleted, e.g. an EXDEV rename or a
  file replaced by a directory); a new directory the same way; a copied-up directory is walked
  and gets META when its own mode/mtime changed
* regular file -> PUT (content staged into the store); a copy-up whose content equals the
  lower's (chmod, utime, an open for writing that wrote nothing, a metacopy copy-up) -> META only.
  In the links form a copied-up file still carries the proxy's normalised mtime
  (`projection.PROXY_MTIME_NS`); when its content did not change that mtime is not the user's
  and the manifest's is kept. A file renamed or copied with its times to another path carries
  it too: it gets the mtime the view records for its content (harvest.RecordedMtimes).
* symlink -> SYMLINK; a symlink into this store's objects that is a Tier-1 entry of the view a
  program copied (`cp -a`, npm) -> back to a FILE entry of that object
* hard links are two files (v1 does not model link identity; the inode is read once); fifos,
  sockets and devices are skipped with a warning (one that replaced a stored entry deletes it);
  setuid/setgid bits a session sets are removed (as ingest does unless asked), bits the
  manifest already had are kept while the file's content is the manifest's (`setid_kept`).
An entry whose path is past the bound a tree is kept in (paths.bounded) stops the harvest
(`too-deep`, the whole path in the error), or, with `harvest --resume ID --set-aside DIR`, is
moved out to DIR and said (session/harvest.py `SetAside`).
Files and directories the harvester cannot read as created (mode 000, 0555 dirs for a non-root
owner) are chmod-ed to read them; the manifest records the mode they had.

Staged objects are published by the caller, before its LMDB write transaction; directory nodes
built here are returned as encodings (pure) and written by the caller in that transaction.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator

from veloverlay import _libc, faults, paths, posixacl
from veloverlay.errors import VeloError
from veloverlay.files import DIRFLAGS, open_walkable, opened_dir
from veloverlay.lower.objects import PROXY_MTIME_NS
from veloverlay.records import Record, field
from veloverlay.session.harvest import (
    RecordedMtimes,
    SetAside,
    StoreLinks,
    kept_in_bounds,
    leaf_op,
    other_leaf,
    setid_kept,
    without_minted_setid,
)
from veloverlay.store import tree
from veloverlay.store.cas import Stage, Store
from veloverlay.store.digest import hash_fd
from veloverlay.store.dirstack import DirStack
from veloverlay.store.manifest import Manifests, Txn
from veloverlay.store.tree import Entry, Kind, Node, NodeView, Op, OpKind
from veloverlay.tiers import Rules

__all__ = ["HarvestResult", "harvest_upper", "is_whiteout", "leaf_op", "other_leaf"]

_SETID = stat.S_ISUID | stat.S_ISGID


class HarvestResult(Record):
    ops: list[Op] = field(default_factory=list)
    nodes: dict[bytes, bytes] = field(default_factory=dict)  # digest -> encoding
    files_read: int = 0
    bytes_read: int = 0
    warnings: list[str] = field(default_factory=list)
    stripped_setid: int = 0


def is_whiteout(st: os.stat_result, dfd: int, name: bytes, prefix: str = "user") -> bool:
    """A 0/0 character device, or a zero-size file carrying `<prefix>.overlay.whiteout`."""
    if stat.S_ISCHR(st.st_mode):
        return st.st_rdev == 0
    if stat.S_ISREG(st.st_mode) and st.st_size == 0:
        try:
            _getx(dfd, name, f"{prefix}.overlay.whiteout")
        except OSError:
            return False
        return True
    return False


def _getx(dfd: int, name: bytes, attr: str) -> bytes:
    """getxattr of the regular file `name` relative to a directory fd (no *xattrat in Python):
    via /proc/self/fd, or without /proc (a mount namespace that has none, where ENOENT would
    read as "no such xattr") by a descriptor of it (never followed, never blocking)."""
    try:
        return _libc.getxattr_at(dfd, name, attr)
    except OSError as exc:
        if exc.errno != errno.ENOENT or os.path.isdir("/proc/self/fd"):
            raise
    fd = os.open(name, _XFLAGS, dir_fd=dfd)
    try:
        return os.getxattr(fd, attr)
    finally:
        os.close(fd)


_XFLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


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
        prefix: str,
        aside: SetAside | None,
    ) -> None:
        self.prefix = prefix
        self.aside = aside
        self.x_opaque = f"{prefix}.overlay.opaque"
        self.x_metacopy = f"{prefix}.overlay.metacopy"
        # userxattr mounts use redirect_dir=nofollow: no directory redirect is ever written or
        # followed there, so only root-native sessions have them.
        self.x_redirect = f"{prefix}.overlay.redirect" if prefix == "trusted" else ""
        self.store = store
        self.m = m
        self.txn = txn
        self.stage = stage
        self.form = form
        self.rules = rules
        self.res = HarvestResult()
        self.links = StoreLinks(store)
        self.recorded = RecordedMtimes()
        self.upper = ""
        self.view_root = b""
        # (dev, ino) -> (digest, size) of files with more than one link: each inode is read once
        # (65,000 links to a 1 GB file cost the command nothing, and the harvest 65 TB of reads)
        self.inodes: dict[tuple[int, int], tuple[bytes, int]] = {}
        self.extents: dict[bytes, tuple[int, int]] = {}  # node digest -> _extent
        self.dirs = DirStack(-1)  # the walk's open directories (`run` gives it the upper's top)

    # -- opening what the session made unreadable (given its mode back at once: a harvest
    # interrupted and resumed must find the modes the session left)
    def _open_file(self, dfd: int, name: bytes, st: os.stat_result) -> int:
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
        try:
            return os.open(name, flags, dir_fd=dfd)
        except PermissionError:
            mode = stat.S_IMODE(st.st_mode)
            os.chmod(name, mode | 0o400, dir_fd=dfd, follow_symlinks=False)
            try:
                return os.open(name, flags, dir_fd=dfd)
            finally:
                os.chmod(name, mode, dir_fd=dfd, follow_symlinks=False)

    @staticmethod
    def _names(dfd: int) -> list[bytes]:
        return sorted(os.fsencode(n) for n in os.listdir(dfd))

    # -- the walk
    def run(self, upper: str, view_root: bytes) -> HarvestResult:
        self.view_root = view_root
        self.upper = upper
        parent = os.open(os.path.dirname(upper), DIRFLAGS)
        try:
            st = os.lstat(os.path.basename(upper), dir_fd=parent)
            node = self.m.node_view(self.txn, view_root)
            mode, mtime = stat.S_IMODE(st.st_mode), st.st_mtime_ns
            kept = posixacl.mode_at(parent, os.fsencode(os.path.basename(upper)), mode)
            if (kept, mtime) != (node.mode, node.mtime_ns):
                self.res.ops.append(Op(OpKind.META, b"", mode=kept, mtime_ns=mtime))
            # the session may have made its tree's root unreadable too (chmod 600 .)
            with opened_dir(parent, os.fsencode(os.path.basename(upper)), mode) as top:
                self.dirs = DirStack(top)
                try:
                    self._merged(top, b"", node)
                finally:
                    self.dirs.close()
        finally:
            os.close(parent)
        return self.res

    @contextlib.contextmanager
    def _entered(self, name: bytes, mode: int) -> Iterator[int]:
        """`files.opened_dir` of the directory `name` in the one the walk is in, kept by
        `self.dirs` (a tree deeper than the open-files limit allows open levels is harvested
        too: a level may be closed while the walk is below it, and opened again after)."""
        fd, back = open_walkable(self.dirs.fd(), name, mode)
        self.dirs.push(fd, name)
        try:
            yield fd
        finally:
            try:
                if back is not None:  # its permission bits back, also when the walk failed
                    with contextlib.suppress(OSError):
                        os.fchmod(self.dirs.fd(), back)
            finally:
                self.dirs.pop()

    def _merged(self, dfd: int, rel: bytes, lower: Node | NodeView) -> None:
        ops = self.res.ops
        for name in self._names(dfd):
            dfd = self.dirs.fd()  # (opened again if a deeper level closed it)
            p = paths.join(rel, name)
            if not kept_in_bounds(dfd, name, p, self.aside, self.res.warnings):
                continue
            st = os.lstat(name, dir_fd=dfd)
            low = lower.lookup(name)
            if low is not None and low.kind is Kind.MASK:
                low = None
            if is_whiteout(st, dfd, name, self.prefix):
                if low is not None:
                    ops.append(Op(OpKind.DELETE, p))
                continue
            if stat.S_ISDIR(st.st_mode):
                with self._entered(name, stat.S_IMODE(st.st_mode)) as cfd:
                    origin = self._redirect(cfd, rel)
                    opaque = _getx_fd(cfd, self.x_opaque) == b"y"
                    if origin is not None:
                        node = self._origin_node(origin)
                        ops.append(
                            Op(OpKind.PUT, p, self._built_dir(cfd, name, st, p, node, origin))
                        )
                    elif low is not None and low.kind is Kind.DIR and not opaque:
                        child = self.m.node_view(self.txn, low.digest)
                        mode, _acl = posixacl.mode_of(cfd, stat.S_IMODE(st.st_mode))
                        mtime = st.st_mtime_ns
                        if (mode, mtime) != (child.mode, child.mtime_ns):
                            ops.append(Op(OpKind.META, p, mode=mode, mtime_ns=mtime))
                        self._merged(cfd, p, child)
                    else:
                        ops.append(Op(OpKind.PUT, p, self._built_dir(cfd, name, st, p, None, p)))
                continue
            entry = self._leaf(dfd, name, st, p, low)
            if entry is None:
                # A fifo, socket or device (not modelled) where the view had an entry: the
                # session removed that entry, as the tree it left shows (_built_dir does the same)
                if low is not None:
                    ops.append(Op(OpKind.DELETE, p))
                continue
            op = leaf_op(p, low, entry)
            if op is not None:
                ops.append(op)

    def _redirect(self, cfd: int, parent_origin: bytes) -> bytes | None:
        """The view path a renamed directory's lower content comes from, or None (no redirect).
        Absolute values start at the root; relative ones name a sibling in the parent's origin."""
        if not self.x_redirect:
            return None
        value = _getx_fd(cfd, self.x_redirect)
        if value is None:
            return None
        if value.startswith(b"/"):
            return value.strip(b"/")
        return paths.join(parent_origin, value)

    def _origin_node(self, origin: bytes) -> Node | None:
        if origin == b"":
            return self.m.get_node(self.txn, self.view_root)
        e = self.m.lookup(self.txn, self.view_root, origin)
        if e is None or e.kind is not Kind.DIR:
            # The kernel found nothing there either: the directory shows only the upper.
            self.res.warnings.append(
                f"a renamed directory's origin {paths.display(origin)} is not in the view"
            )
            return None
        return self.m.get_node(self.txn, e.digest)

    def _built_dir(
        self,
        dfd: int,
        name: bytes,
        st: os.stat_result,
        rel: bytes,
        origin: Node | None,
        origin_path: bytes,
    ) -> Entry:
        """A directory's whole node: `origin`'s entries (None: a new or opaque directory, from
        the upper only) changed by what the upper holds below it — whiteouts delete, leaves
        replace, directories merge the same way (or follow their own redirect)."""
        entries: dict[bytes, Entry] = {}
        if origin is not None:
            entries = {e.name: e for e in origin.entries if e.kind is not Kind.MASK}
        listed = self._names(dfd)
        for child in listed:
            dfd = self.dirs.fd()  # (opened again if a deeper level closed it)
            p = paths.join(rel, child)
            if not kept_in_bounds(dfd, child, p, self.aside, self.res.warnings):
                continue
            cst = os.lstat(child, dir_fd=dfd)
            low = entries.get(child)
            if is_whiteout(cst, dfd, child, self.prefix):
                entries.pop(child, None)
                continue
            if stat.S_ISDIR(cst.st_mode):
                with self._entered(child, stat.S_IMODE(cst.st_mode)) as cfd:
                    redirected = self._redirect(cfd, origin_path)
                    if redirected is not None:
                        sub: Node | None = self._origin_node(redirected)
                        sub_path = redirected
                    elif (
                        low is not None
                        and low.kind is Kind.DIR
                        and _getx_fd(cfd, self.x_opaque) != b"y"
                    ):
                        sub = self.m.get_node(self.txn, low.digest)
                        sub_path = paths.join(origin_path, child)
                    else:
                        sub, sub_path = None, paths.join(origin_path, child)
                    entries[child] = self._built_dir(cfd, child, cst, p, sub, sub_path)
                continue
            e = self._leaf(dfd, child, cst, p, low)
            if e is not None:
                entries[child] = e
            else:
                entries.pop(child, None)
        if origin is not None and rel != origin_path:
            # A renamed directory's untouched entries come from its origin's nodes, not from the
            # upper: the walk above never met their paths, which a deeper place can put past
            # the bound (a ref then no session could project).
            for e in [e for e in entries.values() if e.name not in set(listed)]:
                kept = self._in_bounds(e, paths.join(rel, e.name), paths.join(origin_path, e.name))
                if kept is None:
                    del entries[e.name]
                else:
                    entries[e.name] = kept
        dfd = self.dirs.fd()
        mode, _acl = posixacl.mode_of(dfd, stat.S_IMODE(st.st_mode))  # dfd: this directory
        digest, data = tree.encode(mode, st.st_mtime_ns, entries.values())
        self.res.nodes[digest] = data
        # Subtrees kept from the view are already stored; the caller writes `nodes`.
        return Entry(name, Kind.DIR, digest=digest)

    def _extent(self, digest: bytes) -> tuple[int, int]:
        """(levels, bytes) of the deepest and of the longest path below the directory node."""
        got = self.extents.get(digest)
        if got is None:
            depth = length = 0
            for e in self.m.get_node(self.txn, digest).entries:
                d, n = self._extent(e.digest) if e.kind is Kind.DIR else (0, 0)
                depth, length = max(depth, d + 1), max(length, n + 1 + len(e.name))
            got = self.extents[digest] = (depth, length)
        return got

    def _in_bounds(self, e: Entry, p: bytes, was: bytes) -> Entry | None:
        """`e` (kept from a renamed directory's origin, at `was` in the view) at its new path
        `p`: as it is when all of it is within the bound; else without what is past it, each
        such entry a too-deep error, or with --set-aside a warning (it is still in the version
        the session started from)."""
        depth, length = p.count(b"/") + 1, len(p)
        if e.kind is Kind.DIR:
            below = self._extent(e.digest)
            if depth + below[0] <= paths.DEPTH_MAX and length + below[1] <= paths.PATH_MAX:
                return e
        elif depth <= paths.DEPTH_MAX and length <= paths.PATH_MAX:
            return e
        if depth > paths.DEPTH_MAX or length > paths.PATH_MAX:
            if self.aside is None:
                try:
                    paths.check_extent(depth, length, p)
                except VeloError as exc:
                    raise VeloError(exc.message, reason=exc.reason, path=os.fsdecode(p)) from None
            self.res.warnings.append(
                f"NOT committed: {paths.display(p)} ({depth} levels, a path of {length} bytes: "
                f"too deep to keep), where a renamed directory took it from "
                f"{paths.display(was)}: it is still there in the version the session started from"
            )
            return None
        node = self.m.get_node(self.txn, e.digest)
        kept = [
            k
            for c in node.entries
            if (k := self._in_bounds(c, paths.join(p, c.name), paths.join(was, c.name))) is not None
        ]
        digest, data = tree.encode(node.mode, node.mtime_ns, kept)
        self.res.nodes[digest] = data
        return Entry(e.name, Kind.DIR, digest=digest)

    def _leaf(
        self, dfd: int, name: bytes, st: os.stat_result, p: bytes, low: Entry | None
    ) -> Entry | None:
        if stat.S_ISREG(st.st_mode):
            return self._file(dfd, name, st, p, low)
        e, stripped = without_minted_setid(
            other_leaf(
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
            ),
            low,
        )
        self.res.stripped_setid += stripped
        return e

    def _file(
        self, dfd: int, name: bytes, st: os.stat_result, p: bytes, low: Entry | None
    ) -> Entry:
        # The group bits its ACL gives the owning group (an ACL copied up or set in the session)
        mode, mtime = posixacl.mode_at(dfd, name, stat.S_IMODE(st.st_mode)), st.st_mtime_ns
        low_file = low if low is not None and low.kind is Kind.FILE else None
        inode = (st.st_dev, st.st_ino) if st.st_nlink > 1 else None
        if inode is not None and inode in self.inodes:
            # Another name of an inode read already: its content is staged or stored by now.
            digest, size = self.inodes[inode]
        else:
            digest, size = self._content(dfd, name, st, low_file)
            if inode is not None:
                self.inodes[inode] = (digest, size)
        faults.point("harvest.file")
        if mode & _SETID and not setid_kept(mode, digest, low_file):
            # As ingest does unless asked (keep_setid): a session does not mint setuid/setgid
            # files; bits the manifest already had for this very content are kept.
            mode &= ~_SETID
            self.res.stripped_setid += 1
        if low_file is not None and digest == low_file.digest:
            if self.form == "links" and mtime == PROXY_MTIME_NS:
                mtime = low_file.mtime_ns  # the proxy's normalised mtime, not the user's
            tier = low_file.tier
        else:
            tier = low_file.tier if low_file is not None else self.rules.classify(p)
            if self.form == "links" and mtime == PROXY_MTIME_NS:
                # renamed or copied with its times: the mtime the view records for it
                got = self.recorded.of(self.m, self.txn, self.view_root, digest, self._gone)
                mtime = got if got is not None else mtime
        return Entry(name, Kind.FILE, mode, size, mtime, digest, b"", tier)

    def _gone(self, p: bytes) -> bool:
        """Did the session remove or replace the view's entry at `p`? (Something of the upper
        at `p`, a whiteout on its way, or an opaque directory above it.)"""
        names = p.split(b"/")
        fd = os.open(self.upper, DIRFLAGS)
        try:
            for i, name in enumerate(names):
                try:
                    st = os.lstat(name, dir_fd=fd)
                except OSError:
                    return False  # the view shows through
                if i == len(names) - 1 or not stat.S_ISDIR(st.st_mode):
                    return True
                nfd = os.open(name, DIRFLAGS, dir_fd=fd)
                os.close(fd)
                fd = nfd
                if _getx_fd(fd, self.x_opaque) == b"y" or (
                    self.x_redirect and _getx_fd(fd, self.x_redirect) is not None
                ):
                    return True
            return False
        except OSError:
            return False
        finally:
            os.close(fd)

    def _content(
        self, dfd: int, name: bytes, st: os.stat_result, low_file: Entry | None
    ) -> tuple[bytes, int]:
        """(digest, size) of a regular file of the upper dir; a new content is staged."""
        fd = self._open_file(dfd, name, st)
        try:
            if low_file is not None and _getx_fd(fd, self.x_metacopy) is not None:
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
        return digest, size


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
    prefix: str = "user",
    aside: SetAside | None = None,
) -> HarvestResult:
    """Path operations that turn `view_root` into what the session left in `upper`.

    `txn` is a read transaction (the view's nodes are only looked up); new file contents go to
    `stage`; new directory nodes are in the result's `nodes`. `prefix` is the overlay xattr
    prefix of the session's mount (`user`, or `trusted` root-native). `aside`: where entries
    too deep to keep go (`harvest --set-aside`); without it they stop the harvest (`too-deep`).
    """
    h = _Harvester(store, m, txn, stage, form=form, rules=rules, prefix=prefix, aside=aside)
    try:
        res = h.run(os.fspath(upper), view_root)
        if res.stripped_setid:
            res.warnings.append(
                f"setuid/setgid bits removed from {res.stripped_setid} file(s) made in the session"
            )
        return res
    except OSError as exc:
        if exc.errno == errno.ENOENT and not os.path.isdir(upper):
            from veloverlay.errors import Reason, VeloError

            raise VeloError(
                f"the session's upper directory {os.fspath(upper)} is missing",
                reason=Reason.SESSION_NOT_FOUND,
            ) from exc
        raise
