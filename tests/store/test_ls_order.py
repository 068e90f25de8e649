"""`ls -r` lists in name order, each directory followed by what it holds, as `find` does over
the source tree (old code: each level in reverse name order, a directory's contents only after
all its siblings)."""

from __future__ import annotations

import os

from tests.helpers.trees import make_tree
from veloverlay.ingest import ingest
from veloverlay.verbs.repo import Repo


def _preorder(top: bytes, base: bytes = b"") -> list[bytes]:
    """The tree under `top` as `find` with sorted names walks it (the real thing)."""
    out = []
    for name in sorted(os.listdir(os.path.join(top, base) if base else top)):
        p = base + b"/" + name if base else name
        out.append(p)
        if os.path.isdir(os.path.join(top, p)) and not os.path.islink(os.path.join(top, p)):
            out += _preorder(top, p)
    return out


def test_ls_recursive_is_in_name_order_depth_first(repo: Repo, shm_tmp: str) -> None:
    src = os.path.join(shm_tmp, "src")
    make_tree(
        src,
        {
            "a": b"1",
            "b/c": b"2",
            "b/d/e": b"3",
            "b/d/f": b"4",
            "b-x": b"5",
            "c/z": b"6",
            "c/y/x": b"7",
            "l": ("link", "b"),
            "empty": None,
        },
    )
    ingest(repo.store, repo.m, src, "t", jobs=1)
    want = _preorder(os.fsencode(src))
    assert [e.path for e in repo.ls("t", recursive=True)] == want
    assert [e.path for e in repo.ls("t", "b", recursive=True)] == [
        b"b/" + p for p in _preorder(os.fsencode(src) + b"/b")
    ]
