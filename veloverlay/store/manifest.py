"""Manifests in LMDB: Merkle nodes, refs, the commit log, and tree operations over them (the refs
and the commit log are kept by `History`, history.py, which `Manifests` extends).

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
import os
import sys
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import lmdb

from veloverlay import envvars, faults, paths
from veloverlay.errors import Reason, VeloError
from veloverlay.files import exact_modes
from veloverlay.store import delta, reserve, tree
from veloverlay.store.cas import Store
from veloverlay.store.dbfile import (
    CORRUPT_HINT,
    check_data_file,
    check_fresh,
    check_schema,
    corrupt,
    fit_map_size,
    known_failure,
    mkdir_nofollow,
    never_used,
    put_record,
    read_record,
    record_lock,
    stored_schema,
    write_record,
)
from veloverlay.store.digest import Digest, node_digest
from veloverlay.store.history import History
from veloverlay.store.nodemaps import EntryMap, NodeMaps
from veloverlay.store.tree import Entry, Kind, Node, Op
from veloverlay.store.versions import (
    MIN_PREFIX,
    REF_RE,
    Commit,
    Ref,
    Tag,
    check_ref_name,
    check_revision,
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
    "check_revision",
    "check_data_file",
    "read_record",
    "write_record",
]

SCHEMA_VERSION = b"1"
_DEFAULT_MAP_SIZE = 64 << 30
_MIN_MAP_SIZE = 64 << 10  # below this even an empty database does not fit (MDB_MAP_FULL)
_MAX_MAP_SIZE = sys.maxsize  # above a size_t, lmdb.open raised OverflowError (a traceback)

Txn = Any  # lmdb.Transaction (untyped library)

EMPTY_ROOT, _EMPTY_ENC = tree.encode(tree.EMPTY_DIR_MODE, 0, [])


class Manifests(History):
    """The manifest database of one store."""

    def __init__(self, store: Store, *, readonly: bool = False) -> None:
        self.store = store
        # Why writes are refused (a read-only filesystem, inside a session, another user's
        # store), as the error write() raises; None: writable.
        self.refusal: VeloError | None = None
        self._ref_delta = 0  # refs created minus deleted in the open write transaction
        map_size = envvars.get_int(
            "VELO_MAP_SIZE", minimum=_MIN_MAP_SIZE, maximum=_MAX_MAP_SIZE
        ) or fit_map_size(store, _DEFAULT_MAP_SIZE)
        if not readonly:
            self.refusal = store.write_refusal(store.db_path)
            readonly = self.refusal is not None
        existing = check_data_file(store, writable=not readonly)
        if not existing:
            check_fresh(store)
            if self.refusal is not None:
                raise self.refusal
        # Another user's shared store: its lock file is not writable, so reads go without
        # LMDB's reader table (a read that overlaps the owner's commit may then fail as
        # manifest-corrupt: retry). A read-only filesystem needs no lock: LMDB skips it.
        lock = self.refusal is None or self.refusal.reason is not Reason.STORE_PERMISSION
        lock = lock or os.access(store.db_path / "lock.mdb", os.W_OK)
        try:
            if not existing:
                mkdir_nofollow(store)
            with exact_modes():  # data.mdb, lock.mdb: readable by a shared store's users
                self.env = lmdb.open(  # by the store's descriptor: LMDB takes a path
                    store.held_path(store.db_path.name),
                    map_size=map_size,
                    max_dbs=8,
                    readonly=readonly,
                    create=False,
                    lock=lock,
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
            schema = stored_schema(self.env) if existing else SCHEMA_VERSION
            if schema is None:  # written with the database
                if readonly or not never_used(store, self.env):
                    raise lmdb.NotFoundError("no schema key")
                existing = False  # a creation killed before it wrote the schema: made again
            check_schema(schema, SCHEMA_VERSION)  # before a sub-database is made in it
            self._meta = self.env.open_db(b"meta", create=not readonly)
            self._nodes = self.env.open_db(b"nodes", create=not readonly)
            self._refs = self.env.open_db(b"refs", create=not readonly)
            self._commits = self.env.open_db(b"commits", create=not readonly)
            self.statcache = self.env.open_db(b"statcache", create=not readonly)
            self.ids = self.env.open_db(b"ids", create=not readonly)
            self._tags = self._open_optional(b"tags", readonly)
        except lmdb.NotFoundError as exc:
            self.env.close()
            raise VeloError(
                f"the manifest database at {store.db_path} has no schema record: it was "
                "truncated, replaced or never finished",
                reason=Reason.MANIFEST_CORRUPT,
                hint=CORRUPT_HINT,
                path=store.db_path,
            ) from exc
        except lmdb.Error as exc:
            self.env.close()
            raise _lmdb_error(exc, store) from exc
        except VeloError:
            self.env.close()
            raise
        self._cache: dict[bytes, Node] = {}
        # nodes' entries left encoded, by name (`node_entry_map`), and how the nodes this
        # process wrote were made: lookups and diffs through a wide directory decode only the
        # entries they need
        self.maps = NodeMaps()
        if not existing:
            faults.point("manifests.create")
            with self.write() as txn:
                txn.put(b"schema", SCHEMA_VERSION, db=self._meta)
                txn.put(EMPTY_ROOT, _EMPTY_ENC, db=self._nodes)
            write_record(store, 0)

    def _open_optional(self, name: bytes, readonly: bool) -> Any:
        """A sub-database added after schema 1 (a read-only open of an older store has none:
        None, read as empty)."""
        try:
            return self.env.open_db(name, create=not readonly)
        except lmdb.NotFoundError:
            return None

    def close(self) -> None:
        self.env.close()

    # -- transactions --------------------------------------------------------------------------
    @contextlib.contextmanager
    def read(self) -> Iterator[Txn]:
        try:
            with self.env.begin(write=False) as txn:
                yield txn
        except (lmdb.CorruptedError, lmdb.PageNotFoundError, lmdb.BadTxnError) as exc:
            raise corrupt(self.store, str(exc)) from exc

    @contextlib.contextmanager
    def what_if(self) -> Iterator[Txn]:
        """A read transaction whose writes (`put_node`, `apply`, ...) are kept in memory and
        dropped at its end, with what this process cached of the nodes they made: what a change
        would make, without a write (a running session's harvest as it would commit now,
        `session.live`, also where the store may not be written: inside a session, another
        user's store). Only gets and puts: a cursor, a delete or a commit is an error."""
        with self.read() as txn:
            scratch = _WhatIf(txn)
            try:
                yield scratch
            finally:
                for digest in scratch.made.get(id(self._nodes), {}):
                    self._cache.pop(digest, None)
                    self.maps.drop(digest)
                self.maps.aborted()

    @contextlib.contextmanager
    def write(self) -> Iterator[Txn]:
        if self.refusal is not None:
            raise self.refusal
        try:
            self._ref_delta = 0
            with self.env.begin(write=True) as txn:
                yield txn
                if self._ref_delta:
                    self._commit_counted(txn)
            self.maps.committed()
        except lmdb.MapFullError as exc:
            raise VeloError(
                "the manifest database is full (LMDB map size reached); nothing was committed",
                reason=Reason.MAP_FULL,
                hint="set VELO_MAP_SIZE to a larger value (bytes) and retry",
            ) from exc
        except lmdb.DiskError as exc:
            raise _disk_full(self.store) from exc
        except (lmdb.CorruptedError, lmdb.PageNotFoundError) as exc:
            raise corrupt(self.store, str(exc)) from exc
        except lmdb.Error as exc:
            if "No space" in str(exc):
                raise _disk_full(self.store) from exc
            raise
        finally:
            self._ref_delta = 0
            self.maps.aborted()

    def _commit_counted(self, txn: Txn) -> None:
        """Commit a transaction that created or deleted refs, keeping the store record's ref
        count (see dbfile.write_record) never above the database's, whenever a crash comes: the
        lower of the counts before and after goes first, the new count once committed. The
        record's lock is held throughout, so writers' records follow their commit order."""
        after = txn.stat(self._refs)["entries"]
        before = after - self._ref_delta
        with record_lock(self.store) as fd:
            put_record(fd, min(before, after))
            txn.commit()
            put_record(fd, after)

    def ref_count(self, txn: Txn) -> int:
        return int(txn.stat(self._refs)["entries"])

    # -- nodes ---------------------------------------------------------------------------------
    def get_node(self, txn: Txn, digest: bytes) -> Node:
        node = self._cache.get(digest)
        if node is not None:
            return node
        node = tree.decode(bytes(self._stored(txn, digest)))
        if len(self._cache) > 200_000:
            self._cache.clear()
        self._cache[digest] = node
        return node

    def node_attrs(self, txn: Txn, digest: bytes) -> tuple[int, int]:
        """A directory node's own (mode, mtime_ns), without decoding its entries."""
        node = self._cache.get(digest)
        if node is not None:
            return node.mode, node.mtime_ns
        return tree.decode_attrs(bytes(self._stored(txn, digest)[: tree.HEAD_SIZE]))

    def node_entry_map(self, txn: Txn, digest: bytes) -> EntryMap:
        """A directory node's (mode, mtime_ns, {name: encoded entry}) (`tree.entry_map`)."""
        got = self.maps.get(digest)
        if got is None:
            data = bytes(self._stored(txn, digest))
            # Entries left encoded are not checked one by one (a node was checked as a whole
            # when it was stored) and go as they are into the nodes a change writes: the bytes
            # must be the ones stored under this name (~0.1 ms for 10,000 entries).
            if node_digest(data) != digest:
                raise VeloError(
                    f"directory node {digest.hex()} does not hash to its name",
                    reason=Reason.MANIFEST_CORRUPT,
                    hint="run 'veloverlay fsck'",
                )
            got = tree.entry_map(data)
            self.maps.remember(digest, got)
        return got

    def node_view(self, txn: Txn, digest: bytes) -> Node | tree.NodeView:
        """A directory node to look a few names up in: the decoded node if at hand, else a
        view that decodes only the entries looked up (`tree.NodeView`)."""
        node = self._cache.get(digest)
        if node is not None:
            return node
        return tree.NodeView(*self.node_entry_map(txn, digest))

    def _stored(self, txn: Txn, digest: bytes) -> Any:
        data = txn.get(digest, db=self._nodes)
        if data is None:
            raise VeloError(
                f"directory node {digest.hex()} is missing",
                reason=Reason.MANIFEST_CORRUPT,
                hint="run 'veloverlay fsck'",
            )
        return data

    def has_node(self, txn: Txn, digest: bytes) -> bool:
        return digest in self._cache or txn.get(digest, db=self._nodes) is not None

    def put_node(self, txn: Txn, mode: int, mtime_ns: int, entries: Iterable[Entry]) -> Digest:
        digest, data = tree.encode(mode, mtime_ns, entries)
        txn.put(digest, data, db=self._nodes, overwrite=False)
        return digest

    def put_change(
        self,
        txn: Txn,
        mode: int,
        mtime_ns: int,
        base: bytes,
        old: Mapping[bytes, bytes],
        changed: Mapping[bytes, Entry | None],
    ) -> Digest:
        """`put_node` of the node `base` (whose entry map is `old`) with `changed` names put or
        removed (`tree.encode_changed`). The new node's map, and that it differs from `base` in
        `changed` names only, are kept for the diffs that follow (`NodeMaps.changed_names`)."""
        digest, data, new_map = tree.encode_changed(mode, mtime_ns, old, changed)
        txn.put(digest, data, db=self._nodes, overwrite=False)
        if digest != base:
            self.maps.add_new(digest, (mode, mtime_ns, new_map), base, frozenset(changed))
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
        self.maps.drop(digest)

    # -- path lookups --------------------------------------------------------------------------
    def lookup(self, txn: Txn, root: bytes, path: bytes) -> Entry | None:
        """The entry at `path` (the root itself is a DIR entry with an empty name)."""
        entry = Entry(b"", Kind.DIR, digest=root)
        for name in paths.split(path):
            if entry.kind is not Kind.DIR:
                return None
            node = self._cache.get(entry.digest)
            if node is not None:
                found = node.lookup(name)
            else:  # one entry decoded, not the whole directory
                encoded = self.node_entry_map(txn, entry.digest)[2].get(name)
                found = tree.decode_entry(encoded) if encoded is not None else None
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
        """Add every node and object reachable from `root` (skipping known subtrees). Each node
        is checked against its name: what gc keeps, and a bundle carries, is decided here, and a
        damaged node names other objects than the tree had (MANIFEST_CORRUPT instead)."""
        stack = [root]
        while stack:
            d = stack.pop()
            if d in seen_nodes:
                continue
            data = bytes(self._stored(txn, d))
            if node_digest(data) != d:
                raise corrupt(self.store, f"directory node {d.hex()} does not hash to its name")
            seen_nodes.add(d)
            for e in tree.decode(data).entries:
                if e.kind is Kind.DIR:
                    stack.append(e.digest)
                elif e.kind is Kind.FILE:
                    objects.add(e.digest)

    # -- apply and diff ------------------------------------------------------------------------
    def apply(self, txn: Txn, root: bytes, ops: Iterable[Op]) -> Digest:
        """Apply path operations to `root`; only nodes on changed paths are rewritten."""
        return delta.apply(self, txn, root, ops)

    def diff(self, txn: Txn, a: bytes, b: bytes, prefix: bytes = b"") -> list[Op]:
        """Path operations that turn tree `a` into tree `b` (see delta.diff)."""
        return delta.diff(self, txn, a, b, prefix)


class _WhatIf:
    """`Manifests.what_if`'s transaction: puts kept by sub-database, gets see them first."""

    def __init__(self, txn: Txn) -> None:
        self._txn = txn
        self.made: dict[int, dict[bytes, bytes]] = {}

    def get(self, key: bytes, default: Any = None, db: Any = None) -> Any:
        got = self.made.get(id(db), {}).get(bytes(key))
        return got if got is not None else self._txn.get(key, default, db=db)

    def put(self, key: bytes, value: bytes, db: Any = None, overwrite: bool = True) -> bool:
        mine = self.made.setdefault(id(db), {})
        if not overwrite and self.get(key, db=db) is not None:
            return False
        mine[bytes(key)] = bytes(value)
        return True


def _disk_full(store: Store) -> VeloError:
    return VeloError(
        "the disk is full while committing; nothing was committed",
        reason=Reason.STORE_FULL,
        hint=reserve.FULL_HINT,
        path=store.root,
    )


def _lmdb_error(exc: Exception, store: Store) -> VeloError:
    text = str(exc)
    if "Read-only file system" in text:
        return store.read_only_error(f"the store's filesystem is read-only ({store.root})")
    if isinstance(exc, lmdb.ReadonlyError) or "Permission denied" in text:
        return VeloError(
            f"cannot open the manifest database: {text}",
            reason=Reason.STORE_PERMISSION,
            path=store.db_path,
        )
    if (known := known_failure(store, text)) is not None:
        return known
    if "No space" in text or getattr(exc, "errno", None) == errno.ENOSPC:
        return VeloError("the store's filesystem is full", reason=Reason.STORE_FULL)
    if isinstance(exc, lmdb.InvalidError | lmdb.CorruptedError | lmdb.VersionMismatchError):
        return corrupt(store, text)
    return VeloError(
        f"LMDB: {text}", reason=Reason.MANIFEST_CORRUPT, path=store.db_path, hint=CORRUPT_HINT
    )
