"""Disk use of a store, by part (`status`): files, directories and allocated bytes."""

from __future__ import annotations

import os
import stat

from veloverlay.store.cas import Store

__all__ = ["disk_usage", "tree_usage"]

_PART_NAMES = {
    "objects-v1": "objects",
    "objects-v2": "objects",
    "ids-v1": "ids",
    "trees-v1": "trees",
    "sessions": "sessions",
    "manifests.lmdb": "manifests",
    "tmp": "tmp",
    "quarantine-v1": "quarantine",  # corrupt objects fsck --repair set aside
    "space-reserve": "reserve",  # room kept for space-freeing commits (reserve.py)
}


def tree_usage(path: str, part: dict[str, int], seen: set[tuple[int, int]]) -> None:
    stack = [path]
    while stack:
        p = stack.pop()
        try:
            st = os.lstat(p)
        except OSError:
            continue  # gone meanwhile, or unreadable: counted as nothing
        if stat.S_ISDIR(st.st_mode):
            part["dirs"] += 1
            part["bytes"] += st.st_blocks * 512
            try:
                stack.extend(e.path for e in os.scandir(p))
            except OSError:
                pass
            continue
        if st.st_nlink > 1:
            key = (st.st_dev, st.st_ino)
            if key in seen:
                continue
            seen.add(key)
        part["files"] += 1
        part["bytes"] += st.st_blocks * 512


def disk_usage(store: Store) -> dict[str, dict[str, int]]:
    """Files, directories and bytes on disk (allocated blocks) per top-level part of the
    store: objects, ids, trees (layers kept in the store), sessions, manifests, tmp,
    quarantine, reserve, other.
    A file with several names in the store (an object and its short id) counts once."""
    parts: dict[str, dict[str, int]] = {}
    seen: set[tuple[int, int]] = set()
    # objects first: a short id shares its object's inode and counts there
    entries = sorted(
        os.scandir(store.root), key=lambda e: (_PART_NAMES.get(e.name) != "objects", e.name)
    )
    for entry in entries:
        name = _PART_NAMES.get(entry.name, "other")
        part = parts.setdefault(name, {"files": 0, "dirs": 0, "bytes": 0})
        tree_usage(entry.path, part, seen)
    return parts
