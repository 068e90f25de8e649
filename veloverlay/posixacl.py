"""POSIX access ACLs, read so that a stored mode never grants more than the source's ACL did.

A file with an extended ACL (named entries, hence a mask) shows the *mask* in its mode's group
bits: `group::---`, `user:1501:r--`, `mask::r--` stats as 0640, though the owning group may
read nothing. Stored as 0640, a checkout or session into a setgid team directory would show the
file to the whole group. veloverlay keeps no ACLs (no owners, no xattrs: DESIGN.md's data
model), so the conservative rule is: the stored group bits are the ACL's group-owner entry ANDed
with the mask (and with the mode's group bits); the owner and other bits are the mode's (the
kernel keeps them equal to the ACL's `user::` and `other::` entries, and the mask never applies
to them). Named user and group entries are dropped: those users and groups lose what the entries
gave them (callers warn once). Default ACLs (`system.posix_acl_default`, directories only) say
what new files get and are not kept either.

The ACL is read as the xattr `system.posix_acl_access` in the kernel's binary format
(`include/uapi/linux/posix_acl_xattr.h`): a little-endian u32 version (2), then 8-byte entries
(u16 tag, u16 perm, u32 id). Reading it costs one `flistxattr` on a descriptor the caller
already holds (`mode_of`; a `fgetxattr` too where the ACL is listed), or one `lgetxattr` of the
name in a directory held by descriptor (`mode_at`, through /proc/self/fd: an O_PATH descriptor
cannot read xattrs; without /proc, by a descriptor of the file opened for it, and an ACL that
cannot be read at all fails closed), and none for a mode whose group bits are already 0 (no mask
can narrow them).

Imports the standard library only.
"""

from __future__ import annotations

import errno
import os
import stat
import struct

from veloverlay import _libc

__all__ = ["ACCESS", "access_acl", "narrow", "mode_of", "mode_at"]

ACCESS = "system.posix_acl_access"
_VERSION = 2
_ENTRY = struct.Struct("<HHI")
_GROUP_OBJ, _MASK = 0x04, 0x10
_NAMED = (0x02, 0x08)  # ACL_USER, ACL_GROUP
_NO_ACL = (errno.ENODATA, errno.EOPNOTSUPP)  # no ACL; a filesystem without ACLs


def access_acl(fd: int, perm: int) -> bytes | None:
    """The access ACL of the open file `fd` whose mode has the permission bits `perm`, or None
    when it has none or none can narrow `perm` (its group bits are 0 already)."""
    if not perm & 0o070:
        return None
    try:
        # Most files have no xattrs at all: listing them (an empty list) costs 0.4 us here,
        # a getxattr that fails with ENODATA 1.5 us with its exception (on every file read).
        if ACCESS not in os.listxattr(fd):
            return None
        return os.getxattr(fd, ACCESS)
    except OSError as exc:
        if exc.errno in _NO_ACL:
            return None
        raise


def narrow(perm: int, acl: bytes | None) -> tuple[int, bool]:
    """(`perm` with its group bits narrowed to what `acl` gives the owning group, whether `acl`
    is an extended one: entries were dropped or bits narrowed). A minimal ACL (no mask) is the
    mode itself. An ACL that cannot be parsed keeps only the owner's bits."""
    if acl is None:
        return perm, False
    n = len(acl) - 4
    if n < 0 or n % _ENTRY.size or int.from_bytes(acl[:4], "little") != _VERSION:
        return perm & ~0o077, True
    group_obj = mask = -1
    for off in range(4, len(acl), _ENTRY.size):
        tag, bits, _id = _ENTRY.unpack_from(acl, off)
        if tag == _GROUP_OBJ:
            group_obj = bits & 7
        elif tag == _MASK:
            mask = bits & 7
    if mask < 0:
        return perm, False
    if group_obj < 0:
        return perm & ~0o077, True
    group = (perm >> 3) & group_obj & mask & 7
    return (perm & ~0o070) | (group << 3), True


def mode_of(fd: int, perm: int) -> tuple[int, bool]:
    """`narrow(perm, access_acl(fd, perm))`: the permission bits to store for the open file or
    directory `fd`, and whether it had an extended ACL."""
    return narrow(perm, access_acl(fd, perm))


def mode_at(dfd: int, name: bytes, perm: int) -> int:
    """The permission bits to store for `name` (never followed) in the directory `dfd` whose
    lstat gave `perm`: `narrow`ed by its access ACL. A name gone meanwhile keeps `perm` (the
    caller meets its absence itself). Without /proc (a mount namespace that has none, another
    pid namespace's /proc) the ACL is read by a descriptor of `name` (`_mode_opened`); an ACL
    that cannot be read at all fails closed: the owning group gets nothing."""
    if not perm & 0o070:
        return perm
    try:
        acl = _libc.getxattr_at(dfd, name, ACCESS)
    except OSError as exc:
        if exc.errno in _NO_ACL:
            return perm
        if exc.errno != errno.ENOENT:
            raise
        # /proc/self/fd/N missing (no /proc here) or `name` gone: ask the directory.
        return _mode_opened(dfd, name, perm)
    return narrow(perm, acl)[0]


_OPEN = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


def _mode_opened(dfd: int, name: bytes, perm: int) -> int:
    """`mode_at` without /proc: the ACL of `name` in `dfd` read by a descriptor of it, opened only
    when it is a regular file or directory (never followed, never blocking) and checked to be
    the inode listed. One that cannot be opened (no read permission) or was replaced meanwhile
    fails closed (`perm` without its group bits); a symlink has no ACL; a name gone keeps `perm`."""
    try:
        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
    except FileNotFoundError:
        return perm
    if stat.S_ISLNK(st.st_mode):
        return perm
    if stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode):
        try:
            fd = os.open(name, _OPEN, dir_fd=dfd)
        except FileNotFoundError:
            return perm
        except OSError:
            fd = -1
        if fd >= 0:
            try:
                fst = os.fstat(fd)
                if (fst.st_dev, fst.st_ino) == (st.st_dev, st.st_ino):
                    return mode_of(fd, perm)[0]
            finally:
                os.close(fd)
    return perm & ~0o070
