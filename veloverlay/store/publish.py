"""Renaming staged objects to their names: the middle step of `Stage.publish` (cas.py), run
by whichever process staged or was handed them, between the two syncfs of the durability order.
"""

from __future__ import annotations

import errno
import os

from veloverlay import _libc, faults, files, fsflags, verity
from veloverlay.errors import Reason, SysError, VeloError
from veloverlay.store import access
from veloverlay.store.cas import Store
from veloverlay.store.stage import Chunk, staged_name, store_error

__all__ = [
    "UNPROTECTED",
    "Shards",
    "name_held",
    "unprotected",
    "forget_unprotected",
    "publish_chunk",
    "rename_noreplace",
]

# Objects named without the +i that real root gives every object: one line each,
# `<hex> <ERRNO>`, or `* <ERRNO>` when the filesystem has no inode flags at all (then this
# process stops trying). `status` shows them; `fsck --repair` sets +i and clears the record.
UNPROTECTED = "unprotected-v1"
_NO_FLAGS = (errno.ENOTTY, errno.EOPNOTSUPP)
_flags_missing: set[bytes] = set()  # stores whose filesystem refused +i (this process)


def publish_chunk(job: Chunk) -> int:
    """Rename staged files (by `<stage>/<file>` in the store's tmp/) to their object names, each
    sealed with fs-verity first when `seal`; every step relative to the store's descriptors."""
    store, items, seal = job
    stages: dict[bytes, int] = {}
    published = 0
    shards = Shards(store)
    try:
        for digest, path in sorted(items):
            stage, name = staged_name(path)
            fd = stages.get(stage)
            if fd is None:
                shown = os.path.dirname(path)
                fd = stages[stage] = access.open_dir(stage, dir_fd=store.tmp_fd(), shown=shown)
            if rename_noreplace(store, fd, name, path, digest, seal, shards):
                faults.point("publish.renamed")
                published += 1
            else:
                os.unlink(name, dir_fd=fd)
    finally:
        shards.drop()
        for fd in stages.values():
            os.close(fd)
    return published


def _seal(store: Store, stage_fd: int, name: bytes, shown: bytes) -> None:
    """fs-verity on a staged object; a full store is STORE_FULL, like any write. Refused as
    unsupported: the cached verdict (fsverity-v1.json) was wrong, e.g. a filesystem made anew
    under the same device number, or the file damaged; probed again, and where fs-verity does
    not work the object is published unsealed (store.verity() now says so: no other is tried)."""
    try:
        verity.seal_at(stage_fd, name)
    except OSError as exc:
        if exc.errno in verity.UNSUPPORTED and not store.verity(recheck=True)[0]:
            return
        call = exc.syscall if isinstance(exc, SysError) else "open"
        raise store_error(exc, call, shown) from exc


class Shards:
    """The fan-out directory objects are being named in, kept open while the next object goes
    to the same one (callers go in name order): one descriptor at a time, whatever the count."""

    __slots__ = ("store", "key", "fd")

    def __init__(self, store: Store) -> None:
        self.store, self.key, self.fd = store, b"", -1

    def get(self, hexname: bytes) -> int:
        key = hexname[: 2 * self.store.fanout]
        if self.fd < 0 or key != self.key:
            self.drop()
            try:
                self.fd = self.store.open_shard(hexname)
            except OSError as exc:  # ENOSPC/EDQUOT making a shard: STORE_FULL like any write
                raise store_error(exc, "mkdir", self.store.shard_dir_path(hexname)) from exc
            self.key = key
        return self.fd

    def drop(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Shards:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.drop()


def rename_noreplace(
    store: Store,
    stage_fd: int,
    name: bytes,
    shown: bytes,
    digest: bytes,
    seal: bool,
    shards: Shards | None = None,
) -> bool:
    """Move the staged file `name` (in the stage directory `stage_fd`; `shown` in messages) to
    the object's name unless that exists; False if it did. `shards` holds the shard directory
    from one call to the next.

    One `renameat2(RENAME_NOREPLACE)` between the two directories' descriptors: an identical
    object may exist already (another writer), and then the older inode is kept (it may carry +i
    and short-name links). A shard directory that gc removed (empty) since it was opened is made
    again."""
    if shards is None:
        with Shards(store) as own:
            return rename_noreplace(store, stage_fd, name, shown, digest, seal, own)
    hexname = digest.hex().encode()
    for attempt in (0, 1):
        shard = shards.get(hexname)
        if seal and attempt == 0 and store.verity()[0]:  # (False once a seal found it wrong)
            if access.exists_at(shard, hexname):  # sealing costs a read: not for one that exists
                return False
            _seal(store, stage_fd, name, shown)
        try:
            _libc.renameat2(stage_fd, name, shard, hexname, _libc.RENAME_NOREPLACE)
        except OSError as exc:
            if exc.errno == errno.EEXIST:
                return False
            if exc.errno == errno.ENOENT and attempt == 0 and access.exists_at(stage_fd, name):
                shards.drop()  # gc removed the (empty) shard since it was opened: made again
                continue
            dst = store.shard_dir_path(hexname) + b"/" + hexname
            if exc.errno not in (errno.EINVAL, errno.ENOSYS):
                raise store_error(exc, "rename", shown, dst) from exc
            return _rename_checked(store, stage_fd, name, shown, shard, hexname, dst)
        # Named now: a failure recording it unprotected is not the rename's.
        _protect(store, shard, hexname)
        return True
    raise AssertionError("unreachable: the second attempt returns or raises")


def _rename_checked(
    store: Store, stage_fd: int, name: bytes, shown: bytes, shard: int, hexname: bytes, dst: bytes
) -> bool:
    """A filesystem without RENAME_NOREPLACE: check, then rename."""
    if access.exists_at(shard, hexname):
        return False
    try:
        os.rename(name, hexname, src_dir_fd=stage_fd, dst_dir_fd=shard)
    except OSError as exc:
        raise store_error(exc, "rename", shown, dst) from exc
    _protect(store, shard, hexname)
    return True


def name_held(store: Store, held: dict[bytes, int], shards: Shards) -> list[bytes]:
    """Name the unnamed files (O_TMPFILE) open as `held` (digest -> descriptor), whose bytes
    are synced already, in name order, and close them all (an object that exists already is
    kept: the held file vanishes with its descriptor); `held` is left empty. Returns the
    digests named."""
    named: list[bytes] = []
    try:
        for digest, fd in sorted(held.items()):
            hexname = digest.hex().encode()
            for attempt in (0, 1):
                shard = shards.get(hexname)
                try:
                    _libc.link_fd(fd, shard, hexname)
                except OSError as exc:
                    if exc.errno == errno.EEXIST:
                        break
                    if exc.errno == errno.ENOENT and attempt == 0:
                        shards.drop()  # gc removed the (empty) shard since it was opened
                        continue
                    dst = store.shard_dir_path(hexname) + b"/" + hexname
                    raise store_error(exc, "linkat", dst) from exc
                faults.point("publish.renamed")
                named.append(digest)
                _protect(store, shard, hexname, fd)
                break
            os.close(fd)
            held[digest] = -1
    finally:
        for left in held.values():
            if left >= 0:
                os.close(left)
        held.clear()
    return named


def _protect(store: Store, shard: int, hexname: bytes, fd: int = -1) -> None:
    """As real root, an object is immutable (+i) from the moment it is named, before the second
    syncfs: no process (root's included) can change its bytes through a hard link made later.
    Anyone else cannot set it (doctor says which protection holds). Where real root fails, the
    object is recorded in UNPROTECTED, never passed over in silence (STYLE B6)."""
    if not fsflags.may_set_immutable() or store.objects_b in _flags_missing:
        return
    try:
        if fd >= 0:
            fsflags.set_immutable_fd(fd, hexname, True)
        else:
            fsflags.set_immutable_at(shard, hexname, True)
    except OSError as exc:
        code = exc.errno or errno.EIO
        if code in _NO_FLAGS:
            _flags_missing.add(store.objects_b)
        label = b"*" if code in _NO_FLAGS else hexname
        line = b"%s %s\n" % (label, errno.errorcode.get(code, str(code)).encode())
        record = os.path.join(os.fsencode(store.root), UNPROTECTED.encode())
        # open_regular: a FIFO planted under its name fails (ENXIO) instead of blocking the
        # publish for ever; anything but a regular file is refused.
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT
        try:
            with files.exact_modes():
                fd = files.open_regular(UNPROTECTED, flags, 0o644, dir_fd=store.fd)
            try:
                os.write(fd, line)  # one short O_APPEND write: whole lines from any process
            finally:
                os.close(fd)
        except files.NotRegular:
            err = OSError(errno.EINVAL, "not a regular file")
            raise store_error(err, "write", record) from None
        except OSError as werr:
            raise store_error(werr, "write", record) from werr


def unprotected(store: Store) -> list[tuple[str, str]]:
    """The recorded (object hex or '*', errno name) pairs; empty when none."""
    try:
        data = files.read_regular(store.root / UNPROTECTED)
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as exc:  # a FIFO read would block every doctor and fsck
        raise VeloError(
            f"{store.root / UNPROTECTED} cannot be read: {exc}",
            reason=Reason.STORE_UNSAFE,
            hint="remove it; the next session that cannot set +i writes it again",
        ) from None
    out = []
    for line in data.decode("ascii", "replace").splitlines():
        name, _, code = line.partition(" ")
        if name and code:
            out.append((name, code))
    return out


def forget_unprotected(store: Store) -> None:
    (store.root / UNPROTECTED).unlink(missing_ok=True)
