"""Absolute paths baked into a tree: what breaks when it is projected somewhere else.

A venv's `bin/` scripts carry `#!/orig/path/bin/python`, `pyvenv.cfg` names its home, `.pth`,
pkg-config and libtool files embed prefixes. Projected at its ingest path (the default) all of
that keeps working; projected elsewhere (`--at`), those files still point at the original path.
This module finds them, cheaply: only the top directory levels are searched, and only the file
kinds known to embed prefixes are read.
"""

from __future__ import annotations

import os
import re

from . import paths
from .cas import Store
from .manifest import Manifests, Txn
from .tree import Kind

__all__ = ["find_baked"]

_MAX_READ = 256 * 1024
_SUFFIXES = (b".pth", b".pc", b".la", b".cmake", b".cfg", b".sh")
_NAMES = (b"pyvenv.cfg", b"RECORD", b"direct_url.json", b"activate", b"activate.fish")


def _candidate(path: bytes) -> bool:
    parent, _, name = path.rpartition(b"/")
    return (
        name in _NAMES or name.endswith(_SUFFIXES) or parent == b"bin" or parent.endswith(b"/bin")
    )


def find_baked(
    store: Store,
    m: Manifests,
    txn: Txn,
    root: bytes,
    original: str,
    *,
    limit: int = 20,
    max_depth: int = 3,
) -> tuple[int, list[str]]:
    """(count, up to `limit` paths) of files in `root` that embed the absolute path `original`
    (as a whole path component sequence: `/x/venv` matches `/x/venv/bin`, not `/x/venv2`).

    Only the top `max_depth` directory levels are searched (a venv's bin/ and pyvenv.cfg, a
    project's .venv/bin, node_modules/.bin): the check runs when a session starts, and must not
    cost a walk of a 100,000-file manifest. Well-known files are listed first."""
    needle = re.compile(re.escape(os.fsencode(original.rstrip("/"))) + rb"(?![\w.+-])")
    count = 0
    found: list[tuple[int, bytes]] = []
    stack: list[tuple[bytes, bytes, int]] = [(root, b"", 0)]
    while stack:
        digest, where, depth = stack.pop()
        for e in m.get_node(txn, digest).entries:
            path = paths.join(where, e.name)
            if e.kind is Kind.DIR:
                if depth + 1 < max_depth:
                    stack.append((e.digest, path, depth + 1))
            elif (
                e.kind is Kind.FILE
                and e.size <= _MAX_READ
                and _candidate(path)
                and needle.search(store.read_object(e.digest))
            ):
                count += 1
                found.append((0 if e.name in _NAMES else 1, path))
    found.sort()
    return count, [paths.display(p) for _rank, p in found[:limit]]


def cached_find_baked(
    store: Store, m: Manifests, root: bytes, original: str
) -> tuple[int, list[str]]:
    """find_baked, computed once per (root, original path) like a lower layer: a session
    projected elsewhere must not walk a 100,000-file manifest every time it starts."""
    import hashlib
    import json

    key = hashlib.sha256(os.fsencode(original)).hexdigest()[:16]
    path = store.trees / "relocation" / f"{root.hex()}-{key}.json"
    try:
        data = json.loads(path.read_text())
        return int(data["count"]), [str(p) for p in data["found"]]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    with m.read() as txn:
        count, found = find_baked(store, m, txn, root, original)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"count": count, "found": found}))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only store still works, it just rescans
    return count, found
