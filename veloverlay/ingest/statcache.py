"""The ingest stat cache: per ref and source directory, what the last ingest saw there.

One LMDB value per directory (key `ref \\0 config \\0 dir-path`, in the manifest database's
`statcache` sub-database): the directory's own (ino, mtime, ctime, mode), the digest of the node
the last ingest built for it, and per name: regular files (ino, size, mtime, ctime, content
digest, permission bits as listed and as stored: `ACL`), symlinks (ino, mtime, ctime) and
subdirectories (node digest). A re-ingest that finds a directory and everything in it unchanged
reuses the node digest without reading a file or encoding a node; a file whose stat matches is
never re-read (nor its ACL). `config` is a hash of what else
shapes a node (tier rules, setid policy, source path) and of the cache's own format (`FORMAT`):
changing it invalidates the cache. So a cache written by another version of veloverlay, with
another format or none, is under other keys: never loaded, and pruned at the next write. (The
first format had no number, its keys hashed without one: `config` never equals its.)

Entries are only as good as the stat they were taken from: files and directories modified within
the racy window of an ingest are not cached (ingest.py), so the next ingest looks again.

Every value must name only nodes and objects of the ref's last ingested root (a gc root): a value
left from another tree names what `gc --keep` may delete, and a later ingest would commit those
digests without the objects. Ingests of one ref can run at once (the store lock is shared), so
`write` cannot trust the keys `load` saw: a stamp (key `ref \\0`, new at every write) says whether
another ingest wrote meanwhile, and then every key of the ref is replaced, not just the changed.
"""

from __future__ import annotations

import json
import os
import struct

from veloverlay.records import Record, field
from veloverlay.store.digest import hash_bytes
from veloverlay.store.manifest import Manifests, Txn
from veloverlay.store.tree import clamp_mtime

__all__ = [
    "FORMAT",
    "ACL",
    "config",
    "DirCache",
    "without_digests",
    "encode",
    "encode_parts",
    "file_bytes",
    "link_bytes",
    "decode",
    "load",
    "write",
    "drop",
]

# The format of the values and of what they name (the node encoding their digests were made
# with): bump it with any change to either. (1: the unnumbered first format; 2: files with an
# extended ACL were cached, so a hit stored their mask as group bits; 3: files with an extended
# ACL were never cached, so read again at every ingest.)
FORMAT = 4

# A file's cached modes: its permission bits as listed (a hit must list the same: a chmod in the
# ctime's tick is seen) and as stored (an extended ACL's narrowing applied, posixacl; before the
# setid policy), with `ACL` or'ed in when an extended ACL narrowed them (counted as such on a
# hit). A changed ACL changes the ctime (setfacl), and a file changed within the racy window of
# an ingest is never cached (as for its content).
ACL = 0x1000

_HEAD = struct.Struct("<QqqI32sIII")
_FILE = struct.Struct("<QQqq32sHH")
_LINK = struct.Struct("<Qqq")
_NAME = struct.Struct("<H")


def config(rules: list[list[object]], keep_setid: bool, top: str) -> bytes:
    """The `config` part of the keys for an ingest of `top` with these tier rules (JSON) and
    setid policy, in this cache format."""
    what = json.dumps({"format": FORMAT, "rules": rules, "keep_setid": keep_setid, "top": top})
    return hash_bytes(what.encode()).hex()[:16].encode()


class DirCache(Record):
    ino: int
    mtime_ns: int
    ctime_ns: int
    mode: int
    node: bytes
    files: dict[bytes, tuple[int, int, int, int, bytes, int, int]] = field(default_factory=dict)
    links: dict[bytes, tuple[int, int, int]] = field(default_factory=dict)
    subs: dict[bytes, bytes] = field(default_factory=dict)


def file_bytes(
    name: bytes,
    ino: int,
    size: int,
    mtime_ns: int,
    ctime_ns: int,
    digest: bytes,
    listed: int,
    stored: int,
) -> bytes:
    """A file's part of a value; `listed`, `stored`: its permission bits as listed and as stored
    (`ACL` or'ed in when an extended ACL narrowed them)."""
    return b"".join(
        (
            _NAME.pack(len(name)),
            name,
            _FILE.pack(ino, size, clamp_mtime(mtime_ns), ctime_ns, digest, listed, stored),
        )
    )


def link_bytes(name: bytes, ino: int, mtime_ns: int, ctime_ns: int) -> bytes:
    return b"".join((_NAME.pack(len(name)), name, _LINK.pack(ino, clamp_mtime(mtime_ns), ctime_ns)))


def encode_parts(
    head: tuple[int, int, int, int, bytes],
    nfiles: int,
    files: bytes,
    nlinks: int,
    links: bytes,
    subs: list[tuple[bytes, bytes]],
) -> bytes:
    """A value from pre-encoded parts: head = (ino, mtime_ns, ctime_ns, mode, node); `files` and
    `links` are concatenations of `file_bytes` and `link_bytes`; subs are (name, node digest).
    An mtime out of an i64's range is kept as its bound (tree.clamp_mtime), which differs from
    what the next stat returns: such an entry is looked at again, never trusted."""
    ino, mtime_ns, ctime_ns, mode, node = head
    parts = [
        _HEAD.pack(ino, clamp_mtime(mtime_ns), ctime_ns, mode, node, nfiles, nlinks, len(subs))
    ]
    parts += [files, links]
    for name, digest in subs:
        parts += [_NAME.pack(len(name)), name, digest]
    return b"".join(parts)


def encode(dc: DirCache) -> bytes:
    files = b"".join(file_bytes(n, *f) for n, f in dc.files.items())
    links = b"".join(link_bytes(n, *ln) for n, ln in dc.links.items())
    head = (dc.ino, dc.mtime_ns, dc.ctime_ns, dc.mode, dc.node)
    return encode_parts(head, len(dc.files), files, len(dc.links), links, list(dc.subs.items()))


def decode(raw: bytes) -> DirCache | None:
    """Decode a cache value; a damaged one is treated as absent (the cache is only a hint)."""
    try:
        ino, mtime, ctime, mode, node, nf, nl, ns = _HEAD.unpack_from(raw, 0)
        dc = DirCache(ino, mtime, ctime, mode, node)
        off = _HEAD.size
        for count, size, kind in ((nf, _FILE.size, 0), (nl, _LINK.size, 1), (ns, 32, 2)):
            for _ in range(count):
                (n,) = _NAME.unpack_from(raw, off)
                off += 2
                name = raw[off : off + n]
                off += n
                if kind == 0:
                    dc.files[name] = _FILE.unpack_from(raw, off)
                elif kind == 1:
                    dc.links[name] = _LINK.unpack_from(raw, off)
                else:
                    dc.subs[name] = raw[off : off + 32]
                off += size
        return dc if off == len(raw) else None
    except struct.error:
        return None


def _prefix(ref: str) -> bytes:
    return ref.encode() + b"\0"


def load(m: Manifests, ref: str, config: bytes) -> tuple[dict[bytes, bytes], list[bytes]]:
    """Raw values of `ref`'s directories under `config`, and every key `ref` has (to prune; the
    first is the stamp's, `ref \\0`, even when there is none yet: `write` compares them)."""
    prefix = _prefix(ref)
    mine = prefix + config + b"\0"
    values: dict[bytes, bytes] = {}
    keys: list[bytes] = [prefix]
    with m.read() as txn, txn.cursor(db=m.statcache) as cur:
        if cur.set_range(prefix):
            for k, v in cur:
                k = bytes(k)
                if not k.startswith(prefix):
                    break
                if k == prefix:
                    keys[0] += bytes(v)  # the stamp: the key, then its value
                    continue
                keys.append(k)
                if k.startswith(mine):
                    values[k[len(mine) :]] = bytes(v)
    return values, keys


def write(
    m: Manifests,
    txn: Txn,
    ref: str,
    config: bytes,
    old_keys: list[bytes],
    old: dict[bytes, bytes],
    new: dict[bytes, bytes],
) -> None:
    prefix = _prefix(ref)
    mine = prefix + config + b"\0"
    stamp = txn.get(prefix, db=m.statcache)
    if old_keys[:1] != [prefix + (bytes(stamp) if stamp is not None else b"")]:
        # Another ingest of this ref wrote since `load` (or the ref was deleted): its keys and
        # values are not those loaded. Replace them all.
        old_keys, old = _keys(txn, m, prefix), {}
    keep = {mine + rel for rel in new}
    changed = False
    for k in old_keys[1:]:
        if k not in keep:
            txn.delete(k, db=m.statcache)
            changed = True
    limit = m.env.max_key_size()
    for rel, raw in new.items():
        # A directory whose key would exceed LMDB's key limit (511 bytes: deep paths of long
        # names) is not cached: it is simply read again next time.
        if old.get(rel) != raw and len(mine) + len(rel) <= limit:
            txn.put(mine + rel, raw, db=m.statcache)
            changed = True
    if changed or stamp is None:
        txn.put(prefix, os.urandom(16), db=m.statcache)


def _keys(txn: Txn, m: Manifests, prefix: bytes) -> list[bytes]:
    """Every key of the ref `prefix` in `txn`, the stamp's first (as `load` lists them)."""
    keys = [prefix]
    with txn.cursor(db=m.statcache) as cur:
        if cur.set_range(prefix):
            for k in cur.iternext(keys=True, values=False):
                k = bytes(k)
                if not k.startswith(prefix):
                    break
                if k != prefix:
                    keys.append(k)
    return keys


def drop(m: Manifests, txn: Txn, ref: str) -> None:
    prefix = _prefix(ref)
    with txn.cursor(db=m.statcache) as cur:
        if cur.set_range(prefix):
            while bytes(cur.key()).startswith(prefix):
                if not cur.delete():
                    break


def without_digests(cache: dict[bytes, bytes], digests: set[bytes]) -> dict[bytes, bytes]:
    """`cache` without the directories whose cached files name any of `digests` (they are
    listed and read again)."""
    out: dict[bytes, bytes] = {}
    for rel, raw in cache.items():
        dc = decode(raw)
        if dc is not None and not any(f[4] in digests for f in dc.files.values()):
            out[rel] = raw
    return out
