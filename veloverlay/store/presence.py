"""Which objects a store holds: `has` (one stat of the object's name), `has_listed` (a small
fan-out directory listed once, for a writer asking about many objects one at a time) and
`missing` (many objects at once, a pull's closure).

`Presence` is the part of `Store` (cas.py) that answers; it reads through the objects
directory's descriptor and the layout that class holds. Only a regular file by its name is an
object: anything else there (a link, a directory of a damaged store) reads as absent.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable

__all__ = ["Presence"]

# `has_listed` lists a fan-out directory no larger than this (one block of ext4, ~50 names;
# tmpfs counts 20 bytes a name); a larger one is asked one object at a time.
_LIST_MAX_BYTES = 4096


class Presence:
    """Object lookups; mixed into `Store`, which supplies the layout and descriptor below."""

    fanout: int
    _legacy_b: bytes | None

    def objects_fd(self) -> int:
        raise NotImplementedError

    def object_path_b(self, digest: bytes) -> bytes:
        raise NotImplementedError

    def has(self, digest: bytes) -> bool:
        """The store holds the object: a regular file by its name (anything else there, a link
        or a directory a damaged store holds, is no object: reads refuse it too)."""
        try:
            if self.fanout == 1 and self._legacy_b is None:  # two names below the fd held
                h = digest.hex().encode()
                st = os.stat(b"%s/%s" % (h[:2], h), dir_fd=self.objects_fd(), follow_symlinks=False)
            else:
                st = os.stat(self.object_path_b(digest), follow_symlinks=False)
        except (FileNotFoundError, NotADirectoryError):
            return False
        return stat.S_ISREG(st.st_mode)

    def has_listed(self, digest: bytes, listings: dict[int, set[str] | None]) -> bool:
        """`has`, for a writer that asks about many objects one at a time (a stage: an ingest
        worker's, hashing a tree): a fan-out directory of at most one block (an empty or young
        store's) is listed on the first question about it, kept in `listings` (the caller's,
        for as long as it writes; it adds what it stores itself) and answered from there,
        instead of a failed stat per new object. An object another process stored since the
        listing reads as absent: the caller stages it again and publishing keeps the stored
        one (EEXIST), so a stale answer costs a write, never an object."""
        if self.fanout != 1 or self._legacy_b is not None:
            return self.has(digest)
        if digest[0] not in listings:
            listings[digest[0]] = self._list_shard(digest[:1].hex())
        names = listings[digest[0]]
        if names is None:
            return self.has(digest)
        return digest.hex() in names

    def _list_shard(self, shard: str, max_bytes: int = _LIST_MAX_BYTES) -> set[str] | None:
        """The regular files of a fan-out directory (none where it does not exist); None: one
        larger than `max_bytes`, or not a plain directory (then each object is looked up as
        `has` does)."""
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(shard, flags, dir_fd=self.objects_fd())
        except FileNotFoundError:
            return set()
        except OSError:
            return None
        try:
            if os.fstat(fd).st_size > max_bytes:
                return None
            with os.scandir(fd) as it:
                return {e.name for e in it if e.is_file(follow_symlinks=False)}
        finally:
            os.close(fd)

    def missing(self, digests: Iterable[bytes]) -> list[bytes]:
        """Those of `digests` the store lacks, sorted: what `has` says of each, at a fraction of
        its cost for many (a pull's closure). A fan-out directory that does not exist holds none
        of them (one failed open, not one stat per object); one holding several of them is
        listed once where that is cheaper than their stats (its size, ~72 bytes per entry, says
        how long the listing is); the rest are looked up one by one."""
        want = sorted(set(digests))
        if self.fanout != 1 or self._legacy_b is not None:
            return [d for d in want if not self.has(d)]
        out: list[bytes] = []
        i = 0
        while i < len(want):
            j = i + 1
            while j < len(want) and want[j][0] == want[i][0]:
                j += 1
            group = want[i:j]
            i = j
            if len(group) < 4:
                out += [d for d in group if not self.has(d)]
                continue
            # listed where that is cheaper than the stats of the few wanted (8 x 72 bytes each)
            present = self._list_shard(group[0][:1].hex(), 8 * 72 * len(group))
            if present is None:
                out += [d for d in group if not self.has(d)]
                continue
            out += [d for d in group if d.hex() not in present]
        return out
