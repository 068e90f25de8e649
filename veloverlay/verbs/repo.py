"""The library's verbs over one store: what the CLI calls (it only parses and renders).

`Repo.open(path)` joins the object store and the manifest database; each method is one verb.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
from pathlib import Path
from typing import IO, Any

from veloverlay import faults, paths
from veloverlay.errors import Reason, VeloError
from veloverlay.files import read_regular
from veloverlay.progress import Progress
from veloverlay.records import Record
from veloverlay.store import reserve
from veloverlay.store.cas import Store, default_store_path
from veloverlay.store.changes import Change, changes
from veloverlay.store.manifest import MIN_PREFIX, Commit, Manifests, Ref, Tag, check_revision
from veloverlay.store.patch import TEXT_LIMIT, entry_mode, object_lines, unified
from veloverlay.store.tree import Entry, Kind, Op, OpKind
from veloverlay.tiers import Rule, Rules
from veloverlay.verbs.gc import RefFootprint

__all__ = ["Repo", "LsEntry", "Change", "entry_dict", "op_to_dict", "TEXT_LIMIT", "remove_store"]


class LsEntry(Record, frozen=True):
    path: bytes
    kind: str
    mode: int
    size: int
    mtime_ns: int
    digest: str | None
    target: str | None
    tier: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": os.fsdecode(self.path),
            "kind": self.kind,
            "mode": f"{self.mode:04o}",
            "size": self.size,
            "mtime_ns": self.mtime_ns,
            "digest": self.digest,
            "target": self.target,
            "tier": self.tier,
        }


def _ls_entry(path: bytes, e: Entry) -> LsEntry:
    return LsEntry(
        path,
        e.kind.name.lower(),
        e.mode,
        e.size,
        e.mtime_ns,
        e.digest.hex() if e.kind in (Kind.FILE, Kind.DIR) else None,
        os.fsdecode(e.target) if e.kind is Kind.SYMLINK else None,
        e.tier,
    )


class Repo:
    def __init__(self, store: Store, manifests: Manifests) -> None:
        self.store = store
        self.m = manifests

    @classmethod
    def open(cls, path: str | None = None, *, create: bool = False, shared: bool = False) -> Repo:
        """The store at `path`; `create` makes it if missing (private unless `shared`)."""
        root = path or os.fspath(default_store_path())
        if not create:
            store = Store.open(root)
            return cls(store, Manifests(store))
        opened: list[Manifests] = []  # an existing store's: its schema judged before any write
        try:
            store = Store.init(root, shared=shared, judge=lambda s: opened.append(Manifests(s)))
        except BaseException:
            for m in opened:
                m.close()
            raise
        return cls(store, opened[0] if opened else Manifests(store))

    def close(self) -> None:
        self.m.close()

    # -- reading -----------------------------------------------------------------------------
    def refs(self) -> list[tuple[Ref, Commit]]:
        with self.m.read() as txn:
            return [(r, self.m.get_commit(txn, r.head)) for r in self.m.refs(txn)]

    def ls(self, spec: str, path: str = "/", *, recursive: bool = False) -> list[LsEntry]:
        key = paths.parse_user_path(path)
        with self.m.read() as txn:
            _ref, commit = self.m.resolve(txn, spec)
            root = bytes.fromhex(commit.root)
            e = self.m.lookup(txn, root, key)
            if e is None:
                raise VeloError(
                    f"{spec}: no such path {paths.display(key)}", reason=Reason.NOT_FOUND
                )
            if e.kind is Kind.FILE and paths.names_a_directory(path):
                raise paths.not_a_directory(spec, key)
            if e.kind is not Kind.DIR:
                return [_ls_entry(key, e)]
            if recursive:  # in name order, each directory followed by what it holds (find's)
                out = []
                stack = [(key, iter(self.m.get_node(txn, e.digest).entries))]
                while stack:
                    base, entries = stack[-1]
                    ent = next(entries, None)
                    if ent is None:
                        stack.pop()
                        continue
                    p = paths.join(base, ent.name)
                    if ent.kind is Kind.DIR:
                        child = self.m.get_node(txn, ent.digest)
                        ent = ent.replace(mode=child.mode, mtime_ns=child.mtime_ns)
                        stack.append((p, iter(child.entries)))
                    out.append(_ls_entry(p, ent))
                return out
            node = self.m.get_node(txn, e.digest)
            out = []
            for ent in node.entries:
                if ent.kind is Kind.DIR:
                    child = self.m.get_node(txn, ent.digest)
                    ent = Entry(ent.name, Kind.DIR, child.mode, 0, child.mtime_ns, ent.digest)
                out.append(_ls_entry(paths.join(key, ent.name), ent))
            return out

    def cat(self, spec: str, path: str, out: IO[bytes]) -> int:
        """Write a file's bytes to `out`, verified as they go: a damaged object ends with
        OBJECT_CORRUPT (after what was written; the caller's exit status says so)."""
        key = paths.parse_user_path(path)
        with self.store.read_lock():  # gc waits: the object stays while it is read
            with self.m.read() as txn:
                _ref, commit = self.m.resolve(txn, spec)
                e = self.m.lookup(txn, bytes.fromhex(commit.root), key)
            if e is None or e.kind is Kind.MASK:
                raise VeloError(
                    f"{spec}: no such path {paths.display(key)}", reason=Reason.NOT_FOUND
                )
            if e.kind is not Kind.FILE:
                raise VeloError(
                    f"{spec}: {paths.display(key)} is a {e.kind.name.lower()}, not a file",
                    reason=Reason.BAD_PATH,
                )
            if paths.names_a_directory(path):
                raise paths.not_a_directory(spec, key)
            n = 0
            for chunk in self.store.stream_object(e.digest, e.size):
                out.write(chunk)
                n += len(chunk)
            return n

    def diff(self, a: str, b: str) -> list[Op]:
        with self.m.read() as txn:
            _ra, ca = self.m.resolve(txn, a)
            _rb, cb = self.m.resolve(txn, b)
            return self.m.diff(txn, bytes.fromhex(ca.root), bytes.fromhex(cb.root))

    def reading(self) -> contextlib.AbstractContextManager[None]:
        """The store lock, shared, for a caller that resolves versions and then reads their
        objects in several calls (`changes`, then `patch` per change): gc waits meanwhile."""
        return self.store.read_lock()

    def changes(self, a: str, b: str) -> list[Change]:
        """What changed from version `a` to version `b` (store/changes.py)."""
        with self.m.read() as txn:
            _ra, ca = self.m.resolve(txn, a)
            _rb, cb = self.m.resolve(txn, b)
            return changes(self.m, txn, bytes.fromhex(ca.root), bytes.fromhex(cb.root))

    def patch(self, change: Change, *, context: int = 3) -> list[str] | None:
        """The unified diff (git's format) of a change's content; None when either side is
        binary or larger than TEXT_LIMIT. A symlink's content is its target. It holds the
        store lock (shared) while it reads the two objects, so gc cannot delete one half way;
        a caller that got `change` from `changes` takes `reading()` around both, or a gc
        that ran in between may have dropped the versions (`object-missing`)."""
        with self.store.read_lock():
            old = object_lines(self.store, change.old)
            new = object_lines(self.store, change.new)
        return unified(
            os.fsdecode(change.path),
            old,
            new,
            old_exists=entry_mode(change.old) is not None,  # a MASK is no content: /dev/null
            new_exists=entry_mode(change.new) is not None,
            context=context,
        )

    def log(self, name: str, limit: int | None = None) -> list[Commit]:
        with self.m.read() as txn:
            return self.m.log(txn, name, limit)

    def resolve_root(self, spec: str) -> bytes:
        with self.m.read() as txn:
            return bytes.fromhex(self.m.resolve(txn, spec)[1].root)

    def explain_tier(self, path: str, ref: str | None = None) -> tuple[int, Rule | None, Rules]:
        rules = Rules.default()
        if ref is not None:
            with self.m.read() as txn:
                rules = Rules.from_json(self.m.require_ref(txn, ref).tiers)
        tier, rule = rules.explain(paths.parse_user_path(path))
        return tier, rule, rules

    # -- writing -----------------------------------------------------------------------------
    def checkout(
        self,
        spec: str,
        dest: str,
        *,
        progress: Progress | None = None,
        keep_setid: bool = False,
    ) -> int:
        from veloverlay.files import given_path
        from veloverlay.lower.homes import refuse_inside
        from veloverlay.store.checkout import checkout
        from veloverlay.store.dest import resolve_dest

        hint = "check out somewhere outside it"
        refuse_inside(
            resolve_dest(given_path(dest, "the checkout destination")),
            self.store.root,
            what="the destination",
            hint=hint,
        )
        # The store lock, shared: gc waits, so the version resolved here keeps its objects.
        with self.store.read_lock(), self.m.read() as txn:
            _ref, commit = self.m.resolve(txn, spec)
            root = bytes.fromhex(commit.root)
            return checkout(
                self.store, self.m, txn, root, dest, progress=progress, keep_setid=keep_setid
            )

    def _rollback_spec(self, txn: Any, name: str, version: int | str) -> str:
        """The version spec `rollback` means by `version`."""
        if isinstance(version, str) and not version.isdigit():
            return version
        n = int(version)
        back = f"{name}@{{{n}}}"
        cid = None
        if isinstance(version, str) and len(version) >= MIN_PREFIX:
            with contextlib.suppress(VeloError):  # none, or ambiguous among commits
                cid = self.m.commit_by_prefix(txn, version)
        if cid is None:
            if n < 1:
                raise VeloError("rollback needs N >= 1", reason=Reason.USAGE)
            return back
        try:
            self.m.resolve(txn, back)
        except VeloError:
            return cid  # the log is not that long: the digits begin a commit id
        raise VeloError(
            f"{version} is both {n} versions back and a commit id prefix",
            reason=Reason.USAGE,
            hint=f"write {back} for N versions back, or more digits of the commit id",
        )

    def rollback(self, name: str, version: int | str, *, message: str | None = None) -> Commit:
        """Make an earlier version the new head of ref `name` (a new commit: history is kept).

        `version` is N (the version N commits back, as `NAME@{N}`) or any version spec: a tag,
        a commit id or a unique prefix of one, `REF@{n}`. Digits alone are N unless the log is
        not that long and they begin a commit id (ids are hex: 1 prefix in 40 is all digits);
        both at once is ambiguous. The version's recorded projection path comes back with its
        tree (a version that recorded none keeps the current path).

        Like every writer that makes the manifests name what is already stored, it holds the
        store lock shared: gc (exclusive) decides what to delete in one read and deletes it
        later, and would otherwise delete the version this names in between."""
        from veloverlay.session.state import refuse_live_view

        check_revision(name)
        refuse_live_view(self.store, name, doing="roll back")
        with self.store.lock(), self.m.write() as txn:
            ref = self.m.require_ref(txn, name)
            spec = self._rollback_spec(txn, name, version)
            _owner, target = self.m.resolve(txn, spec)
            head = self.m.get_commit(txn, ref.head)
            if target.id == head.id:
                raise VeloError(
                    f"{spec} is already the head of {name}",
                    reason=Reason.USAGE,
                    hint=f"'veloverlay log {name}' lists its versions",
                )
            delta = self.m.diff(txn, bytes.fromhex(head.root), bytes.fromhex(target.root))
            return self.m.commit(
                txn,
                ref.name,
                bytes.fromhex(target.root),
                expect_head=ref.head,
                message=message or f"rollback to {spec} ({target.id[:12]})",
                delta=delta,
                path=target.path,
            )

    # -- tags: named versions ----------------------------------------------------------------
    def tag(self, name: str, version: str, *, message: str = "") -> tuple[Tag, Commit]:
        """Name a version (any spec `resolve` takes); gc keeps it (the store lock: see
        `rollback`). The tag and its commit, as `tags` lists them."""
        with self.store.lock(), self.m.write() as txn:
            _ref, commit = self.m.resolve(txn, version)
            return self.m.put_tag(txn, name, commit.id, message=message), commit

    def tags(self) -> list[tuple[Tag, Commit]]:
        with self.m.read() as txn:
            return [(t, self.m.get_commit(txn, t.commit)) for t in self.m.tags(txn)]

    def delete_tag(self, name: str) -> None:
        def attempt() -> None:
            with self.m.write() as txn:
                if not self.m.delete_tag(txn, name):
                    raise VeloError(
                        f"no tag named '{name}'",
                        reason=Reason.NOT_FOUND,
                        hint="'veloverlay tag' lists the tags",
                    )

        reserve.freeing(self.store, attempt)  # a way to free space: works on a full disk

    def delete_ref(self, name: str, *, grace: float = 3600.0) -> RefFootprint:
        """Delete ref `name` (its tags stay). Returns what that frees and when: its objects that
        nothing else keeps go at the first `gc` once older than `grace` (gc's default).

        Under the store lock, shared, as every ref writer: gc, `fsck --repair` and
        `remove-store` (exclusive) never run in the middle of it. gc counts the refs and, with
        --accept-lost-refs, writes that count to the store record: a delete in between left the
        record above the truth (refs-lost at the next gc); remove-store removed the store under
        a delete that then made remote-v1/ in it again."""
        from veloverlay.session.state import refuse_live_view

        check_revision(name)
        refuse_live_view(self.store, name, doing="delete")
        with self.store.lock():
            return self._delete_ref(name, grace)

    def _delete_ref(self, name: str, grace: float) -> RefFootprint:
        from veloverlay.ingest.pipeline import drop_cache
        from veloverlay.remote.state import Versions
        from veloverlay.verbs.gc import ref_footprint

        fp = ref_footprint(self.store, self.m, name, grace=grace)

        # The notes of where it came from go first: a crash (or a failed delete) in between
        # leaves the ref without them, and a pull of it then needs --force, the safe side. The
        # other order leaves notes without their ref, and a note of an earlier version (no
        # lineage) would vouch for a ref made later under the name (remote.state.Versions).
        def attempt() -> None:
            with self.m.write() as txn:
                if not self.m.delete_ref(txn, name):
                    raise VeloError(f"no ref named '{name}'", reason=Reason.NOT_FOUND)
                drop_cache(self.m, txn, name)

        # The notes' lock is held until the ref is gone: a pull or push that read the ref
        # before and notes it meanwhile waits for it, then finds the ref gone and notes
        # nothing (a note written after a second forget named a ref that was gone).
        with Versions(self.store).forgetting(name):
            faults.point("refs.delete.forgotten")
            # the documented way out of a full disk (delete refs, then gc) must work on one:
            # LMDB needs free pages even to delete, which the store's reserve gives (reserve.py)
            reserve.freeing(self.store, attempt)
        return fp

    def disk_usage(self) -> dict[str, dict[str, int]]:
        """Disk use of the store by part (see `Store.disk_usage`), plus `per-boot-cache`: this
        user's layers of this store in the per-boot cache (memory when it is a tmpfs), and
        `total` (the store's parts)."""
        from veloverlay.store.usage import disk_usage, tree_usage

        parts = disk_usage(self.store)
        total = {k: sum(p[k] for p in parts.values()) for k in ("files", "dirs", "bytes")}
        from veloverlay.lower.homes import boot_dir

        cache = boot_dir(self.store.root, create=False)  # a look makes none
        if cache is not None:
            part = {"files": 0, "dirs": 0, "bytes": 0}
            tree_usage(os.fspath(cache), part, set())
            parts["per-boot-cache"] = part
        parts["total"] = total
        return parts


_HEX2 = re.compile(r"^[0-9a-f]{2}\Z")


def remove_store(path: str | os.PathLike[str], *, force: bool = False) -> dict[str, int]:
    """Remove a whole store: its objects (clearing `chattr +i`, which `rm -rf` cannot), layers,
    sessions, manifests, and this user's per-boot cache of it. Refuses a directory that is not a
    veloverlay store, a store another veloverlay process holds (LOCKED), and one with sessions
    that are live or not yet harvested (their work would be lost) unless `force`.

    Crash-safe in the sense that matters: what names the directory a store (its objects, the
    manifest database, CACHEDIR.TAG) goes last, so a removal killed at any point leaves what a
    rerun recognises and finishes; the remains of an older removal killed in another order (only
    the lock file and parts a store is made of) are recognised too.
    Returns {"files", "dirs", "bytes"} removed."""
    from veloverlay import fsflags
    from veloverlay.lower.homes import boot_dir
    from veloverlay.verbs.gc import unfinished_ids

    store = _open_for_removal(path)
    tag = store.root / "CACHEDIR.TAG"
    try:
        ours = b"veloverlay" in read_regular(tag, 4096)
    except (OSError, ValueError):  # none, or not a regular file: a FIFO is never read
        ours = False
    try:
        shards = os.listdir(store.objects)
    except FileNotFoundError:
        shards = []
    # what `rm -rf` leaves of a root store: fan-out directories holding +i objects
    left_over = bool(shards) and all(_HEX2.match(n) for n in shards)
    remains = _remains_of_store(store.root)
    if not (ours or (store.db_path / "data.mdb").is_file() or left_over or remains):
        raise VeloError(
            f"{store.root} does not look like a veloverlay store (no CACHEDIR.TAG of ours, no "
            "manifest database, objects that are not named as ours)",
            reason=Reason.STORE_MISSING,
        )
    from veloverlay.store.usage import disk_usage

    usage = disk_usage(store)
    total = {k: sum(p[k] for p in usage.values()) for k in ("files", "dirs", "bytes")}
    with store.lock(exclusive=True, wait=False):
        if not force and unfinished_ids(store):  # (one whose state names no roots too)
            raise VeloError(
                f"the store at {store.root} has sessions that are live or not yet harvested",
                reason=Reason.SESSION_ACTIVE,
                hint="end or harvest them first ('veloverlay sessions'), or pass --force to "
                "lose their changes",
            )
        cache = boot_dir(store.root, create=False)
        if cache is not None:
            _remove_tree(os.fspath(cache), fsflags)
        for entry in sorted(os.scandir(store.root), key=_removal_order):
            if entry.name != "lock":
                _remove_tree(entry.path, fsflags)
                faults.point("remove.entry")
        # The lock file last, while it is still held: a verb that waited for it then finds
        # the store gone (STORE_MISSING), instead of locking after the release and going on.
        _remove_tree(os.fspath(store.root), fsflags)
    return total


# Removed last, in this order: what makes a directory recognisably a store.
_IDENTITY = ("objects-v1", "objects-v2", "manifests.lmdb", "CACHEDIR.TAG")


def _removal_order(entry: os.DirEntry[str]) -> tuple[int, str]:
    rank = _IDENTITY.index(entry.name) + 1 if entry.name in _IDENTITY else 0
    return rank, entry.name


def _open_for_removal(path: str | os.PathLike[str]) -> Store:
    """The store at `path`, also when a killed removal took its objects directory already."""
    try:
        return Store.open(path)
    except VeloError as exc:
        if exc.reason is not Reason.STORE_MISSING or not _remains_of_store(Path(path)):
            raise
    store = Store(path)
    store.check_safe()
    return store


def _remains_of_store(root: Path) -> bool:
    """Does `root` hold the lock file and nothing but parts a store is made of (what a killed
    `remove-store` leaves)? A directory holding anything else is not taken for one."""
    from veloverlay.store.access import TOP_DIRS, TOP_FILES

    parts = {*TOP_DIRS, *(n for n in TOP_FILES if "/" not in n), "CACHEDIR.TAG", ".gitignore"}
    generic = {"lock", "tmp", "sessions", ".gitignore"}  # names other programs use too
    try:
        names = set(os.listdir(root))
        lock = os.lstat(root / "lock")
    except (FileNotFoundError, NotADirectoryError):
        return False
    if not stat.S_ISREG(lock.st_mode) or lock.st_size or not names <= parts:
        return False  # (the store lock is an empty file)
    return names == {"lock"} or bool(names - generic)


def _remove_tree(path: str, fsflags: Any) -> None:
    """rm -rf that clears +i and opens up 0555/000 directories on its way, by descriptor
    (files.force_rmtree: never through a symbolic link, never by a path re-resolved later)."""
    from veloverlay.files import force_rmtree

    force_rmtree(path, unflag=fsflags.make_mutable)


def entry_dict(path: bytes, e: Entry) -> dict[str, Any]:
    return _ls_entry(path, e).to_dict()


def op_to_dict(op: Op) -> dict[str, Any]:
    d: dict[str, Any] = {"op": op.kind.value, "path": os.fsdecode(op.path)}
    if op.entry is not None:
        d.update(_ls_entry(op.path, op.entry).to_dict())
    elif op.kind is OpKind.META:
        d.update({"mode": f"{op.mode:04o}", "mtime_ns": op.mtime_ns})
    return d
