"""What both backends share when they turn a session's files into path operations: the leaf
comparison, symlinks and special files as leaves, symlinks into the store read back as Tier-1
files, and a stacked session's change restated on its top ref.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
from collections.abc import Callable, Sequence
from pathlib import Path

from veloverlay import paths, pathtrust
from veloverlay.errors import Reason, VeloError
from veloverlay.store.access import refuse_overlap
from veloverlay.store.cas import Store
from veloverlay.store.dest import claim_dir
from veloverlay.store.manifest import Manifests, Txn
from veloverlay.store.tree import Entry, Kind, Op, OpKind
from veloverlay.tiers import Rules

__all__ = [
    "RecordedMtimes",
    "SetAside",
    "StoreLinks",
    "kept_in_bounds",
    "leaf_op",
    "other_leaf",
    "setid_kept",
    "without_minted_setid",
    "to_top_ref",
]

# At most this many of a content's stored paths are looked up to tell which one a program moved
_CANDIDATES = 64


_SETID = stat.S_ISUID | stat.S_ISGID


def setid_kept(mode: int, digest: bytes, low: Entry | None) -> bool:
    """May a harvested file keep its setuid/setgid bits? Only where the view's file at its path
    had the same bits AND the same content. New content under kept bits (a command that writes
    its own program over a setuid file and sets `u+s` again) is a setuid program the session
    made: as ingest does unless asked, a session does not mint one, since a root checkout
    (`--keep-setid`) or a root session of the ref would later run it as root."""
    return (
        low is not None
        and low.kind is Kind.FILE
        and low.mode & _SETID == mode & _SETID
        and low.digest == digest
    )


def without_minted_setid(e: Entry | None, low: Entry | None) -> tuple[Entry | None, bool]:
    """`e` (an `other_leaf`: a copied Tier-1 store link is a FILE with the mode the view
    records for its object) without setuid/setgid bits `setid_kept` does not keep, and whether
    any were removed: `cp -a` of a setuid Tier-1 file to another path is a new setuid file,
    as a copy of a Tier-2 one is."""
    if e is None or e.kind is not Kind.FILE or not e.mode & _SETID:
        return e, False
    if setid_kept(e.mode, e.digest, low):
        return e, False
    return e.replace(mode=e.mode & ~_SETID), True


class RecordedMtimes:
    """Where every Tier-2 file shows the proxies' normalised mtime (the overlay links form, the
    shim's `--link`), a file a program renamed or copied with its times (`mv`, `cp -a`, `mv` of a
    directory across EXDEV) arrives at a new path with that mtime. It stood for the mtime the
    view records for that content, which is what `mv` or `cp -a` keeps in a plain directory: the
    file gets it back. When the view has that content at several paths with different mtimes,
    the one the session removed (`gone`) decides; still ambiguous, the normalised mtime stays.
    Built on first need by one walk of the view: most sessions move no file."""

    def __init__(self) -> None:
        self._root: bytes | None = None
        self._by_digest: dict[bytes, list[tuple[bytes, int]]] = {}

    def of(
        self, m: Manifests, txn: Txn, root: bytes, digest: bytes, gone: Callable[[bytes], bool]
    ) -> int | None:
        if root != self._root:
            self._root = root
            self._by_digest = {}
            for p, e, _n in m.walk(txn, root):
                if e.kind is Kind.FILE and e.tier == 2:
                    self._by_digest.setdefault(e.digest, []).append((p, e.mtime_ns))
        found = self._by_digest.get(digest)
        if not found:
            return None
        mtimes = {t for _p, t in found}
        if len(mtimes) > 1:
            mtimes = {t for p, t in found[:_CANDIDATES] if gone(p)}
        return mtimes.pop() if len(mtimes) == 1 else None


class SetAside:
    """Where `harvest --resume ID --set-aside DIR` puts what a session made too deep to keep
    (a path over paths.PATH_MAX bytes or paths.DEPTH_MAX levels): each such entry, with all it
    holds, is renamed out of the session's files into `DIR/<n>/<name>`, and said in a warning
    with its whole path; the rest is committed. DIR is made new (0700) at the first such entry,
    on the filesystem of the session's files (a rename: nothing is copied, nothing can be half
    moved)."""

    def __init__(self, where: str, store_root: Path) -> None:
        from veloverlay.files import given_path

        self.where = os.path.abspath(given_path(where, "--set-aside", hint="name a new directory"))
        self.count = 0
        self._fd: int | None = None
        # Never in the store: the one copy of what is set aside would be the store's (in a
        # fan-out directory fsck fails on it as stray objects; `remove-store` deletes it).
        parent, name = os.path.split(self.where)
        # resolved once (root follows no other user's link into what that user does not own)
        # and made through its pinned parent (`claim_dir`): never where a swap since leads
        self.real = os.path.join(pathtrust.realpath_safe(parent, Reason.TARGET_INVALID), name)
        refuse_overlap(
            self.real,
            store_root,
            what="--set-aside",
            hint="name a new directory outside the store, on the filesystem of the session's files",
        )

    def check(self, files: str) -> None:
        """Refuse, before anything is harvested, a DIR that exists or that no rename from
        `files` (the session's upper dir or materialised tree) can reach."""
        if os.path.lexists(self.where):
            raise VeloError(
                f"--set-aside {self.where} exists",
                reason=Reason.EXISTS,
                hint="name a new directory (it is made, 0700, only if something is set aside)",
                path=self.where,
            )
        parent = os.path.dirname(self.where)
        try:
            dev = os.stat(parent).st_dev
        except OSError as exc:
            raise VeloError(
                f"--set-aside: its parent {parent} cannot be used: {exc.strerror}",
                reason=Reason.TARGET_INVALID,
                path=parent,
            ) from exc
        if dev != os.stat(files).st_dev:
            raise VeloError(
                f"--set-aside {self.where} is not on the filesystem of the session's files "
                f"({files}): they are moved there, never copied",
                reason=Reason.TARGET_INVALID,
                hint=f"name a new directory on {files}'s filesystem (outside the store)",
                path=self.where,
            )

    def move(self, dfd: int, name: bytes, p: bytes, warnings: list[str]) -> None:
        """Rename `name` of the directory `dfd` (at manifest path `p`) into a new slot."""
        if self._fd is None:
            fd, created = claim_dir(self.real, 0o700)
            if not created:  # made meanwhile, by someone else: not ours to fill
                os.close(fd)
                raise VeloError(
                    f"--set-aside {self.where} exists", reason=Reason.EXISTS, path=self.where
                )
            self._fd = fd
        self.count += 1
        slot = str(self.count)
        os.mkdir(slot, 0o700, dir_fd=self._fd)
        sfd = os.open(slot, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=self._fd)
        try:
            _rename_out(dfd, name, sfd)
        finally:
            os.close(sfd)
        depth, length = p.count(b"/") + 1, len(p)
        warnings.append(
            f"set aside, NOT committed: {paths.display(p)} ({depth} levels, a path of {length} "
            f"bytes: too deep to keep) is now {self.where}/{slot}/{paths.display(name)}"
        )

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _rename_out(dfd: int, name: bytes, sfd: int) -> None:
    """rename(2) `name` from `dfd` into `sfd`. A directory the session made read-only (0555, or
    a 0555 entry that is a directory: its `..` changes) gets u+w for the rename, then its mode
    back (a non-root owner needs write permission on both)."""
    try:
        os.rename(name, name, src_dir_fd=dfd, dst_dir_fd=sfd)
        return
    except PermissionError:
        pass
    parent_mode = stat.S_IMODE(os.fstat(dfd).st_mode)
    st = os.lstat(name, dir_fd=dfd)
    is_dir = stat.S_ISDIR(st.st_mode)
    os.fchmod(dfd, parent_mode | stat.S_IRWXU)
    try:
        if is_dir:
            os.chmod(name, stat.S_IMODE(st.st_mode) | stat.S_IRWXU, dir_fd=dfd)
        os.rename(name, name, src_dir_fd=dfd, dst_dir_fd=sfd)
        if is_dir:
            os.chmod(name, stat.S_IMODE(st.st_mode), dir_fd=sfd)
    finally:
        os.fchmod(dfd, parent_mode)


def kept_in_bounds(
    dfd: int, name: bytes, p: bytes, aside: SetAside | None, warnings: list[str]
) -> bool:
    """Whether the entry `name` of `dfd`, at manifest path `p`, is within the bounds a tree is
    kept in (paths.bounded). One beyond them is set aside (False) with `aside`; without it the
    harvest stops with `too-deep`, naming the whole path (the error's `path`)."""
    try:
        paths.bounded(p)
    except VeloError as exc:
        if aside is None:
            raise VeloError(
                exc.message, reason=exc.reason, hint=exc.hint, path=os.fsdecode(p)
            ) from None
        aside.move(dfd, name, p, warnings)
        return False
    return True


class StoreLinks:
    """A symlink into the store that a program copied (`cp -a`, npm) from a Tier-1 entry: the
    program meant to keep the file, so it is harvested back into a FILE entry of that object,
    with the mode the manifest records. Shared by the overlay harvester and the shim's daemon."""

    def __init__(self, store: Store) -> None:
        self.store = store
        prefixes: set[bytes] = set()
        for objects in (store.objects, store.legacy):  # legacy: a migration is unfinished
            if objects is not None:
                prefixes.add(os.fsencode(objects) + b"/")
                with contextlib.suppress(OSError):
                    prefixes.add(os.fsencode(os.path.realpath(objects)) + b"/")
        self.prefixes = tuple(prefixes)
        self._root: bytes | None = None
        self._modes: dict[bytes, int] = {}

    def object_of(self, target: bytes) -> bytes | None:
        """The digest of the stored object `target` names, or None."""
        for prefix in self.prefixes:
            if target.startswith(prefix):
                mt = re.match(_OBJ_RE, target[len(prefix) :])  # either fan-out (cas.py)
                if (
                    mt
                    and mt.group(1) == mt.group(3)[:2]
                    and mt.group(2) in (None, mt.group(3)[2:4])
                ):
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
        mode = self._mode(m, txn, root, digest)
        if mode is None:
            # Not a Tier-1 file of the projected tree: a link a program made by hand to an
            # object it learnt the name of (maybe one of a tree it may not read) stays a link.
            return None
        size = os.stat(self.store.object_path_b(digest)).st_size
        return Entry(name, Kind.FILE, mode, size, mtime_ns, digest, b"", tier())

    def _mode(self, m: Manifests, txn: Txn, root: bytes, digest: bytes) -> int | None:
        """The mode `root` records for the object as a Tier-1 file (what `cp -a` of the file
        keeps); None if no Tier-1 file of `root` is that object. Built on first need by one walk
        of the root: copies of Tier-1 symlinks are rare."""
        if root != self._root:
            self._root = root
            self._modes = {}
            for _p, e, _n in m.walk(txn, root):
                if e.kind is Kind.FILE and e.tier == 1:
                    self._modes.setdefault(e.digest, e.mode)
        return self._modes.get(digest)


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


_OBJ_RE = rb"^([0-9a-f]{2})/(?:([0-9a-f]{2})/)?([0-9a-f]{64})\Z"  # (compiled at first use)
