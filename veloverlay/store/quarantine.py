"""Objects that failed their re-hash, set aside, and the way back (for missing ones too).

`fsck --repair` moves a corrupt object out of its name into `quarantine-v1/<hex>-<ns>` (the bytes
are kept as evidence, never deleted here); the caller drops what else could serve them (the
short name of the data-only layer, cached layers). From then on the object is *missing*: nothing
can read wrong bytes under its name, and every reader says so. It is *wanted* while the store
lacks it: the next `ingest` of a tree that holds the right bytes re-reads every file (its stat
cache would vouch for the file and skip it), and the next `pull` of a version that names it
fetches it, even when the ref is otherwise up to date. Both verify the bytes (BLAKE3) before
naming them, as always. An object that is simply missing (deleted by hand) is made wanted the same
way by `fsck --repair`, with an empty marker `<hex>-missing`.
"""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

from veloverlay import files, fsflags
from veloverlay.store import access
from veloverlay.store.cas import Store

__all__ = ["QUARANTINE", "quarantine_dir", "set_aside", "mark_wanted", "wanted", "prune"]

QUARANTINE = "quarantine-v1"


def quarantine_dir(store: Store) -> Path:
    return store.root / QUARANTINE


def set_aside(store: Store, hexname: str, path: str | os.PathLike[str]) -> Path:
    """Move the object file `path` (named `hexname`) into the quarantine; returns where it went.
    An immutable object (root's `chattr +i`) loses the flag first: only root can have set it, and
    only root can lift it (anyone else gets the EPERM of the rename)."""
    qdir = quarantine_dir(store)
    access.mkdir_nofollow(qdir, 0o755)  # as the object shards: the store's own mode guards them
    dest = qdir / f"{hexname}-{time.time_ns()}"
    try:
        os.rename(path, dest)
    except PermissionError as exc:
        if exc.errno != errno.EPERM or not fsflags.is_immutable(os.fspath(path)):
            raise
        fsflags.set_immutable(os.fspath(path), False)
        os.rename(path, dest)
    return dest


def mark_wanted(store: Store, hexname: str) -> None:
    """Record an object a manifest names but the store lacks (deleted by hand, lost with a disk)
    as wanted: an empty marker `<hex>-missing` (nothing to keep)."""
    qdir = quarantine_dir(store)
    access.mkdir_nofollow(qdir, 0o755)
    with files.exact_modes():
        fd = access.open_nofollow(qdir / f"{hexname}-missing", os.O_WRONLY | os.O_CREAT, 0o444)
    os.close(fd)


def wanted(store: Store) -> set[bytes]:
    """The objects set aside that the store still lacks."""
    out: set[bytes] = set()
    try:
        names = os.listdir(quarantine_dir(store))
    except (FileNotFoundError, PermissionError):  # none, or set aside by another user: theirs
        return out
    for name in names:
        hexname = name.split("-", 1)[0]
        try:
            digest = bytes.fromhex(hexname)
        except ValueError:
            continue
        if len(digest) == 32 and not store.has(digest):
            out.add(digest)
    return out


def prune(store: Store, needed: set[bytes]) -> int:
    """For gc: forget what no kept tree names any more (a damaged copy of an object no ref
    needs, or its marker), and markers of objects that are back. A damaged copy of an object
    that is back stays, for inspection, until removed by hand. Returns the entries removed."""
    removed = 0
    try:
        names = os.listdir(quarantine_dir(store))
    except FileNotFoundError:
        return 0
    for name in names:
        hexname, _, what = name.partition("-")
        try:
            digest = bytes.fromhex(hexname)
        except ValueError:
            continue
        if digest not in needed or (what == "missing" and store.has(digest)):
            os.unlink(quarantine_dir(store) / name)  # set_aside lifted any +i
            removed += 1
    return removed
