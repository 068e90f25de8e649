"""`Manifests.what_if`: a change worked out in memory (what a running session's harvest would
commit, `session.live`) is seen inside it and leaves the manifest database and this process's
node caches as they were."""

from __future__ import annotations

import os

from tests.helpers.trees import make_tree
from veloverlay.ingest import ingest
from veloverlay.store.changes import changes
from veloverlay.store.tree import Entry, Kind, Op, OpKind
from veloverlay.verbs.repo import Repo


def test_a_what_if_change_is_seen_inside_and_gone_after(repo: Repo, shm_tmp: str) -> None:
    src = os.path.join(shm_tmp, "src")
    make_tree(src, {"a/x": b"x\n", "b": b"b\n"})
    ingest(repo.store, repo.m, src, "r", jobs=1)
    m = repo.m
    with m.read() as txn:
        root = bytes.fromhex(m.resolve(txn, "r")[1].root)
        nodes_before = sum(1 for _ in m.iter_nodes(txn))
    with m.what_if() as txn:
        new_dir = m.put_node(txn, 0o750, 1, [])
        new = m.apply(
            txn,
            root,
            [Op(OpKind.DELETE, b"b"), Op(OpKind.PUT, b"c", Entry(b"c", Kind.DIR, digest=new_dir))],
        )
        seen = [(c.status, c.path) for c in changes(m, txn, root, new)]
        assert m.lookup(txn, new, b"c") is not None and m.lookup(txn, new, b"b") is None
    assert seen == [("D", b"b"), ("A", b"c")]
    with m.read() as txn:
        assert not m.has_node(txn, new) and not m.has_node(txn, new_dir)
        assert sum(1 for _ in m.iter_nodes(txn)) == nodes_before
        assert m.lookup(txn, root, b"b") is not None  # the stored tree as it was
    assert m.maps.get(new) is None
