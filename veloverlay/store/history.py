"""Refs and the commit log: ref and commit records read, written and deleted, the
compare-and-swap commit that moves a ref to a new root, and a ref's log.

`History` is the part of `Manifests` (manifest.py) that keeps them; like `Versions`, which it
extends (naming versions, tags), it works through the database handles and the node check that
class provides. A commit's id is the hash of its record, checked on every read.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from veloverlay import faults
from veloverlay.errors import Reason, VeloError
from veloverlay.store.cas import Store
from veloverlay.store.dbfile import corrupt, json_record
from veloverlay.store.digest import hash_bytes
from veloverlay.store.tree import Op
from veloverlay.store.versions import (
    Commit,
    Ref,
    Versions,
    check_ref_name,
    check_revision,
    commit_from,
    name_key,
    new_lineage,
    ref_from,
)

__all__ = ["History"]

_DELTA_KEEP = 20000  # a commit record keeps at most this many of its delta's operations

Txn = Any  # lmdb.Transaction (untyped library)
_R = TypeVar("_R")


class History(Versions):
    """Refs and commits; mixed into `Manifests`, which supplies the handles below."""

    store: Store
    _ref_delta: int  # refs created minus deleted in the open write transaction

    def has_node(self, txn: Txn, digest: bytes) -> bool:
        raise NotImplementedError

    def get_ref(self, txn: Txn, name: str) -> Ref | None:
        key = name_key(name)
        v = None if key is None else txn.get(key, db=self._refs)
        if v is None:
            return None
        return json_record(self.store, v, f"ref {name}", lambda d: ref_from(name, d))

    def require_ref(self, txn: Txn, name: str) -> Ref:
        ref = self.get_ref(txn, check_revision(name))  # bad-ref, not not-found, for ''
        if ref is None:
            raise VeloError(
                f"no ref named '{name}'",
                reason=Reason.NOT_FOUND,
                hint="'veloverlay refs' lists the refs of this store",
            )
        return ref

    def put_ref(self, txn: Txn, ref: Ref) -> None:
        check_ref_name(ref.name)
        key = ref.name.encode()
        new = txn.get(key, db=self._refs) is None
        txn.put(key, ref.to_json(), db=self._refs)
        self._ref_delta += new

    def delete_ref(self, txn: Txn, name: str) -> bool:
        key = name_key(name)
        gone = key is not None and bool(txn.delete(key, db=self._refs))
        self._ref_delta -= gone
        return gone

    def refs(self, txn: Txn) -> list[Ref]:
        out = []
        with txn.cursor(db=self._refs) as cur:
            for k, _v in cur:
                ref = self.get_ref(txn, bytes(k).decode())
                if ref is None:  # listed, yet not found by its key: a damaged B-tree
                    name = bytes(k).decode("utf-8", "surrogateescape")
                    raise corrupt(self.store, f"ref '{name}' is listed but cannot be read")
                out.append(ref)
        return out

    def get_commit(self, txn: Txn, cid: str) -> Commit:
        if len(cid) != 64:  # a key of a damaged B-tree (LMDB refuses an empty one: a traceback)
            raise corrupt(self.store, f"commit '{cid}' has no commit id's length")
        v = txn.get(bytes.fromhex(cid), db=self._commits)
        if v is None:
            raise corrupt(self.store, f"commit {cid} is missing")
        if hash_bytes(bytes(v)) != bytes.fromhex(cid):  # its id is the hash of its record
            raise corrupt(self.store, f"commit {cid} does not hash to its id")
        return json_record(self.store, v, f"commit {cid}", lambda d: commit_from(cid, d))

    def _record(self, value: Any, what: str, parse: Callable[[dict[str, Any]], _R]) -> _R:
        return json_record(self.store, value, what, parse)

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
        lineage: str | None = None,
    ) -> Commit:
        """Compare-and-swap the ref `name` from `expect_head` (None: must not exist) to `root`.
        A ref made here gets `lineage` (default: a new one), which a caller may have noted
        beforehand (a pull notes its source first: `remote.state.Versions`)."""
        check_ref_name(name)
        ref = self.get_ref(txn, name)
        head = ref.head if ref else None
        if head != expect_head:
            raise VeloError(
                f"ref '{name}' moved while this change was prepared",
                reason=Reason.REF_MOVED,
                hint="retry: the change will be merged with the new head",
            )
        if not self.has_node(txn, root):
            raise VeloError(f"root {root.hex()} is not stored", reason=Reason.MANIFEST_CORRUPT)
        if ref is None and self.get_tag(txn, name) is not None:
            raise VeloError(
                f"'{name}' is a tag; a ref needs another name",
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
            ref.lineage if ref else (lineage or new_lineage()),  # made here: its own
        )
        if ingest_root is not None:
            new.ingest_root = ingest_root.hex()
        self.put_ref(txn, new)
        return c

    def has_commit(self, txn: Txn, cid: str) -> bool:
        return txn.get(bytes.fromhex(cid), db=self._commits) is not None

    def log(self, txn: Txn, name: str, limit: int | None = None) -> list[Commit]:
        ref = self.require_ref(txn, name)
        out: list[Commit] = []
        cid: str | None = ref.head
        while cid is not None and (limit is None or len(out) < limit):
            c = self.get_commit(txn, cid)
            out.append(c)
            cid = c.parent
            if cid is not None and not self.has_commit(txn, cid):
                break  # `gc --keep N` pruned the older history
        return out
