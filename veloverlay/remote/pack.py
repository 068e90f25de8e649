"""Packs: many small objects (or manifest nodes) in one registry blob, with a separate index.

Pack v1 (`application/vnd.veloverlay.pack.v1`): `b"VELOPACK"`, u32 version (1), then the entries'
bytes back to back, nothing between them. The index (`application/vnd.veloverlay.pack.index.v1`):
`b"VELOPIDX"`, u32 version (1), u32 count, then `count` records of 49 bytes, sorted by (kind,
digest) and unique: u8 kind (1 object, 2 node), 32-byte BLAKE3 digest, u64 offset, u64 length
(little endian; offsets into the pack blob). Taken in offset order, the entries cover the pack
from the end of its header to its end, back to back: no gap, no overlap (an index that says
otherwise is refused). A pack holds one kind only.

The index names content, the pack carries it: a puller reads every index (small) to learn which
objects a version offers and where, and fetches only the packs holding objects it lacks. Nothing
in a pack is trusted: every entry is hashed (BLAKE3, the node digest for nodes) before it gets a
name, and the pack's sha256 and size must equal its descriptor's.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from veloverlay.errors import Reason, VeloError
from veloverlay.store.digest import DIGEST_SIZE

__all__ = [
    "PACK_MAGIC",
    "PACK_HEADER",
    "KIND_OBJECT",
    "KIND_NODE",
    "Entry",
    "PackWriter",
    "encode_index",
    "decode_index",
    "index_bytes_max",
]

PACK_MAGIC = b"VELOPACK"
INDEX_MAGIC = b"VELOPIDX"
VERSION = 1
PACK_HEADER = PACK_MAGIC + struct.pack("<I", VERSION)
KIND_OBJECT = 1
KIND_NODE = 2
_REC = struct.Struct(f"<B{DIGEST_SIZE}sQQ")
_HEAD = struct.Struct("<8sII")
MAX_INDEX_ENTRIES = 4_000_000  # in one index, and in all the indexes of a version together


def index_bytes_max(indexes: int) -> int:
    """The most bytes `indexes` indexes of one version may hold together: MAX_INDEX_ENTRIES
    entries (a pull holds every entry of a version at once, about 150 bytes each in memory)."""
    return indexes * _HEAD.size + MAX_INDEX_ENTRIES * _REC.size


class Entry(NamedTuple):
    """One index entry (a tuple: tens of thousands are made per pull)."""

    kind: int
    digest: bytes
    offset: int
    length: int


class PackWriter:
    """Accumulates entries of one kind into a pack in memory (packs are size-bounded)."""

    def __init__(self, kind: int) -> None:
        self.kind = kind
        self.buf = bytearray(PACK_HEADER)
        self.entries: list[Entry] = []

    def add(self, digest: bytes, data: bytes) -> None:
        self.entries.append(Entry(self.kind, digest, len(self.buf), len(data)))
        self.buf += data

    @property
    def size(self) -> int:
        return len(self.buf)

    def finish(self) -> tuple[bytes, bytes]:
        return bytes(self.buf), encode_index(self.entries)


def encode_index(entries: list[Entry]) -> bytes:
    ordered = sorted(entries, key=lambda e: (e.kind, e.digest))
    out = bytearray(_HEAD.pack(INDEX_MAGIC, VERSION, len(ordered)))
    for e in ordered:
        out += _REC.pack(e.kind, e.digest, e.offset, e.length)
    return bytes(out)


def _bad(why: str) -> VeloError:
    return VeloError(
        f"invalid pack index on the remote: {why}",
        reason=Reason.REMOTE_INVALID,
        hint="the remote version is damaged or not made by veloverlay; nothing was stored from it",
    )


def decode_index(data: bytes, pack_size: int) -> list[Entry]:
    """Parse and check an index against the size of its pack."""
    if len(data) < _HEAD.size:
        raise _bad("truncated")
    magic, version, count = _HEAD.unpack_from(data)
    if magic != INDEX_MAGIC:
        raise _bad("bad magic")
    if version != VERSION:
        raise _bad(f"version {version} is not supported (this is {VERSION})")
    if count > MAX_INDEX_ENTRIES or len(data) != _HEAD.size + count * _REC.size:
        raise _bad("length does not match the entry count")
    raw = list(_REC.iter_unpack(memoryview(data)[_HEAD.size :]))
    keys = [(k, d) for k, d, _o, _n in raw]
    if any(a >= b for a, b in zip(keys, keys[1:], strict=False)):
        raise _bad("entries not sorted or not unique")
    if raw and not {k for k, _d, _o, _n in raw} <= {KIND_OBJECT, KIND_NODE}:
        raise _bad("unknown entry kind")
    # Back to back, as the format says: from the header to the pack's end, nothing between
    # (bytes no entry names would be fetched and held for nothing, and hide what a pack carries).
    at = len(PACK_HEADER)
    for o, n in sorted((o, n) for _k, _d, o, n in raw):
        if o < at:
            raise _bad(
                "entries overlap" if o >= len(PACK_HEADER) else "an entry lies in the header"
            )
        if o > at:
            raise _bad(f"bytes {at}..{o} of the pack belong to no entry")
        at = o + n
    if at != pack_size:
        raise _bad(
            "an entry lies outside its pack"
            if at > pack_size
            else f"bytes {at}..{pack_size} of the pack belong to no entry"
        )
    return list(map(Entry._make, raw))
