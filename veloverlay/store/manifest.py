"""Manifests in LMDB: Merkle nodes, refs, the commit log, and tree operations over them.

This is the only module that imports lmdb. Sub-databases:

    meta      b"schema" -> b"1"
    nodes     digest -> node encoding (tree.py); immutable, content-addressed
    refs      name -> JSON {head, path, tiers, ingest_root}
    commits   commit id -> JSON {parent, root, time_ns, message, session, ref, delta, path}
    tags      name -> JSON {commit, time_ns, message}: named versions (gc keeps them)
    statcache ref \\0 path -> ingest stat cache (ingest.py)
    ids       digest -> short object id (projection.py)

One LMDB write transaction is one atomic commit: a ref update is a compare-and-swap inside it, and
LMDB serialises writers across processes. Nodes are written before the ref that reaches them, in the
same transaction. `apply()` rewrites only the nodes on changed paths; `diff()` descends only into
directories whose digests differ: both cost what the change costs, not what the tree costs.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import time
from collections.abc import Iterable, Iterator
from typing import Any

import lmdb

from veloverlay import faults, paths
from veloverlay.errors import Reason, VeloError
from veloverlay.store import tree
from veloverlay.store.cas import Store
from veloverlay.store.digest import Digest, hash_bytes
from veloverlay.store.tree import Entry, Kind, Node, Op, OpKind
from veloverlay.store.versions import (
    MIN_PREFIX,
    REF_RE,
    Commit,
    Ref,
    Tag,
    Versions,
    check_ref_name,
)

__all__ = [
    "Manifests",
    "Ref",
    "Commit",
    "Tag",
    "Txn",
    "EMPTY_ROOT",
    "REF_RE",
    "MIN_PREFIX",
    "check_ref_name",
]

SCHEMA_VERSION = b"1"
_DEFAULT_MAP_SIZE = 64 << 30
_DELTA_KEEP = 20000

Txn = Any  # lmdb.Transaction (untyped library)

EMPTY_ROOT, _EMPTY_ENC = tree.encode(tree.EMPTY_DIR_MODE, 0, [])


class _Trie:
    __slots__ = ("ops", "children")

    def __init__(self) -> None:
        self.ops: list[Op] = []
        self.children: dict[bytes, _Trie] = {}

    def add(self, names: list[bytes], op: Op) -> None:
        t = self
        for n in names:
            t = t.children.setdefault(n, _Trie())
        if op.kind is OpKind.META:
            t.ops.append(op)
        else:  # PUT/DELETE supersede anything earlier at or below this path
            t.ops = [op]
            t.children = {}


class Manifests(Versions):
    """The manifest database of one store."""

    def __init__(self, store: Store, *, readonly: bool = False) -> None:
        self.store = store
        map_size = int(os.environ.get("VELO_MAP_SIZE", _DEFAULT_MAP_SIZE))
        try:
            if not readonly:
                store.db_path.mkdir(exist_ok=True)
            self.env = lmdb.open(
                os.fspath(store.db_path),
                map_size=map_size,
                max_dbs=8,
                readonly=readonly,
                lock=True,
                max_readers=512,
            )
        except lmdb.Error as exc:
            raise _lmdb_error(exc, store) from exc
        except PermissionError as exc:
            raise VeloError(
                f"cannot open the manifest database: {exc.strerror}",
                reason=Reason.STORE_PERMISSION,
                path=store.db_path,
            ) from exc
        try:
            self._meta = self.env.open_db(b"meta", create=not readonly)
            self._nodes = self.env.open_db(b"nodes", create=not readonly)
            self._refs = self.env.open_db(b"refs", create=not readonly)
            self._commits = self.env.open_db(b"commits", create=not readonly)
            self.statcache = self.env.open_db(b"statcache", create=not readonly)
            self.ids = self.env.open_db(b"ids", create=not readonly)
            self._tags = self._open_optional(b"tags", readonly)
        except lmdb.Error as exc:
            raise _lmdb_error(exc, store) from exc
        self._cache: dict[bytes, Node] = {}
        if not readonly:
            with self.write() as txn:
                v = txn.get(b"schema", db=self._meta)
                if v is None:
                    txn.put(b"schema", SCHEMA_VERSION, db=self._meta)
                    txn.put(EMPTY_ROOT, _EMPTY_ENC, db=self._nodes)
        self._check_schema()

    def _open_optional(self, name: bytes, readonly: bool) -> Any:
        """A sub-database added after schema 1 (a read-only open of an older store has none:
        None, read as empty)."""
        try:
            return self.env.open_db(name, create=not readonly)
        except lmdb.NotFoundError:
            return None

    def _check_schema(self) -> None:
        with self.read() as txn:
            v = txn.get(b"schema", db=self._meta)
        if v is not None and v != SCHEMA_VERSION:
            raise VeloError(
                f"manifest schema {v.decode(errors='replace')} is not supported (this is "
                f"{SCHEMA_VERSION.decode()})",
                reason=Reason.MANIFEST_SCHEMA,
                hint="use the veloverlay version that created this store",
            )

    def close(self) -> None:
        self.env.close()

    # -- transactions --------------------------------------------------------------------------
    @contextlib.contextmanager
    def read(self) -> Iterator[Txn]:
        with self.env.begin(write=False) as txn:
            yield txn

    @contextlib.contextmanager
    def write(self) -> Iterator[Txn]:
        try:
            with self.env.begin(write=True) as txn:
                yield txn
        except lmdb.MapFullError as exc:
            raise VeloError(
                "the manifest database is full (LMDB map size reached); nothing was committed",
                reason=Reason.MAP_FULL,
                hint="set VELO_MAP_SIZE to a larger value (bytes) and retry",
            ) from exc
        except lmdb.DiskError as exc:
            raise VeloError(
                "the disk is full while committing; nothing was committed",
                reason=Reason.STORE_FULL,
            ) from exc
        except lmdb.Error as exc:
            if "No space" in str(exc):
                raise VeloError(
                    "the disk is full while committing; nothing was committed",
                    reason=Reason.STORE_FULL,
                ) from exc
            raise

    # -- nodes ---------------------------------------------------------------------------------
    def get_node(self, txn: Txn, digest: bytes) -> Node:
        node = self._cache.get(digest)
        if node is not None:
            return node
        data = txn.get(digest, db=self._nodes)
        if data is None:
            raise VeloError(
                f"directory node {digest.hex()} is missing",
                reason=Reason.MANIFEST_CORRUPT,
                hint="run 'veloverlay fsck'",
            )
        node = tree.decode(bytes(data))
        if len(self._cache) > 200_000:
            self._cache.clear()
        self._cache[digest] = node
        return node

    def has_node(self, txn: Txn, digest: bytes) -> bool:
        return digest in self._cache or txn.get(digest, db=self._nodes) is not None

    def put_node(self, txn: Txn, mode: int, mtime_ns: int, entries: Iterable[Entry]) -> Digest:
        digest, data = tree.encode(mode, mtime_ns, entries)
        txn.put(digest, data, db=self._nodes, overwrite=False)
        return digest

    def put_raw_node(self, txn: Txn, digest: bytes, data: bytes) -> None:
        txn.put(digest, data, db=self._nodes, overwrite=False)

    def raw_node(self, txn: Txn, digest: bytes) -> bytes | None:
        v = txn.get(digest, db=self._nodes)
        return bytes(v) if v is not None else None

    def iter_nodes(self, txn: Txn) -> Iterator[tuple[bytes, bytes]]:
        with txn.cursor(db=self._nodes) as cur:
            for k, v in cur:
                yield bytes(k), bytes(v)

    def delete_node(self, txn: Txn, digest: bytes) -> None:
        txn.delete(digest, db=self._nodes)
        self._cache.pop(digest, None)

    # -- path lookups --------------------------------------------------------------------------
    def lookup(self, txn: Txn, root: bytes, path: bytes) -> Entry | None:
        """The entry at `path` (the root itself is a DIR entry with an empty name)."""
        entry = Entry(b"", Kind.DIR, digest=root)
        for name in paths.split(path):
            if entry.kind is not Kind.DIR:
                return None
            found = self.get_node(txn, entry.digest).lookup(name)
            if found is None:
                return None
            entry = found
        return entry

    def walk(
        self, txn: Txn, root: bytes, prefix: bytes = b""
    ) -> Iterator[tuple[bytes, Entry, Node | None]]:
        """Depth-first (pre-order) walk: (path, entry, node if dir)."""
        top = self.get_node(txn, root)
        yield prefix, Entry(b"", Kind.DIR, top.mode, 0, top.mtime_ns, root), top
        stack: list[tuple[bytes, Node]] = [(prefix, top)]
        while stack:
            base, node = stack.pop()
            for e in reversed(node.entries):
                p = paths.join(base, e.name)
                if e.kind is Kind.DIR:
                    child = self.get_node(txn, e.digest)
                    yield p, e.replace(mode=child.mode, mtime_ns=child.mtime_ns), child
                    stack.append((p, child))
                else:
                    yield p, e, None

    def reachable(self, txn: Txn, root: bytes, seen_nodes: set[bytes], objects: set[bytes]) -> None:
        """Add every node and object reachable from `root` (skipping known subtrees)."""
        stack = [root]
        while stack:
            d = stack.pop()
            if d in seen_nodes:
                continue
            seen_nodes.add(d)
            for e in self.get_node(txn, d).entries:
                if e.kind is Kind.DIR:
                    stack.append(e.digest)
                elif e.kind is Kind.FILE:
                    objects.add(e.digest)

    # -- apply and diff ------------------------------------------------------------------------
    def apply(self, txn: Txn, root: bytes, ops: Iterable[Op]) -> Digest:
        """Apply path operations to `root`; only nodes on changed paths are rewritten."""
        trie = _Trie()
        for op in ops:
            trie.add(paths.split(op.path), op)
        meta: tuple[int, int] | None = None
        for op in trie.ops:
            if op.kind is OpKind.PUT:
                if op.entry is None or op.entry.kind is not Kind.DIR:
                    raise VeloError(
                        "the root can only be replaced by a directory", reason=Reason.BAD_PATH
                    )
                root = op.entry.digest
                meta = None
            elif op.kind is OpKind.META:
                meta = (op.mode, op.mtime_ns)
            else:
                raise VeloError("the root cannot be deleted", reason=Reason.BAD_PATH)
        return self._apply_dir(txn, root, trie.children, meta, b"")

    def _apply_dir(
        self,
        txn: Txn,
        digest: bytes,
        children: dict[bytes, _Trie],
        meta: tuple[int, int] | None,
        where: bytes,
    ) -> Digest:
        node = self.get_node(txn, digest)
        mode, mtime = meta if meta is not None else (node.mode, node.mtime_ns)
        if not children and meta is not None and (mode, mtime) == (node.mode, node.mtime_ns):
            return Digest(digest)
        entries = node.as_dict()
        for name, sub in children.items():
            cur = entries.get(name)
            child_meta: tuple[int, int] | None = None
            for op in sub.ops:
                if op.kind is OpKind.DELETE:
                    cur = None
                    child_meta = None
                elif op.kind is OpKind.PUT:
                    assert op.entry is not None
                    cur = op.entry.replace(name=name)
                    child_meta = None
                else:
                    if cur is None or cur.kind is Kind.MASK:
                        raise VeloError(
                            f"cannot change metadata of a missing path "
                            f"{paths.display(paths.join(where, name))}",
                            reason=Reason.NOT_FOUND,
                        )
                    if cur.kind is Kind.DIR:
                        child_meta = (op.mode, op.mtime_ns)
                    else:
                        cur = cur.replace(mode=op.mode, mtime_ns=op.mtime_ns)
            if sub.children or child_meta is not None:
                if cur is None or cur.kind is not Kind.DIR:
                    raise VeloError(
                        f"{paths.display(paths.join(where, name))} is not a directory",
                        reason=Reason.NOT_A_DIRECTORY,
                    )
                new = self._apply_dir(
                    txn, cur.digest, sub.children, child_meta, paths.join(where, name)
                )
                cur = Entry(name, Kind.DIR, digest=new)
            if cur is None:
                entries.pop(name, None)
            else:
                entries[name] = cur
        return self.put_node(txn, mode, mtime, entries.values())

    def diff(self, txn: Txn, a: bytes, b: bytes, prefix: bytes = b"") -> list[Op]:
        """Path operations that turn tree `a` into tree `b`."""
        out: list[Op] = []
        self._diff(txn, a, b, prefix, out)
        return out

    def _diff(self, txn: Txn, a: bytes, b: bytes, prefix: bytes, out: list[Op]) -> None:
        if a == b:
            return
        na, nb = self.get_node(txn, a), self.get_node(txn, b)
        if (na.mode, na.mtime_ns) != (nb.mode, nb.mtime_ns):
            out.append(Op(OpKind.META, prefix, mode=nb.mode, mtime_ns=nb.mtime_ns))
        ea, eb = na.as_dict(), nb.as_dict()
        for name in sorted(ea.keys() | eb.keys()):
            x, y = ea.get(name), eb.get(name)
            if x == y:
                continue
            p = paths.join(prefix, name)
            if y is None:
                out.append(Op(OpKind.DELETE, p))
            elif x is None:
                out.append(Op(OpKind.PUT, p, y))
            elif x.kind is Kind.DIR and y.kind is Kind.DIR:
                self._diff(txn, x.digest, y.digest, p, out)
            elif (
                x.kind is y.kind
                and x.kind is not Kind.MASK
                and x.payload == y.payload
                and x.tier == y.tier
                and x.size == y.size
            ):
                out.append(Op(OpKind.META, p, mode=y.mode, mtime_ns=y.mtime_ns))
            else:
                out.append(Op(OpKind.PUT, p, y))

    # -- refs and commits ----------------------------------------------------------------------
    def get_ref(self, txn: Txn, name: str) -> Ref | None:
        v = txn.get(name.encode(), db=self._refs)
        if v is None:
            return None
        d = json.loads(bytes(v))
        return Ref(name, d["head"], d.get("path"), d.get("tiers"), d.get("ingest_root"))

    def require_ref(self, txn: Txn, name: str) -> Ref:
        ref = self.get_ref(txn, name)
        if ref is None:
            raise VeloError(
                f"no ref named {name!r}",
                reason=Reason.NOT_FOUND,
                hint="'veloverlay refs' lists the refs of this store",
            )
        return ref

    def put_ref(self, txn: Txn, ref: Ref) -> None:
        check_ref_name(ref.name)
        txn.put(ref.name.encode(), ref.to_json(), db=self._refs)

    def delete_ref(self, txn: Txn, name: str) -> bool:
        return bool(txn.delete(name.encode(), db=self._refs))

    def refs(self, txn: Txn) -> list[Ref]:
        out = []
        with txn.cursor(db=self._refs) as cur:
            for k, _v in cur:
                ref = self.get_ref(txn, bytes(k).decode())
                assert ref is not None
                out.append(ref)
        return out

    def get_commit(self, txn: Txn, cid: str) -> Commit:
        v = txn.get(bytes.fromhex(cid), db=self._commits)
        if v is None:
            raise VeloError(f"commit {cid} is missing", reason=Reason.MANIFEST_CORRUPT)
        d = json.loads(bytes(v))
        return Commit(
            cid,
            d["root"],
            d["parent"],
            d["time_ns"],
            d["message"],
            d["session"],
            d["ref"],
            d.get("delta", []),
            d.get("delta_count", 0),
            d.get("path"),
        )

    def iter_commits(self, txn: Txn) -> Iterator[Commit]:
        with txn.cursor(db=self._commits) as cur:
            for k, _v in cur:
                yield self.get_commit(txn, bytes(k).hex())

    def delete_commit(self, txn: Txn, cid: str) -> None:
        txn.delete(bytes.fromhex(cid), db=self._commits)

    def put_commit(
        self,
        txn: Txn,
        *,
        ref: str,
        root: bytes,
        parent: str | None,
        message: str,
        session: str | None = None,
        delta: list[Op] | None = None,
        path: str | None = None,
    ) -> Commit:
        ops = delta or []
        d: dict[str, Any] = {
            "root": root.hex(),
            "parent": parent,
            "time_ns": time.time_ns(),
            "message": message,
            "session": session,
            "ref": ref,
            "delta_count": len(ops),
            "delta": [op.to_json() for op in ops[:_DELTA_KEEP]],
        }
        if path is not None:
            d["path"] = path
        data = json.dumps(d, sort_keys=True).encode()
        cid = hash_bytes(data)
        txn.put(cid, data, db=self._commits)
        return self.get_commit(txn, cid.hex())

    def commit(
        self,
        txn: Txn,
        name: str,
        root: bytes,
        *,
        expect_head: str | None,
        message: str,
        session: str | None = None,
        delta: list[Op] | None = None,
        path: str | None = None,
        tiers: list[list[Any]] | None = None,
        ingest_root: bytes | None = None,
    ) -> Commit:
        """Compare-and-swap the ref `name` from `expect_head` (None: must not exist) to `root`."""
        check_ref_name(name)
        ref = self.get_ref(txn, name)
        head = ref.head if ref else None
        if head != expect_head:
            raise VeloError(
                f"ref {name!r} moved while this change was prepared",
                reason=Reason.REF_MOVED,
                hint="retry: the change will be merged with the new head",
            )
        if not self.has_node(txn, root):
            raise VeloError(f"root {root.hex()} is not stored", reason=Reason.MANIFEST_CORRUPT)
        if ref is None and self.get_tag(txn, name) is not None:
            raise VeloError(
                f"{name!r} is a tag; a ref needs another name",
                reason=Reason.EXISTS,
                hint="choose another --name, or delete the tag ('veloverlay tag --delete')",
            )
        new_path = path if path is not None else (ref.path if ref else None)
        c = self.put_commit(
            txn,
            ref=name,
            root=root,
            parent=head,
            message=message,
            session=session,
            delta=delta,
            path=new_path,
        )
        faults.point("commit.before")
        new = Ref(
            name,
            c.id,
            new_path,
            tiers if tiers is not None else (ref.tiers if ref else None),
            ref.ingest_root if ref else None,
        )
        if ingest_root is not None:
            new.ingest_root = ingest_root.hex()
        self.put_ref(txn, new)
        return c

    def _has_commit(self, txn: Txn, cid: str) -> bool:
        return txn.get(bytes.fromhex(cid), db=self._commits) is not None

    def log(self, txn: Txn, name: str, limit: int | None = None) -> list[Commit]:
        ref = self.require_ref(txn, name)
        out: list[Commit] = []
        cid: str | None = ref.head
        while cid is not None and (limit is None or len(out) < limit):
            c = self.get_commit(txn, cid)
            out.append(c)
            cid = c.parent
            if cid is not None and not self._has_commit(txn, cid):
                break  # `gc --keep N` pruned the older history
        return out


def _lmdb_error(exc: Exception, store: Store) -> VeloError:
    text = str(exc)
    if isinstance(exc, lmdb.ReadonlyError) or "Permission denied" in text:
        return VeloError(
            f"cannot open the manifest database: {text}",
            reason=Reason.STORE_PERMISSION,
            path=store.db_path,
        )
    if "No space" in text or getattr(exc, "errno", None) == errno.ENOSPC:
        return VeloError("the store's filesystem is full", reason=Reason.STORE_FULL)
    if isinstance(exc, lmdb.InvalidError | lmdb.CorruptedError | lmdb.VersionMismatchError):
        return VeloError(
            f"the manifest database is damaged: {text}",
            reason=Reason.MANIFEST_CORRUPT,
            path=store.db_path,
        )
    return VeloError(f"LMDB: {text}", reason=Reason.MANIFEST_CORRUPT, path=store.db_path)
