"""Absolute paths baked into a tree: what breaks when it is projected somewhere else.

A venv's `bin/` scripts carry `#!/orig/path/bin/python`, `pyvenv.cfg` names its home, `.pth`,
pkg-config and libtool files embed prefixes. Projected at its ingest path (the default) all of
that keeps working; projected elsewhere (`--at`), those files still point at the original path.
This module finds them, cheaply: only the file kinds that are known to embed prefixes are read.
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
    store: Store, m: Manifests, txn: Txn, root: bytes, original: str, *, limit: int = 20
) -> tuple[int, list[str]]:
    """(count, up to `limit` paths) of files in `root` that embed the absolute path `original`
    (as a whole path component sequence: `/x/venv` matches `/x/venv/bin`, not `/x/venv2`).
    Well-known files (pyvenv.cfg, RECORD, ...) are listed first."""
    needle = re.compile(re.escape(os.fsencode(original.rstrip("/"))) + rb"(?![\w.+-])")
    count = 0
    found: list[tuple[int, bytes]] = []
    for path, entry, _node in m.walk(txn, root):
        if entry.kind is not Kind.FILE or entry.size > _MAX_READ or not _candidate(path):
            continue
        if needle.search(store.read_object(entry.digest)):
            count += 1
            found.append((0 if path.rpartition(b"/")[2] in _NAMES else 1, path))
    found.sort()
    return count, [paths.display(p) for _rank, p in found[:limit]]
