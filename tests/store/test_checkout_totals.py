"""Checkout's progress totals (`tree_totals`: entries and file bytes, read from the nodes only)
count what a checkout writes: compared with a plain walk of the source directory, a subtree
stored once but named twice included (deduplicated in the store, written twice)."""

from __future__ import annotations

import os
import stat

from tests.helpers.trees import make_tree
from veloverlay.ingest import ingest
from veloverlay.store.cas import Store
from veloverlay.store.checkout import tree_totals
from veloverlay.store.manifest import Manifests


def _walk_totals(top: str) -> tuple[int, int]:
    """(entries below `top`, bytes of its regular files), by os.walk (links not followed)."""
    count = size = 0
    for root, dirs, files in os.walk(top):
        count += len(dirs) + len(files)
        for name in files:
            st = os.lstat(os.path.join(root, name))
            size += st.st_size if stat.S_ISREG(st.st_mode) else 0
    return count, size


def test_tree_totals_match_a_walk_of_the_source(tmp_path: os.PathLike[str]) -> None:
    base = os.fspath(tmp_path)
    src = os.path.join(base, "src")
    spec: dict[str, object] = {"a.txt": b"hello\n", "big": b"\0" * 70000, "link": ("l", "a.txt")}
    for twin in ("one", "two"):  # the same subtree: one node in the store, two in a checkout
        spec |= {f"{twin}/x.bin": b"x" * 5000, f"{twin}/deep/y": b"yy", f"{twin}/deep/e": None}
    spec["nested/n1/n2/f"] = b"f" * 123
    make_tree(src, spec)
    store = Store.init(os.path.join(base, "store"))
    m = Manifests(store)
    try:
        ingest(store, m, src, "t", jobs=1)
        with m.read() as txn:
            _ref, c = m.resolve(txn, "t")
            got = tree_totals(m, txn, bytes.fromhex(c.root))
    finally:
        m.close()
    assert got == _walk_totals(src)
    assert got == (17, 6 + 70000 + 2 * (5000 + 2) + 123)
