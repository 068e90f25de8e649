"""Arriving node records held on disk, not in memory, until the tree they belong to is checked.

A bundle's node records come in digest order, not tree order: which of them the root's closure
needs is known only after the last one. Holding them all in a dict let a hostile bundle of
millions of tiny records (an empty directory's encoding is 20 bytes) exhaust memory before the
end record was even read. `NodeSpill` keeps them in a scratch database inside the import's stage
(removed with it, and by `reclaim_tmp` after a killed import), with a bounded page cache: the
memory an import takes no longer grows with the records a bundle carries.
"""

from __future__ import annotations

import errno
import os
import sqlite3
from collections.abc import Iterator, Mapping

from veloverlay.errors import Reason, SysError, VeloError

__all__ = ["NodeSpill"]

_CACHE_KIB = 8192  # the scratch database's page cache: what the records may take in memory
_NAME = "arriving-nodes.sqlite"


def _failed(exc: sqlite3.Error, where: str) -> Exception:
    text = str(exc)
    if "full" in text:  # SQLITE_FULL: ENOSPC or EDQUOT under the stage
        return VeloError(
            f"no space left in the store for the bundle's directory records ({where})",
            reason=Reason.STORE_FULL,
            hint="free space on the store's filesystem; nothing was imported",
        )
    return SysError(errno.EIO, f"scratch database ({text})", where)


class NodeSpill(Mapping[bytes, bytes]):
    """digest -> encoded node, in a scratch database in the directory `dir_fd` (a stage's).
    A digest added twice keeps its first record (both hash to the digest: the same bytes)."""

    def __init__(self, dir_fd: int, shown: str) -> None:
        self._shown = os.path.join(shown, _NAME)
        # The stage, as the descriptor pins it (not whatever its path leads to by now); by its
        # path where /proc is not mounted (a chroot): the store's own tmp/, which only its
        # owner writes.
        pinned = f"/proc/self/fd/{dir_fd}"
        where = pinned if os.path.isdir(pinned) else shown
        try:
            self._db = sqlite3.connect(os.path.join(where, _NAME), isolation_level=None)
            for pragma in (
                "journal_mode = OFF",  # scratch: a crash leaves a stage that is removed whole
                "synchronous = OFF",
                "temp_store = FILE",
                "mmap_size = 0",
                f"cache_size = -{_CACHE_KIB}",
            ):
                self._db.execute(f"PRAGMA {pragma}")
            self._db.execute("CREATE TABLE n (d BLOB PRIMARY KEY, data BLOB) WITHOUT ROWID")
            self._db.execute("BEGIN")
        except sqlite3.Error as exc:
            raise _failed(exc, self._shown) from None

    def add(self, digest: bytes, data: bytes) -> None:
        try:
            self._db.execute("INSERT OR IGNORE INTO n VALUES (?, ?)", (digest, data))
        except sqlite3.Error as exc:
            raise _failed(exc, self._shown) from None

    def get(self, digest: bytes, default: None = None) -> bytes | None:  # type: ignore[override]
        try:
            row = self._db.execute("SELECT data FROM n WHERE d = ?", (digest,)).fetchone()
        except sqlite3.Error as exc:
            raise _failed(exc, self._shown) from None
        return None if row is None else bytes(row[0])

    def __contains__(self, digest: object) -> bool:
        return isinstance(digest, bytes) and self.get(digest) is not None

    def __getitem__(self, digest: bytes) -> bytes:
        got = self.get(digest)
        if got is None:
            raise KeyError(digest)
        return got

    def __iter__(self) -> Iterator[bytes]:
        for (d,) in self._db.execute("SELECT d FROM n"):
            yield bytes(d)

    def __len__(self) -> int:
        return int(self._db.execute("SELECT count(*) FROM n").fetchone()[0])

    def close(self) -> None:
        self._db.close()
