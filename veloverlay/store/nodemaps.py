"""What one `Manifests` remembers of directory nodes between calls: their entry maps (`tree.
entry_map`: entries left encoded, by name), and for the nodes it wrote by changing another,
which names they were made by changing — so that a lookup, a diff or the next change through a
directory of 10,000 names costs what the change costs, not a pass over 10,000 entries.

Nodes written in a write transaction are kept apart (`add_new`) until it commits (`committed`);
an aborted transaction's are dropped (`aborted`): nothing here ever vouches for a node the
database does not hold. A node's map is what its bytes say, and its bytes hash to its name, so a
remembered map is never stale.
"""

from __future__ import annotations

__all__ = ["NodeMaps", "EntryMap"]

# (mode, mtime_ns, {name: encoded entry}) of a node
EntryMap = tuple[int, int, dict[bytes, bytes]]

_MAX_ENTRIES = 1_000_000  # entries remembered at most (~150 MB); past it, start again
_MAX_MADE = 10_000  # nodes whose making is remembered at most


class NodeMaps:
    __slots__ = ("_maps", "_entries", "_new_maps", "_new_from", "_made_from")

    def __init__(self) -> None:
        self._maps: dict[bytes, EntryMap] = {}
        self._entries = 0
        self._new_maps: dict[bytes, EntryMap] = {}  # written by the open write transaction
        self._new_from: dict[bytes, tuple[bytes, frozenset[bytes]]] = {}
        self._made_from: dict[bytes, tuple[bytes, frozenset[bytes]]] = {}

    def get(self, digest: bytes) -> EntryMap | None:
        return self._maps.get(digest) or self._new_maps.get(digest)

    def remember(self, digest: bytes, got: EntryMap) -> None:
        """Keep the map of a node read from the database."""
        self._entries += len(got[2])
        if self._entries > _MAX_ENTRIES:
            self._maps.clear()
            self._entries = len(got[2])
        self._maps[digest] = got

    def add_new(self, digest: bytes, got: EntryMap, base: bytes, names: frozenset[bytes]) -> None:
        """A node the open write transaction wrote: `base` with `names` put or removed."""
        self._new_maps[digest] = got
        self._new_from[digest] = (base, names)

    def committed(self) -> None:
        for digest, got in self._new_maps.items():
            self.remember(digest, got)
        if len(self._made_from) + len(self._new_from) > _MAX_MADE:
            self._made_from.clear()
        self._made_from.update(self._new_from)
        self.aborted()

    def aborted(self) -> None:
        self._new_maps, self._new_from = {}, {}

    def changed_names(self, a: bytes, b: bytes) -> frozenset[bytes] | None:
        """The names whose entries may differ between nodes `a` and `b`, when one was made from
        the other here (a superset: a name changed back is in it); None when that is not known
        (then every name must be compared)."""
        for new, old in ((b, a), (a, b)):
            got = self._new_from.get(new) or self._made_from.get(new)
            if got is not None and got[0] == old:
                return got[1]
        return None

    def drop(self, digest: bytes) -> None:
        """Forget a node (deleted from the database)."""
        self._maps.pop(digest, None)
        self._new_maps.pop(digest, None)
        self._new_from.pop(digest, None)
        self._made_from.pop(digest, None)

    def clear(self) -> None:
        """Forget everything (what a new process starts with)."""
        self._maps, self._entries, self._made_from = {}, 0, {}
        self.aborted()
