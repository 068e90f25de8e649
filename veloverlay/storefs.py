"""The filesystem under a store, a cache or an overlay's upper dir, checked at a given path:
may a store live there (`store_fs_check`: not NFS/SMB, which LMDB's locking and overlay uppers
need), and does it hold user.* (or trusted.*) xattrs (`user_xattrs`: overlay's `userxattr`
markers). `probe.detect()` asks what the host can do; this asks about one place.

Imports the standard library and the facilities `_libc`, `mountinfo` and `probe` (`Feature`).
"""

from __future__ import annotations

import errno
import os
import tempfile

from veloverlay import _libc, mountinfo
from veloverlay.errors import SysError
from veloverlay.probe import Feature

__all__ = ["store_fs_check", "user_xattrs"]


# Filesystems a store must not live on: LMDB's locking and overlay uppers need a local fs.
_NETWORK_MAGIC = {
    _libc.NFS_SUPER_MAGIC: "nfs",
    _libc.SMB_SUPER_MAGIC: "smb",
    _libc.CIFS_SUPER_MAGIC: "cifs",
    _libc.SMB2_SUPER_MAGIC: "smb2",
}
_NETWORK_FSTYPES = frozenset({"nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "afs", "ceph"})


def store_fs_check(path: str | os.PathLike[str]) -> Feature:
    """Is `path` on a filesystem a store may live on? Refuses NFS/SMB (LMDB, overlay uppers)."""
    real = os.path.realpath(path)
    probe_at = real
    while not os.path.exists(probe_at):
        probe_at = os.path.dirname(probe_at)
    try:
        magic = _libc.statfs_type(probe_at)
    except SysError as exc:
        # as probe words a failed call: 'call path: ERRNO (hint)'
        code = errno.errorcode.get(exc.errno or 0, str(exc.errno))
        where = f" {exc.filename}" if exc.filename else ""
        why = f"{exc.syscall}{where}: {code} ({exc.hint or exc.strerror})"
        return Feature(False, f"cannot check the filesystem: {why}")
    if magic in _NETWORK_MAGIC:
        return Feature(False, f"{probe_at} is on {_NETWORK_MAGIC[magic]} (f_type {magic:#x})")
    fstype = mountinfo.fstype_at(probe_at)
    if fstype in _NETWORK_FSTYPES:
        return Feature(False, f"{probe_at} is on a {fstype} mount")
    return Feature(True, f"{probe_at} is on {fstype or 'a local filesystem'} (f_type {magic:#x})")


def user_xattrs(path: str | os.PathLike[str], namespace: str = "user") -> Feature:
    """Can `path`'s filesystem hold user.* xattrs? Overlay with `userxattr` keeps its whiteout,
    opaque and redirect markers there: without them (tmpfs before Linux 6.6) renames and
    deletes of lower directories fail with EIO (found by the VM matrix on 6.1). With
    `namespace="trusted"` (real root only): the markers of root's root-native overlay, which
    tmpfs has always held."""
    try:
        fd, name = tempfile.mkstemp(prefix=".velo-xattr-", dir=path)
    except OSError as exc:
        return Feature(False, f"cannot create a probe file in {path}: {exc.strerror}")
    try:
        os.setxattr(fd, f"{namespace}.velo.probe", b"1")
        return Feature(True, f"{namespace} xattrs work under {path}")
    except OSError as exc:
        code = errno.errorcode.get(exc.errno or 0, str(exc.errno))
        return Feature(False, f"setxattr({namespace}.*) under {path}: {code} ({exc.strerror})")
    finally:
        os.close(fd)
        os.unlink(name)
