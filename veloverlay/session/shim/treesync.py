"""The shim session's tree sync: the materialised tree -> path operations against a manifest root.

`TreeSync` serves the live daemon (a set of dirty paths) and the end-of-session stat-diff (the
whole tree: `b""` with SUBTREE). A file is re-hashed only when its inode, size, mtime or ctime
differ from what the cache knows (the baseline written at materialisation; ctime catches a write
whose mtime was put back); a directory is walked only when it must be. Symlinks into this store's
objects are Tier-1 files; fifos, sockets and devices are skipped with a warning (not modelled in
v1). Whatever another user owns where they could have put it themselves is skipped too, and
named (`Owners`): a world-writable directory of the tree lets any local user add files, which
must never reach the session user's ref.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import time
from collections.abc import Iterator

from veloverlay import paths, posixacl, records
from veloverlay.files import DIRFLAGS, let_search, opened_dir, wait_for_writes
from veloverlay.lower.objects import PROXY_MTIME_NS
from veloverlay.records import field
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
from veloverlay.session.shim.materialize import Baseline, open_target
from veloverlay.store import tree
from veloverlay.store.cas import Stage, Store
from veloverlay.store.digest import hash_fd
from veloverlay.store.manifest import Manifests, Txn
from veloverlay.store.tree import Entry, Kind, Node, Op, OpKind
from veloverlay.tiers import Rules

__all__ = ["Unstable", "SyncResult", "TreeSync", "SELF", "SUBTREE"]


SELF = 1
SHOWN = 20  # skipped entries named one by one in the warnings (all are in `skipped`)


class Unstable(Exception):
    """A file kept changing while it was read (a writer is still at it): try next tick."""


_SETID = stat.S_ISUID | stat.S_ISGID


class SyncResult(records.Record):
    ops: list[Op] = field(default_factory=list)
    nodes: dict[bytes, bytes] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    retry: set[bytes] = field(default_factory=set)  # dirty paths to look at again
    files_hashed: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, kind): not committed
    stripped_setid: int = 0  # files whose setuid/setgid bits the session set were not committed


class Owners:
    """Whose entries a session commits. Its own user's and root's (who can write any store
    anyway); another user's only in a root session, and there only where that user could not
    have put it: below no directory that is group- or world-writable without being theirs (a
    chown or `tar x` by the session's command is kept; a file dropped into a 1777 or 0777
    directory of the tree is not). A non-root session's processes cannot make another user's
    file at all: every one came from outside the session (or was hard-linked in), and is
    skipped. `exposed`: the owners of the writable directories above an entry."""

    def __init__(self, uid: int) -> None:
        self.uid = uid

    def foreign(self, st: os.stat_result, exposed: frozenset[int]) -> bool:
        owner = st.st_uid
        if owner in (self.uid, 0):
            return False
        return self.uid != 0 or bool(exposed - {owner})

    @staticmethod
    def below(exposed: frozenset[int], dir_st: os.stat_result) -> frozenset[int]:
        """`exposed` for the entries of the directory `dir_st` (below `exposed`)."""
        if dir_st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            return exposed | {dir_st.st_uid}
        return exposed


class TreeSync:
    """Compare the materialised tree at `top` with manifest roots."""

    def __init__(
        self,
        store: Store,
        m: Manifests,
        top: bytes,
        baseline: Baseline,
        rules: Rules,
        *,
        link: bool,
        racy_ns: int = 0,
        live: bool = False,
        ident: tuple[int, int] | None = None,
        uid: int | None = None,
    ) -> None:
        self.store = store
        # the session's user: another user's entries are skipped (None: every entry counts)
        self.owners = Owners(uid) if uid is not None else None
        self.m = m
        self.top = top.rstrip(b"/") or b"/"
        self.ident = ident  # the tree top's (dev, ino): a replaced directory is never read
        self.cache = dict(baseline.by_ino)
        # inode -> (ctime_ns, lstat's permission bits, the mode its ACL narrowed them to): a
        # file the stat cache knows unchanged is not asked for its ACL again every tick
        self.modes: dict[int, tuple[int, int, int]] = {}
        self.rules = rules
        self.link = link
        # Files hashed here are cached only when their ctime is older than this margin: a write
        # within the same coarse clock tick would not move ctime (git's "racy clean" rule).
        self.racy_ns = racy_ns
        # While the session runs, a directory its processes made unreadable or unsearchable is
        # looked at again next tick (its mode is never changed under them: a chmod of theirs
        # meanwhile would be undone); at the end, with every process gone, it is opened up.
        self.live = live
        self.links = StoreLinks(store)
        self.recorded = RecordedMtimes()
        self.aside: SetAside | None = None  # `harvest --set-aside`: where too-deep entries go
        self._txn: Txn = None
        self._root = b""

    # -- paths
    def rel(self, path: bytes) -> bytes | None:
        """Manifest path of an absolute path, or None when it is outside the tree."""
        if path == self.top:
            return b""
        prefix = self.top + b"/" if self.top != b"/" else b"/"
        if not path.startswith(prefix):
            return None
        rel = path[len(prefix) :]
        try:
            paths.split(rel)
        except Exception:  # noqa: BLE001 - not a manifest path: the caller re-scans its parent
            return None
        return rel

    def _walk_to_parent(self, rel: bytes) -> tuple[int, bytes, frozenset[int] | None] | None:
        """An fd of rel's parent, reached without following any symlink, its last name, and
        what `Owners` needs to judge the entry (None when a directory on the way is another
        user's: nothing below it counts); None if not there."""
        fd = open_target(self.top, self.ident)
        names = paths.split(rel)
        exposed: frozenset[int] = frozenset()
        try:
            for name in names[:-1]:
                exposed = Owners.below(exposed, os.fstat(fd))
                nfd = os.open(name, DIRFLAGS, dir_fd=fd)
                os.close(fd)
                fd = nfd
                if self.owners is not None and self.owners.foreign(os.fstat(fd), exposed):
                    return fd, names[-1], None
            exposed = Owners.below(exposed, os.fstat(fd))
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                return None
            if exc.errno == errno.EACCES:  # there, in a directory made unsearchable: not gone
                raise Unstable() from None
            raise
        return fd, names[-1], exposed

    def _foreign(
        self, p: bytes, st: os.stat_result, exposed: frozenset[int], res: SyncResult
    ) -> bool:
        """Is the entry at `p` another user's that is not committed? Then it is named."""
        if self.owners is None or not self.owners.foreign(st, exposed):
            return False
        shown = paths.display(p)
        res.skipped.append((shown, "other-owner"))
        if len(res.skipped) <= SHOWN:
            res.warnings.append(
                f"skipped {shown}: owned by uid {st.st_uid}, not by the session's user "
                f"(uid {self.owners.uid}), who could not have made it: not committed"
            )
        return True

    # -- the comparison
    def sync(self, txn: Txn, root: bytes, dirty: dict[bytes, int], stage: Stage) -> SyncResult:
        res = SyncResult()
        self._txn = txn
        self._root = root
        done: set[bytes] = set()  # paths replaced or deleted whole: skip what lies below
        subtrees = {p for p, f in dirty.items() if f & SUBTREE}
        for p in sorted(dirty):
            if _below_any(p, subtrees, strict=True) or _below_any(p, done, strict=False):
                continue
            try:
                replaced = self._sync_path(txn, root, p, dirty[p], stage, res)
            except Unstable:
                res.retry.add(p)
                continue
            if replaced:
                done.add(p)
        if res.stripped_setid:  # as the overlay harvest does (and ingest, unless asked)
            res.warnings.append(
                f"setuid/setgid bits removed from {res.stripped_setid} file(s) made in the session"
            )
        if len(res.skipped) > SHOWN:
            res.warnings.append(
                f"... and {len(res.skipped) - SHOWN} more entries of other users skipped"
            )
        return res

    def _sync_path(
        self, txn: Txn, root: bytes, p: bytes, flags: int, stage: Stage, res: SyncResult
    ) -> bool:
        if p == b"":
            fd = open_target(self.top, self.ident)
            try:
                st = os.fstat(fd)
                node = self.m.get_node(txn, root)
                self._dir_meta(b"", fd, st, node, res)
                if flags & SUBTREE:
                    with self._searchable(fd):  # the session may have run chmod 600 on it
                        self._compare_dir(fd, b"", node, stage, res, Owners.below(frozenset(), st))
            finally:
                os.close(fd)
            return False
        low = self.m.lookup(txn, root, p)
        if low is not None and low.kind is Kind.MASK:
            low = None
        where = self._walk_to_parent(p)
        if where is None:
            if low is not None:
                res.ops.append(Op(OpKind.DELETE, p))
                return True
            return False
        dfd, name, exposed = where
        try:
            if exposed is None:
                return False  # below a directory of another user: skipped (and named) there
            try:
                st = os.lstat(name, dir_fd=dfd)
            except PermissionError:  # its directory was made unsearchable
                raise Unstable() from None
            except FileNotFoundError:
                if low is not None:
                    res.ops.append(Op(OpKind.DELETE, p))
                    return True
                return False
            return self._compare_one(dfd, name, st, p, low, flags, stage, res, exposed)
        finally:
            os.close(dfd)

    def _compare_one(
        self,
        dfd: int,
        name: bytes,
        st: os.stat_result,
        p: bytes,
        low: Entry | None,
        flags: int,
        stage: Stage,
        res: SyncResult,
        exposed: frozenset[int],
    ) -> bool:
        """Compare one existing name; True when the path was replaced whole (PUT/DELETE).
        Another user's entry (`_foreign`) changes nothing: what the view has there stays."""
        if self._foreign(p, st, exposed, res):
            return False
        if stat.S_ISDIR(st.st_mode):
            inner = Owners.below(exposed, st)
            with self._opened_dir(dfd, name, stat.S_IMODE(st.st_mode)) as cfd:
                if low is not None and low.kind is Kind.DIR:
                    child = self.m.get_node(self._txn, low.digest)
                    self._dir_meta(p, cfd, st, child, res)
                    if flags & SUBTREE:
                        self._compare_dir(cfd, p, child, stage, res, inner)
                    return False
                new = self._new_dir(cfd, name, st, p, stage, res, inner)
                res.ops.append(Op(OpKind.PUT, p, new))
                return True
        entry = self._leaf(dfd, name, st, p, low, stage, res)
        if entry is None:
            if low is not None:
                res.ops.append(Op(OpKind.DELETE, p))
                return True
            return False
        op = leaf_op(p, low, entry)
        if op is not None:
            res.ops.append(op)
        return op is not None and op.kind is OpKind.PUT

    def _opened_dir(
        self, dfd: int, name: bytes, mode: int
    ) -> contextlib.AbstractContextManager[int]:
        if not self.live:
            return opened_dir(dfd, name, mode)
        try:
            fd = os.open(name, DIRFLAGS, dir_fd=dfd)
        except PermissionError:
            raise Unstable() from None
        try:
            os.lstat(".", dir_fd=fd)
        except PermissionError:
            os.close(fd)
            raise Unstable() from None
        except BaseException:
            os.close(fd)
            raise
        return _closing_fd(fd)

    def _searchable(self, fd: int) -> contextlib.AbstractContextManager[None]:
        if not self.live:
            return _given_back(fd, let_search(fd))
        try:
            os.lstat(".", dir_fd=fd)
        except PermissionError:
            raise Unstable() from None
        return contextlib.nullcontext()

    @staticmethod
    def _dir_meta(p: bytes, fd: int, st: os.stat_result, node: Node, res: SyncResult) -> None:
        mode, _acl = posixacl.mode_of(fd, stat.S_IMODE(st.st_mode))  # fd: the directory
        mtime = st.st_mtime_ns
        if (mode, mtime) != (node.mode, node.mtime_ns):
            res.ops.append(Op(OpKind.META, p, mode=mode, mtime_ns=mtime))

    def _compare_dir(
        self,
        dfd: int,
        rel: bytes,
        node: Node,
        stage: Stage,
        res: SyncResult,
        exposed: frozenset[int],
    ) -> None:
        on_disk = {os.fsencode(n) for n in os.listdir(dfd)}
        known = {e.name: e for e in node.entries if e.kind is not Kind.MASK}
        for name in sorted(on_disk | known.keys()):
            p = paths.join(rel, name)
            if not kept_in_bounds(dfd, name, p, self.aside, res.warnings):
                continue
            low = known.get(name)
            if name not in on_disk:
                res.ops.append(Op(OpKind.DELETE, p))
                continue
            try:
                st = os.lstat(name, dir_fd=dfd)
            except FileNotFoundError:
                if low is not None:
                    res.ops.append(Op(OpKind.DELETE, p))
                continue
            try:
                self._compare_one(dfd, name, st, p, low, SUBTREE, stage, res, exposed)
            except Unstable:
                res.retry.add(p)

    def _new_dir(
        self,
        dfd: int,
        name: bytes,
        st: os.stat_result,
        rel: bytes,
        stage: Stage,
        res: SyncResult,
        exposed: frozenset[int],
    ) -> Entry:
        """The entry of a directory the view does not have; `exposed`: for its entries."""
        entries: list[Entry] = []
        for child in sorted(os.fsencode(n) for n in os.listdir(dfd)):
            p = paths.join(rel, child)
            if not kept_in_bounds(dfd, child, p, self.aside, res.warnings):
                continue
            try:
                cst = os.lstat(child, dir_fd=dfd)
            except FileNotFoundError:
                continue
            if self._foreign(p, cst, exposed, res):
                continue
            if stat.S_ISDIR(cst.st_mode):
                with self._opened_dir(dfd, child, stat.S_IMODE(cst.st_mode)) as cfd:
                    inner = Owners.below(exposed, cst)
                    entries.append(self._new_dir(cfd, child, cst, p, stage, res, inner))
                continue
            e = self._leaf(dfd, child, cst, p, None, stage, res)
            if e is not None:
                entries.append(e)
        mode, _acl = posixacl.mode_of(dfd, stat.S_IMODE(st.st_mode))  # dfd: this directory
        digest, data = tree.encode(mode, st.st_mtime_ns, entries)
        res.nodes[digest] = data
        return Entry(name, Kind.DIR, digest=digest)

    def _leaf(
        self,
        dfd: int,
        name: bytes,
        st: os.stat_result,
        p: bytes,
        low: Entry | None,
        stage: Stage,
        res: SyncResult,
    ) -> Entry | None:
        if stat.S_ISREG(st.st_mode):
            return self._file(dfd, name, st, p, low, stage, res)
        view = (self.links, self.m, self._txn, self._root, self.rules)
        leaf = other_leaf(*view, dfd, name, st, p, low, res.warnings)
        e, stripped = without_minted_setid(leaf, low)
        res.stripped_setid += stripped
        return e

    def _file(
        self,
        dfd: int,
        name: bytes,
        st: os.stat_result,
        p: bytes,
        low: Entry | None,
        stage: Stage,
        res: SyncResult,
    ) -> Entry:
        low_file = low if low is not None and low.kind is Kind.FILE else None
        cached = self.cache.get(st.st_ino)
        hit = cached is not None and cached[:3] == (st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        mode = self._mode(dfd, name, st, hit)  # as its ACL allows
        if cached is not None and hit:
            digest, size = cached[3], st.st_size
        else:
            digest, size, st = self._hash(dfd, name, st, low_file, stage, res)
        mtime = st.st_mtime_ns
        if low_file is not None and mode == low_file.mode & ~_SETID and digest == low_file.digest:
            mode = low_file.mode  # projected without its setid bits (materialize) and unchanged
        if mode & _SETID and not setid_kept(mode, digest, low_file):
            mode &= ~_SETID  # a session does not mint setuid/setgid files (nor new content)
            res.stripped_setid += 1
        if low_file is not None and digest == low_file.digest:
            if self.link and mtime == PROXY_MTIME_NS:
                mtime = low_file.mtime_ns  # the proxy's normalised mtime is not the user's
            tier = low_file.tier
        else:
            tier = low_file.tier if low_file is not None else self.rules.classify(p)
            if self.link and mtime == PROXY_MTIME_NS:
                # renamed or copied with its times: the mtime the view records for it
                got = self.recorded.of(self.m, self._txn, self._root, digest, self._gone)
                mtime = got if got is not None else mtime
        return Entry(name, Kind.FILE, mode, size, mtime, digest, b"", tier)

    def _mode(self, dfd: int, name: bytes, st: os.stat_result, hit: bool) -> int:
        """The file's mode as its ACL allows (`posixacl.mode_at`, an xattr read). On a stat-cache
        hit the mode narrowed last time is kept when its ctime and bits are the same (an ACL
        change moves ctime); stored only outside the racy window, like the digests."""
        perm = stat.S_IMODE(st.st_mode)
        if not perm & 0o070:
            return perm  # nothing for an ACL to narrow (mode_at would not read it either)
        known = self.modes.get(st.st_ino)
        if hit and known is not None and known[:2] == (st.st_ctime_ns, perm):
            return known[2]
        mode = posixacl.mode_at(dfd, name, perm)
        if time.time_ns() - st.st_ctime_ns > self.racy_ns:
            self.modes[st.st_ino] = (st.st_ctime_ns, perm, mode)
        return mode

    def _gone(self, p: bytes) -> bool:
        """Did the session remove or replace the view's file at `p` (nothing there now, or no
        longer a proxy's link)?"""
        names = p.split(b"/")
        try:
            fd = open_target(self.top, self.ident)
        except OSError:
            return False
        try:
            for name in names[:-1]:
                nfd = os.open(name, DIRFLAGS, dir_fd=fd)
                os.close(fd)
                fd = nfd
            st = os.lstat(names[-1], dir_fd=fd)
        except (FileNotFoundError, NotADirectoryError):
            return True
        except OSError:
            return False
        finally:
            os.close(fd)
        return not stat.S_ISREG(st.st_mode) or st.st_mtime_ns != PROXY_MTIME_NS

    def _hash(
        self,
        dfd: int,
        name: bytes,
        st: os.stat_result,
        low: Entry | None,
        stage: Stage,
        res: SyncResult,
    ) -> tuple[bytes, int, os.stat_result]:
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
        for _ in range(3):
            try:
                fd = os.open(name, flags, dir_fd=dfd)
            except PermissionError:
                # mode 000 and the like: the owner may read it after a chmod it undoes at once
                os.chmod(name, stat.S_IMODE(st.st_mode) | 0o400, dir_fd=dfd, follow_symlinks=False)
                try:
                    fd = os.open(name, flags, dir_fd=dfd)
                finally:
                    os.chmod(name, stat.S_IMODE(st.st_mode), dir_fd=dfd, follow_symlinks=False)
            try:
                before = os.fstat(fd)
                # A write still copying was stamped before `before`: `after` would not show it.
                wait_for_writes(fd)
                if low is not None and before.st_size == low.size:
                    digest, size = hash_fd(fd)
                    if digest != low.digest:
                        os.lseek(fd, 0, os.SEEK_SET)
                        digest, size, _new = stage.add_fd(fd)
                else:
                    digest, size, _new = stage.add_fd(fd)
                after = os.fstat(fd)
            finally:
                os.close(fd)
            res.files_hashed += 1
            sig = (after.st_size, after.st_mtime_ns, after.st_ctime_ns)
            if (
                sig == (before.st_size, before.st_mtime_ns, before.st_ctime_ns)
                and size == after.st_size
            ):
                if time.time_ns() - after.st_ctime_ns > self.racy_ns:
                    self.cache[after.st_ino] = (*sig, digest)
                return digest, size, after
            st = after
        raise Unstable()


@contextlib.contextmanager
def _given_back(fd: int, mode: int | None) -> Iterator[None]:
    """The block, then the directory `fd`'s permission bits `mode` back (`files.let_search`
    gave it u+rwx so that names could be looked up in it), if it said any."""
    try:
        yield
    finally:
        if mode is not None:
            with contextlib.suppress(OSError):
                os.fchmod(fd, mode)


@contextlib.contextmanager
def _closing_fd(fd: int) -> Iterator[int]:
    try:
        yield fd
    finally:
        os.close(fd)


def _below_any(p: bytes, among: set[bytes], *, strict: bool) -> bool:
    """Is p equal to (unless strict) or below one of the paths `among`? Looks up p's own
    ancestors (as many as it has components), never the whole set: a tick with 10,000 changed
    files in one directory once compared every pair of them (15 s for 20,000)."""
    if not strict and p in among:
        return True
    if p and b"" in among:
        return True
    i = p.find(b"/")
    while i >= 0:
        if p[:i] in among:
            return True
        i = p.find(b"/", i + 1)
    return False


def _parent(rel: bytes) -> bytes:
    i = rel.rfind(b"/")
    return rel[:i] if i >= 0 else b""


SUBTREE = 2
