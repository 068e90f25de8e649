"""Merkle directory nodes and deltas: the pure data model (no I/O, no LMDB).

A directory node is the canonical encoding of the directory's own mode and mtime followed by its
entries sorted by name (bytes order). Its digest (BLAKE3 with a node domain key) names it; the
digest of the root node names a whole version. Entry kinds: FILE (content digest), DIR (child node
digest), SYMLINK (target bytes, kept as-is), MASK (a deletion of a path a lower ref provides).

Encoding v1 (little endian):
    node  = b"VDN1" u32 mode  i64 mtime_ns  u32 count  entry*count
    entry = u16 namelen name  u8 kind  u8 tier  u32 mode  u64 size  i64 mtime_ns  u16 paylen payload
DIR entries carry mode/size/mtime 0 (the child node holds its own), MASK entries carry nothing.
`decode` is strict: it is the validation of every node read from a bundle or the database.
"""

from __future__ import annotations

import bisect
import enum
import os
import struct
from collections.abc import Callable, Iterable, Mapping

from veloverlay.errors import Reason, VeloError
from veloverlay.paths import NAME_MAX, check_name
from veloverlay.records import Record
from veloverlay.store.digest import DIGEST_SIZE, Digest, node_digest

__all__ = [
    "Kind",
    "Entry",
    "Node",
    "NodeView",
    "encode",
    "encode_parts",
    "encode_mixed",
    "encode_changed",
    "entry_bytes",
    "dir_entry_bytes",
    "decode",
    "decode_attrs",
    "decode_entry",
    "entry_map",
    "links",
    "Op",
    "OpKind",
    "EMPTY_DIR_MODE",
    "clamp_mtime",
    "extent",
    "totals_of",
    "shape",
    "stored_shape",
    "Shape",
]

_MAGIC = b"VDN1"
_HEAD = struct.Struct("<4sIqI")
HEAD_SIZE = _HEAD.size
_ENT = struct.Struct("<BBIQqH")
EMPTY_DIR_MODE = 0o755
SYMLINK_MAX = 4095
MTIME_MIN, MTIME_MAX = -(2**63), 2**63 - 1  # the i64 of nanoseconds: 1677-09-21 .. 2262-04-11


def clamp_mtime(mtime_ns: int) -> int:
    """An mtime as a node records it. A filesystem can hold times an i64 of nanoseconds cannot
    (ext4 to 2446, tmpfs further; `touch -d 2300-01-01` is enough): they are recorded as the
    nearest bound, never an encoding error that would leave a session unharvestable."""
    return MTIME_MIN if mtime_ns < MTIME_MIN else MTIME_MAX if mtime_ns > MTIME_MAX else mtime_ns


class Kind(enum.IntEnum):
    FILE = 1
    DIR = 2
    SYMLINK = 3
    MASK = 4


class Entry(Record, frozen=True):
    """One name in a directory. `digest` for FILE/DIR, `target` for SYMLINK."""

    name: bytes
    kind: Kind
    mode: int = 0
    size: int = 0
    mtime_ns: int = 0
    digest: bytes = b""
    target: bytes = b""
    tier: int = 0

    @property
    def payload(self) -> bytes:
        return self.target if self.kind is Kind.SYMLINK else self.digest


class Node(Record, frozen=True):
    """A decoded directory node: its own metadata and its entries sorted by name."""

    mode: int
    mtime_ns: int
    entries: tuple[Entry, ...]

    def lookup(self, name: bytes) -> Entry | None:
        # Binary search: entries are sorted and unique.
        lo, hi = 0, len(self.entries)
        while lo < hi:
            mid = (lo + hi) // 2
            n = self.entries[mid].name
            if n < name:
                lo = mid + 1
            elif n > name:
                hi = mid
            else:
                return self.entries[mid]
        return None

    def as_dict(self) -> dict[bytes, Entry]:
        return {e.name: e for e in self.entries}


# Kind by its encoded byte (None: not a kind)
_KINDS: tuple[Kind | None, ...] = tuple(map({k.value: k for k in Kind}.get, range(256)))


class NodeView:
    """A stored node's own mode and mtime and its entries by name, each decoded when looked up
    (`entry_map`): what a walk that visits a few names of a wide directory needs (a harvest
    after a change to 10 files under 10,000 names)."""

    __slots__ = ("mode", "mtime_ns", "_encoded")

    def __init__(self, mode: int, mtime_ns: int, encoded: dict[bytes, bytes]) -> None:
        self.mode, self.mtime_ns, self._encoded = mode, mtime_ns, encoded

    def lookup(self, name: bytes) -> Entry | None:
        raw = self._encoded.get(name)
        return decode_entry(raw) if raw is not None else None


def _bad(msg: str) -> VeloError:
    return VeloError(f"malformed directory node: {msg}", reason=Reason.MANIFEST_CORRUPT)


def entry_bytes(
    name: bytes, kind: int, tier: int, mode: int, size: int, mtime_ns: int, payload: bytes
) -> bytes:
    """One entry's encoding (the caller has checked the name)."""
    return b"".join(
        (
            len(name).to_bytes(2, "little"),
            name,
            _ENT.pack(kind, tier, mode & 0o7777, size, clamp_mtime(mtime_ns), len(payload)),
            payload,
        )
    )


def dir_entry_bytes(name: bytes, digest: bytes) -> bytes:
    return entry_bytes(name, Kind.DIR, 0, 0, 0, 0, digest)


def encode_parts(
    mode: int, mtime_ns: int, count: int, parts: Iterable[bytes]
) -> tuple[Digest, bytes]:
    """A node from `count` entries already encoded (`entry_bytes`), given in name order."""
    data = b"".join((_HEAD.pack(_MAGIC, mode & 0o7777, clamp_mtime(mtime_ns), count), *parts))
    return node_digest(data), data


def encode(mode: int, mtime_ns: int, entries: Iterable[Entry]) -> tuple[Digest, bytes]:
    """Encode a node (entries in any order) and return (digest, encoding)."""
    ordered = sorted(entries, key=lambda e: e.name)
    parts = []
    prev: bytes | None = None
    for e in ordered:
        if e.name == prev:
            raise _bad(f"duplicate name '{os.fsdecode(e.name)}'")
        check_name(e.name)  # never write a node that decode() would refuse (BAD_NAME)
        prev = e.name
        payload = e.target if e.kind is Kind.SYMLINK else e.digest
        parts.append(entry_bytes(e.name, e.kind, e.tier, e.mode, e.size, e.mtime_ns, payload))
    return encode_parts(mode, mtime_ns, len(ordered), parts)


def encode_mixed(
    mode: int, mtime_ns: int, entries: Mapping[bytes, Entry | bytes]
) -> tuple[Digest, bytes]:
    """Encode a node from its entries by name, some still in their stored encodings (from
    `entry_map`: checked when they were stored), the others entries (checked as `encode` checks
    them): a change under a directory of 10,000 names re-encodes the changed ones only."""
    parts = []
    for name in sorted(entries):
        e = entries[name]
        if isinstance(e, bytes):
            parts.append(e)
            continue
        if e.name != name:
            raise _bad(f"entry '{os.fsdecode(e.name)}' filed as '{os.fsdecode(name)}'")
        check_name(name)
        payload = e.target if e.kind is Kind.SYMLINK else e.digest
        parts.append(entry_bytes(name, e.kind, e.tier, e.mode, e.size, e.mtime_ns, payload))
    return encode_parts(mode, mtime_ns, len(parts), parts)


def encode_changed(
    mode: int, mtime_ns: int, old: Mapping[bytes, bytes], changed: Mapping[bytes, Entry | None]
) -> tuple[Digest, bytes, dict[bytes, bytes]]:
    """Encode a node as `old` (an `entry_map` of a stored node, in name order) with `changed`
    names put (an entry) or removed (None), checked as `encode` checks them; also returns the
    new node's entry map. Each change is placed by bisection: the untouched entries are never
    looked at one by one (a 10-name change under a directory of 10,000 names costs a copy of
    two lists, not a sort and a loop over 10,000); many changes go through `encode_mixed`."""
    if 16 * len(changed) > len(old):
        entries: dict[bytes, Entry | bytes] = dict(old)
        for name, e in changed.items():
            if e is None:
                entries.pop(name, None)
            else:
                entries[name] = e
        digest, data = encode_mixed(mode, mtime_ns, entries)
        return digest, data, entry_map(data)[2]
    names = list(old)
    parts = list(old.values())
    kept: dict[bytes, bytes | None] = {}  # replaced or removed in place (None)
    inserted = False
    for name in sorted(changed):
        e = changed[name]
        i = bisect.bisect_left(names, name)
        here = i < len(names) and names[i] == name
        if e is None:
            if here:
                del names[i], parts[i]
                kept[name] = None
            continue
        if e.name != name:
            raise _bad(f"entry '{os.fsdecode(e.name)}' filed as '{os.fsdecode(name)}'")
        check_name(name)
        payload = e.target if e.kind is Kind.SYMLINK else e.digest
        enc = entry_bytes(name, e.kind, e.tier, e.mode, e.size, e.mtime_ns, payload)
        if here:
            parts[i] = enc
            kept[name] = enc
        else:
            names.insert(i, name)
            parts.insert(i, enc)
            inserted = True
    digest, data = encode_parts(mode, mtime_ns, len(parts), parts)
    if inserted:
        return digest, data, dict(zip(names, parts, strict=True))
    new_map = dict(old)  # a copy keeps the name order; only replaced and removed names differ
    for name, now in kept.items():
        if now is None:
            del new_map[name]
        else:
            new_map[name] = now
    return digest, data, new_map


def decode_attrs(data: bytes) -> tuple[int, int]:
    """A node's own (mode, mtime_ns), from its header alone, checked (`decode` and `entry_map`
    start here): what a session start needs of a root of 10,000 entries, without decoding them."""
    if len(data) < _HEAD.size:
        raise _bad("truncated header")
    magic, mode, mtime_ns, _count = _HEAD.unpack_from(data, 0)
    if magic != _MAGIC:
        raise _bad("bad magic")
    if mode & ~0o7777:
        raise _bad("mode has non-permission bits")
    return mode, mtime_ns


def decode(data: bytes) -> Node:
    """Strictly decode a node; any deviation from the canonical form raises MANIFEST_CORRUPT."""
    mode, mtime_ns = decode_attrs(data)
    count = _HEAD.unpack_from(data, 0)[3]
    off = _HEAD.size
    entries: list[Entry] = []
    prev = b""
    end = len(data)
    unpack = _ENT.unpack_from
    esize = _ENT.size
    add = entries.append
    file_, dir_, symlink = Kind.FILE, Kind.DIR, Kind.SYMLINK
    # ~1.3 us an entry (10,000 in ~13 ms): what reads a few names of a wide directory uses
    # entry_map / NodeView instead
    for _ in range(count):
        if off + 2 > end:
            raise _bad("truncated entry")
        nlen = data[off] | data[off + 1] << 8
        off += 2
        name = data[off : off + nlen]
        off += nlen
        if off + esize > end:  # (so the name is whole too)
            raise _bad("truncated entry")
        if not 0 < nlen <= NAME_MAX or b"/" in name or b"\0" in name or name in (b".", b".."):
            try:
                check_name(name)
            except VeloError as exc:
                raise _bad(exc.message) from None
        if name <= prev:  # (a name is never empty: the first one is above b"")
            raise _bad(f"entries not strictly sorted at '{os.fsdecode(name)}'")
        prev = name
        kind_v, tier, emode, size, emtime, plen = unpack(data, off)
        off += esize
        payload = data[off : off + plen]
        off += plen
        if len(payload) != plen:
            raise _bad("truncated payload")
        kind = _KINDS[kind_v]
        if kind is None:
            raise _bad(f"unknown kind {kind_v}")
        if emode & ~0o7777:
            raise _bad("entry mode has non-permission bits")
        if kind is file_:
            if plen != DIGEST_SIZE or tier not in (1, 2):
                raise _bad(f"bad file entry '{os.fsdecode(name)}'")
            add(Entry(name, kind, emode, size, emtime, payload, b"", tier))
        elif kind is dir_:
            if plen != DIGEST_SIZE or tier or emode or size or emtime:
                raise _bad(f"bad dir entry '{os.fsdecode(name)}'")
            add(Entry(name, kind, 0, 0, 0, payload))
        elif kind is symlink:
            if not 0 < plen <= SYMLINK_MAX or b"\0" in payload or tier or size != plen:
                raise _bad(f"bad symlink entry '{os.fsdecode(name)}'")
            add(Entry(name, kind, emode, size, emtime, b"", payload, 0))
        else:
            if plen or tier or emode or size or emtime:
                raise _bad(f"bad mask entry '{os.fsdecode(name)}'")
            add(Entry(name, kind))
    if off != end:
        raise _bad("trailing bytes")
    return Node(mode, mtime_ns, tuple(entries))


def entry_map(data: bytes) -> tuple[int, int, dict[bytes, bytes]]:
    """(mode, mtime_ns, {name: that entry's encoding}) of a node this store holds, its entries
    left encoded: equal encodings are equal entries (the encoding is canonical), so a diff
    decodes only the entries that differ (`decode_entry`) — a root of 10,000 names in ~3 ms
    where `decode` takes ~13. As `links`: never for bytes from elsewhere; truncated bytes still
    raise MANIFEST_CORRUPT."""
    mode, mtime_ns = decode_attrs(data)
    count = _HEAD.unpack_from(data, 0)[3]
    off = _HEAD.size
    end = len(data)
    plen_at = _ENT.size - 2  # the payload length ends the fixed part of an entry
    out: dict[bytes, bytes] = {}
    for _ in range(count):
        start = off
        if off + 2 > end:
            raise _bad("truncated entry")
        nlen = data[off] | data[off + 1] << 8
        off += 2 + nlen
        p = off + plen_at
        if p + 2 > end:
            raise _bad("truncated entry")
        off = p + 2 + (data[p] | data[p + 1] << 8)
        out[data[start + 2 : start + 2 + nlen]] = data[start:off]
    if off != end:
        raise _bad("trailing bytes" if off < end else "truncated payload")
    return mode, mtime_ns, out


def decode_entry(encoded: bytes) -> Entry:
    """One entry from its encoding (`entry_map`), checked as strictly as `decode` checks it."""
    return decode(_HEAD.pack(_MAGIC, 0, 0, 1) + encoded).entries[0]


def links(data: bytes) -> list[tuple[int, bytes, int]]:
    """(kind, digest, size) of the DIR and FILE entries of a node this store holds, without
    decoding the rest: a walk over a stored tree (push reads every node of a version) at a
    third of `decode`'s cost. Names, order and the other fields are not checked: a node got into
    the store through `encode` or a strict `decode`. Never for bytes from elsewhere; truncated
    bytes still raise MANIFEST_CORRUPT."""
    if len(data) < _HEAD.size or data[:4] != _MAGIC:
        raise _bad("bad header")
    count = _HEAD.unpack_from(data, 0)[3]
    off = _HEAD.size
    end = len(data)
    unpack = _ENT.unpack_from
    esize = _ENT.size
    out: list[tuple[int, bytes, int]] = []
    for _ in range(count):
        off += 2 + int.from_bytes(data[off : off + 2], "little")
        if off + esize > end:
            raise _bad("truncated entry")
        kind, _tier, _mode, size, _mtime, plen = unpack(data, off)
        off += esize + plen
        if kind == 1 or kind == 2:  # FILE, DIR: the payload is a digest
            if plen != DIGEST_SIZE or off > end:
                raise _bad("truncated payload")
            out.append((kind, data[off - plen : off], size))
    if off != end:
        raise _bad("trailing bytes")
    return out


# What a walk over a whole tree needs of a node: its DIR entries (child digest, name length),
# whether it has other entries (0 or 1) and their longest name (`extent`), whether a file has
# setuid/setgid bits (`incoming.strip_setid`), how many entries it has, and the sizes of its
# files summed (a checkout's byte total).
Shape = tuple[list[tuple[bytes, int]], int, int, bool, int, int]
_SETID = 0o6000


def shape(node: Node) -> Shape:
    dirs = [(e.digest, len(e.name)) for e in node.entries if e.kind is Kind.DIR]
    names = [len(e.name) for e in node.entries if e.kind is not Kind.DIR]
    setid = any(e.kind is Kind.FILE and e.mode & _SETID for e in node.entries)
    size = sum(e.size for e in node.entries if e.kind is Kind.FILE)
    return dirs, 1 if names else 0, max(names, default=0), setid, len(node.entries), size


def stored_shape(data: bytes) -> Shape:
    """`shape` of a node this store holds, read without a full decode (as `links`: names and the
    other fields are not checked; never for bytes from elsewhere)."""
    if len(data) < _HEAD.size or data[:4] != _MAGIC:
        raise _bad("bad header")
    count = _HEAD.unpack_from(data, 0)[3]
    off = _HEAD.size
    end = len(data)
    unpack = _ENT.unpack_from
    esize = _ENT.size
    dirs: list[tuple[bytes, int]] = []
    flat = longest = size = 0
    setid = False
    for _ in range(count):
        nlen = int.from_bytes(data[off : off + 2], "little")
        off += 2 + nlen
        if off + esize > end:
            raise _bad("truncated entry")
        kind, _tier, mode, fsize, _mtime, plen = unpack(data, off)
        off += esize + plen
        if kind == 2:  # DIR
            if plen != DIGEST_SIZE or off > end:
                raise _bad("truncated payload")
            dirs.append((data[off - plen : off], nlen))
        else:
            flat = 1
            longest = max(longest, nlen)
            setid = setid or (kind == 1 and bool(mode & _SETID))
            size += fsize if kind == 1 else 0
    if off != end:
        raise _bad("trailing bytes")
    return dirs, flat, longest, setid, count, size


def extent(root: bytes, load: Callable[[bytes], Node]) -> tuple[int, int, int]:
    """(levels, bytes, entries) of the deepest and of the longest path in the tree `root`, and
    how many paths it has (a subtree named from two places counts twice: a checkout makes it
    twice), each node read once through `load` (shared subtrees are not walked twice; no
    recursion, whatever the depth). The root alone is (0, 0, 0); a file at its top is
    (1, len(name), 1)."""
    depth, length, count, _size = totals_of(root, lambda d: shape(load(d)))
    return depth, length, count


def totals_of(root: bytes, load: Callable[[bytes], Shape]) -> tuple[int, int, int, int]:
    """`extent` and the file bytes below `root` (a subtree named twice counts twice), each node
    read once as its `Shape`, bottom-up by an explicit stack: the one walk over a whole tree's
    nodes that `extent`, `incoming` and checkout's progress totals share."""
    memo: dict[bytes, tuple[int, int, int, int]] = {}
    stack: list[tuple[bytes, Shape | None]] = [(root, None)]
    while stack:
        digest, sh = stack.pop()
        if digest in memo:
            continue
        if sh is None:
            sh = load(digest)
            stack.append((digest, sh))
            stack.extend((d, None) for d, _n in sh[0])
            continue
        dirs, depth, length, _setid, count, size = sh
        for d, nlen in dirs:
            sub_depth, sub_len, sub_count, sub_size = memo[d]
            depth = max(depth, sub_depth + 1)
            length = max(length, nlen + (sub_len + 1 if sub_len else 0))
            count += sub_count
            size += sub_size
        memo[digest] = (depth, length, count, size)
    return memo[root]


class OpKind(enum.Enum):
    """A path operation in a delta."""

    PUT = "put"
    """Place `entry` at the path, replacing whatever was there (for a DIR: a whole subtree)."""
    DELETE = "delete"
    """Remove the path (and its subtree)."""
    META = "meta"
    """Change mode and mtime of an existing path, keeping its content."""


class Op(Record, frozen=True):
    kind: OpKind
    path: bytes
    entry: Entry | None = None
    mode: int = 0
    mtime_ns: int = 0

    def to_json(self) -> list[object]:
        from os import fsdecode

        out: list[object] = [self.kind.value, fsdecode(self.path)]
        if self.entry is not None:
            e = self.entry
            out += [int(e.kind), e.mode, e.size, e.mtime_ns, e.payload.hex(), e.tier]
        elif self.kind is OpKind.META:
            out += [self.mode, self.mtime_ns]
        return out
