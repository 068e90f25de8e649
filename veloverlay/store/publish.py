"""Renaming staged objects to their names: the middle step of `Stage.publish` (cas.py), run
by whichever process staged or was handed them, between the two syncfs of the durability order.
"""

from __future__ import annotations

import errno
import os

from veloverlay import _libc, faults, fsflags, verity
from veloverlay.errors import SysError
from veloverlay.store.cas import OBJECTS_V2, Store, _Chunk, _store_error

__all__ = ["UNPROTECTED", "unprotected", "forget_unprotected"]

# Objects named without the +i that real root gives every object: one line each,
# `<hex> <ERRNO>`, or `* <ERRNO>` when the filesystem has no inode flags at all (then this
# process stops trying). `status` shows them; `fsck --repair` sets +i and clears the record.
UNPROTECTED = "unprotected-v1"
_NO_FLAGS = (errno.ENOTTY, errno.EOPNOTSUPP)
_flags_missing: set[bytes] = set()  # stores whose filesystem refused +i (this process)

_stores: dict[str, Store] = {}


def _publish_chunk(job: _Chunk) -> int:
    """Rename staged files to their object names (in any process; shard dirs cached per store),
    each sealed with fs-verity first when `seal`."""
    root, items, seal = job
    store = _stores.get(root)
    if store is None:
        store = _stores[root] = Store(root)
    elif store.fanout == 2 and os.path.isdir(os.path.join(root, OBJECTS_V2)):
        store.choose_layout()  # gc migrated the store since this process cached it
    objfd = os.open(store.objects_b, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    published = 0
    try:
        for digest, path in items:
            if _rename_noreplace(store, objfd, path, digest, seal):
                faults.point("publish.renamed")
                published += 1
            else:
                os.unlink(path)
    finally:
        os.close(objfd)
    return published


def _seal(path: bytes) -> None:
    """fs-verity on a staged object; a full store is STORE_FULL, like any write."""
    try:
        verity.seal(path)
    except OSError as exc:
        call = exc.syscall if isinstance(exc, SysError) else "open"
        raise _store_error(exc, call, path) from exc


_AT_FDCWD = -100


def _rename_noreplace(store: Store, objfd: int, path: bytes, digest: bytes, seal: bool) -> bool:
    """Move the staged `path` to the object's name unless that exists; False if it did.

    One `renameat2(RENAME_NOREPLACE)`, relative to the objects directory: an identical object
    may exist already (another writer), and then the older inode is kept (it may carry +i and
    short-name links). A shard directory that gc removed (empty) since this process made it is
    made again."""
    hexname = digest.hex().encode()
    rel = store.object_relpath_b(digest)[1:]
    if seal:  # sealing costs a read of the file: not for an object that exists already
        if os.path.lexists(b"%s/%s" % (store.objects_b, rel)):
            return False
        _seal(path)
    for attempt in (0, 1):
        try:
            store.shard_dir(hexname)
        except OSError as exc:  # ENOSPC/EDQUOT creating a shard: STORE_FULL like any write
            raise _store_error(exc, "mkdir", store.objects_b + b"/" + hexname[:4]) from exc
        try:
            _libc.renameat2(_AT_FDCWD, path, objfd, rel, _libc.RENAME_NOREPLACE)
        except OSError as exc:
            if exc.errno == errno.EEXIST:
                return False
            if exc.errno == errno.ENOENT and attempt == 0 and os.path.lexists(path):
                store._known_shards.discard(b"%s/%s" % (store.objects_b, rel.rpartition(b"/")[0]))
                continue
            if exc.errno not in (errno.EINVAL, errno.ENOSYS):
                raise _store_error(exc, "rename", path, store.objects_b + b"/" + rel) from exc
            break
        # Named now: a failure recording it unprotected is not the rename's.
        _protect(store, store.objects_b + b"/" + rel)
        return True
    # A filesystem without RENAME_NOREPLACE: check, then rename.
    dst = b"%s/%s" % (store.objects_b, rel)
    if os.path.lexists(dst):
        return False
    try:
        os.rename(path, dst)
    except OSError as exc:
        raise _store_error(exc, "rename", path, dst) from exc
    _protect(store, dst)
    return True


def _protect(store: Store, path: bytes) -> None:
    """As real root, an object is immutable (+i) from the moment it is named, before the second
    syncfs: no process (root's included) can change its bytes through a hard link made later.
    Anyone else cannot set it (doctor says which protection holds). Where real root fails, the
    object is recorded in UNPROTECTED, never passed over in silence (STYLE B6)."""
    if not fsflags.may_set_immutable() or store.objects_b in _flags_missing:
        return
    try:
        fsflags.set_immutable(os.fsdecode(path), True)
    except OSError as exc:
        code = exc.errno or errno.EIO
        if code in _NO_FLAGS:
            _flags_missing.add(store.objects_b)
        name = b"*" if code in _NO_FLAGS else os.path.basename(path)
        line = b"%s %s\n" % (name, errno.errorcode.get(code, str(code)).encode())
        record = os.path.join(os.fsencode(store.root), UNPROTECTED.encode())
        try:
            fd = os.open(
                record, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644
            )
            try:
                os.write(fd, line)  # one short O_APPEND write: whole lines from any process
            finally:
                os.close(fd)
        except OSError as werr:
            raise _store_error(werr, "write", record) from werr


def unprotected(store: Store) -> list[tuple[str, str]]:
    """The recorded (object hex or '*', errno name) pairs; empty when none."""
    try:
        data = (store.root / UNPROTECTED).read_bytes()
    except FileNotFoundError:
        return []
    out = []
    for line in data.decode("ascii", "replace").splitlines():
        name, _, code = line.partition(" ")
        if name and code:
            out.append((name, code))
    return out


def forget_unprotected(store: Store) -> None:
    (store.root / UNPROTECTED).unlink(missing_ok=True)
