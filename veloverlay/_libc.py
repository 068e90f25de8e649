"""The one ctypes layer: libc prototypes, kernel constants and typed syscall wrappers.

Owns every `ctypes` use in the package (no other module may import ctypes). Prototypes are declared
once at import; the variadic `ioctl`, `prctl` and `syscall` get one separate prototype per argument
shape instead of re-assigning `argtypes` at call sites (global mutable state; STYLE C6). Every
wrapper returns the call's result or raises `errors.SysError` naming the call and its path(s).

Imports only the standard library and `veloverlay.errors`. The new mount API, `mount_setattr` and
`openat2` go through raw `syscall(NR)`: glibc 2.36 has some of the wrappers, older ones do not, and
the numbers (424 and up) are unified across architectures.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import struct
from collections.abc import Callable
from typing import Any

from veloverlay.errors import SysError

__all__ = [
    "libc",
    "check",
    "unshare",
    "mount",
    "umount2",
    "fsopen",
    "fsconfig",
    "fsmount",
    "move_mount",
    "open_tree",
    "mount_setattr",
    "cloexec_from",
    "syncfs",
    "openat2",
    "ioctl_getflags",
    "ioctl_setflags",
    "ficlone",
    "enable_verity",
    "measure_verity",
    "set_dumpable",
    "statfs_type",
    "fstatfs_type",
    "statx_size_immutable",
    "ofd_lock",
]

Path = str | bytes | os.PathLike[str] | os.PathLike[bytes]

libc = ctypes.CDLL(None, use_errno=True)

# --- <linux/sched.h> -------------------------------------------------------------------------
CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

# --- <linux/mount.h> (classic mount flags) -----------------------------------------------------
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_NOATIME = 0x400
MS_NODIRATIME = 0x800
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_RELATIME = 1 << 21
MS_STRICTATIME = 1 << 24

# --- <linux/fs.h> / <sys/mount.h>: umount2 flags ------------------------------------------------
MNT_FORCE = 0x1
MNT_DETACH = 0x2
UMOUNT_NOFOLLOW = 0x8

# --- <linux/mount.h> (new mount API) -----------------------------------------------------------
FSOPEN_CLOEXEC = 0x1
FSCONFIG_SET_FLAG = 0
FSCONFIG_SET_STRING = 1
FSCONFIG_SET_BINARY = 2
FSCONFIG_SET_PATH = 3
FSCONFIG_SET_PATH_EMPTY = 4
FSCONFIG_SET_FD = 5
FSCONFIG_CMD_CREATE = 6
FSCONFIG_CMD_RECONFIGURE = 7
FSMOUNT_CLOEXEC = 0x1
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MOUNT_ATTR_NOEXEC = 0x8
MOUNT_ATTR__ATIME = 0x70
MOUNT_ATTR_RELATIME = 0x0
MOUNT_ATTR_NOATIME = 0x10
MOUNT_ATTR_STRICTATIME = 0x20
MOUNT_ATTR_NODIRATIME = 0x80
MOUNT_ATTR_IDMAP = 0x100000
MOUNT_ATTR_NOSYMFOLLOW = 0x200000
MOUNT_ATTR_SIZE_VER0 = 32
MOVE_MOUNT_F_SYMLINKS = 0x1
MOVE_MOUNT_F_AUTOMOUNTS = 0x2
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOVE_MOUNT_T_SYMLINKS = 0x10
MOVE_MOUNT_T_AUTOMOUNTS = 0x20
MOVE_MOUNT_T_EMPTY_PATH = 0x40
OPEN_TREE_CLONE = 0x1
OPEN_TREE_CLOEXEC = os.O_CLOEXEC

# --- <linux/fcntl.h> ---------------------------------------------------------------------------
AT_FDCWD = -100
AT_SYMLINK_NOFOLLOW = 0x100
AT_EMPTY_PATH = 0x1000
AT_SYMLINK_FOLLOW = 0x400
AT_RECURSIVE = 0x8000
F_OFD_SETLK = 37
F_OFD_SETLKW = 38
F_RDLCK = 0
F_WRLCK = 1
_FLOCK = struct.Struct("@hhqqi4x")  # struct flock: l_type, l_whence, l_start, l_len, l_pid

# --- <linux/openat2.h> -------------------------------------------------------------------------
RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
RESOLVE_IN_ROOT = 0x10
RESOLVE_CACHED = 0x20

# --- <linux/fs.h>: inode flags ioctls, FICLONE ------------------------------------------------
FS_IOC_GETFLAGS = 0x80086601  # _IOR('f', 1, long); the kernel reads and writes an int
FS_IOC_SETFLAGS = 0x40086602  # _IOW('f', 2, long)
FS_IMMUTABLE_FL = 0x00000010
FS_APPEND_FL = 0x00000020
FS_NOCOW_FL = 0x00800000
FICLONE = 0x40049409  # _IOW(0x94, 9, int)
FS_IOC_FSGETXATTR = 0x801C581F  # _IOR('X', 31, struct fsxattr) (28 bytes; fsx_projid at 12)

# --- <linux/fsverity.h> ------------------------------------------------------------------------
FS_IOC_ENABLE_VERITY = 0x40806685  # _IOW('f', 133, struct fsverity_enable_arg) (128 bytes)
FS_IOC_MEASURE_VERITY = 0xC0046686  # _IOWR('f', 134, struct fsverity_digest) (4-byte header)
FS_VERITY_HASH_ALG_SHA256 = 1
FS_VERITY_FL = 0x00100000  # <linux/fs.h>: the inode has fs-verity enabled (read-only flag)
FS_VERITY_MAX_DIGEST_SIZE = 64  # <linux/fsverity.h> (SHA-512)

# --- <linux/prctl.h> ---------------------------------------------------------------------------
PR_SET_DUMPABLE = 4

# --- <linux/magic.h> ---------------------------------------------------------------------------
OVERLAYFS_SUPER_MAGIC = 0x794C7630
NFS_SUPER_MAGIC = 0x6969
SMB_SUPER_MAGIC = 0x517B
CIFS_SUPER_MAGIC = 0xFF534D42
SMB2_SUPER_MAGIC = 0xFE534D42
TMPFS_MAGIC = 0x01021994
# Multigrain timestamps (Linux 6.13+): a change after a stat always gets another ctime than the
# stat saw. Elsewhere (ramfs, FUSE, NFS, 9p, vfat...) ctime is as coarse as the clock's tick.
MGTIME_FS_MAGIC = frozenset({0xEF53, 0x58465342, 0x9123683E, TMPFS_MAGIC})  # ext4 xfs btrfs tmpfs
# Kernel interfaces, not file trees: their files' sizes do not tell their contents (procfs says
# 0, sysfs 4096) and reading some has effects. Ingest keeps their mount points empty.
PSEUDO_FS_MAGIC = {
    0x9FA0: "proc",
    0x62656572: "sysfs",
    0x64626720: "debugfs",
    0x74726163: "tracefs",
    0x73636673: "securityfs",
    0x27E0EB: "cgroup",
    0x63677270: "cgroup2",
    0xCAFE4A11: "bpf",
    0x62656570: "configfs",
    0x6165676C: "pstore",
    0xDE5E81E4: "efivarfs",
    0xF97CFF8C: "selinuxfs",
    0x43415D53: "smackfs",
    0x65735543: "fusectl",
    0x42494E4D: "binfmt_misc",
    0x19800202: "mqueue",
    0x1CD1: "devpts",
    0x6E736673: "nsfs",
}

# --- syscall numbers --------------------------------------------------------------------------
# Since Linux 5.2 new syscalls share one number on every architecture except alpha (which adds
# 110); x86_64 (asm/unistd_64.h) and aarch64 (asm-generic/unistd.h) both use these.
_UNIFIED_NR = {
    "open_tree": 428,
    "move_mount": 429,
    "fsopen": 430,
    "fsconfig": 431,
    "fsmount": 432,
    "close_range": 436,
    "openat2": 437,
    "mount_setattr": 442,
    "getxattrat": 464,
    "listxattrat": 465,
}
_ARCHES_WITH_UNIFIED_NR = frozenset({"x86_64", "aarch64", "arm64"})
_ENOSYS_NR = -1  # makes the kernel answer ENOSYS on an architecture we have no table for


def _nr(name: str) -> int:
    if os.uname().machine in _ARCHES_WITH_UNIFIED_NR:
        return _UNIFIED_NR[name]
    return _ENOSYS_NR


# --- structs ----------------------------------------------------------------------------------
class mount_attr(ctypes.Structure):  # noqa: N801 - named like the kernel struct
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


class open_how(ctypes.Structure):  # noqa: N801
    _fields_ = [
        ("flags", ctypes.c_uint64),
        ("mode", ctypes.c_uint64),
        ("resolve", ctypes.c_uint64),
    ]


class xattr_args(ctypes.Structure):  # noqa: N801
    _fields_ = [
        ("value", ctypes.c_uint64),
        ("size", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
    ]


class fsverity_enable_arg(ctypes.Structure):  # noqa: N801
    _fields_ = [
        ("version", ctypes.c_uint32),
        ("hash_algorithm", ctypes.c_uint32),
        ("block_size", ctypes.c_uint32),
        ("salt_size", ctypes.c_uint32),
        ("salt_ptr", ctypes.c_uint64),
        ("sig_size", ctypes.c_uint32),
        ("reserved1", ctypes.c_uint32),
        ("sig_ptr", ctypes.c_uint64),
        ("reserved2", ctypes.c_uint64 * 11),
    ]


# --- prototypes (declared once) ---------------------------------------------------------------
_c_int, _c_uint, _c_ulong, _c_long = ctypes.c_int, ctypes.c_uint, ctypes.c_ulong, ctypes.c_long
_c_char_p, _c_void_p, _c_size_t = ctypes.c_char_p, ctypes.c_void_p, ctypes.c_size_t


def _proto(name: str, restype: Any, *argtypes: Any) -> Callable[..., int]:
    """A private function object for `name` with a fixed signature.

    `CFUNCTYPE(...)((name, libc))` makes a new foreign-function object each time, so the variadic
    `syscall`/`ioctl`/`prctl` can have several shapes without touching a shared `argtypes`.
    """
    factory = ctypes.CFUNCTYPE(restype, *argtypes, use_errno=True)
    fn: Callable[..., int] = factory((name, libc))
    return fn


_unshare = _proto("unshare", _c_int, _c_int)
_mount = _proto("mount", _c_int, _c_char_p, _c_char_p, _c_char_p, _c_ulong, _c_char_p)
_umount2 = _proto("umount2", _c_int, _c_char_p, _c_int)
_syncfs = _proto("syncfs", _c_int, _c_int)
_renameat2 = _proto("renameat2", _c_int, _c_int, _c_char_p, _c_int, _c_char_p, _c_uint)
_linkat = _proto("linkat", _c_int, _c_int, _c_char_p, _c_int, _c_char_p, _c_int)
_statfs = _proto("statfs", _c_int, _c_char_p, _c_void_p)
_fstatfs = _proto("fstatfs", _c_int, _c_int, _c_void_p)
_statx = _proto("statx", _c_int, _c_int, _c_char_p, _c_int, _c_uint, _c_void_p)
_ioctl_int = _proto("ioctl", _c_int, _c_int, _c_ulong, _c_int)
_ioctl_ptr = _proto("ioctl", _c_int, _c_int, _c_ulong, _c_void_p)
_prctl = _proto("prctl", _c_int, _c_int, _c_ulong, _c_ulong, _c_ulong, _c_ulong)
# syscall(NR, ...) shapes, one per new-mount-API call
_sys_fsopen = _proto("syscall", _c_long, _c_long, _c_char_p, _c_uint)
_sys_fsconfig = _proto("syscall", _c_long, _c_long, _c_int, _c_uint, _c_char_p, _c_char_p, _c_int)
_sys_fsmount = _proto("syscall", _c_long, _c_long, _c_int, _c_uint, _c_uint)
_sys_move_mount = _proto("syscall", _c_long, _c_long, _c_int, _c_char_p, _c_int, _c_char_p, _c_uint)
_sys_open_tree = _proto("syscall", _c_long, _c_long, _c_int, _c_char_p, _c_uint)
_sys_mount_setattr = _proto(
    "syscall", _c_long, _c_long, _c_int, _c_char_p, _c_uint, _c_void_p, _c_size_t
)
_sys_openat2 = _proto("syscall", _c_long, _c_long, _c_int, _c_char_p, _c_void_p, _c_size_t)
_sys_getxattrat = _proto(
    "syscall", _c_long, _c_long, _c_int, _c_char_p, _c_uint, _c_char_p, _c_void_p, _c_size_t
)
_sys_listxattrat = _proto(
    "syscall", _c_long, _c_long, _c_int, _c_char_p, _c_uint, _c_char_p, _c_size_t
)
_sys_close_range = _proto("syscall", _c_long, _c_long, _c_uint, _c_uint, _c_uint)


# --- helpers ----------------------------------------------------------------------------------
def check(
    ret: int,
    syscall: str,
    path: Path | None = None,
    path2: Path | None = None,
) -> int:
    """Return `ret`, or raise `SysError(errno, syscall, path, path2)` when it is negative."""
    if ret < 0:
        raise SysError(ctypes.get_errno(), syscall, path, path2)
    return ret


def _b(path: Path | None) -> bytes | None:
    return None if path is None else os.fsencode(path)


# --- wrappers ---------------------------------------------------------------------------------
def unshare(flags: int) -> None:
    check(_unshare(flags), "unshare")


def mount(
    source: Path | None,
    target: Path,
    fstype: str | bytes | None,
    flags: int,
    data: str | bytes | None,
) -> None:
    fs = fstype.encode() if isinstance(fstype, str) else fstype
    opts = data.encode() if isinstance(data, str) else data
    check(_mount(_b(source), _b(target), fs, flags, opts), "mount", target)


def umount2(target: Path, flags: int = 0) -> None:
    check(_umount2(_b(target), flags), "umount2", target)


def fsopen(fsname: str, flags: int = FSOPEN_CLOEXEC) -> int:
    return check(_sys_fsopen(_nr("fsopen"), fsname.encode(), flags), "fsopen", fsname)


def fsconfig(
    fd: int,
    cmd: int,
    key: str | None = None,
    value: str | bytes | None = None,
    aux: int = 0,
) -> None:
    """fsconfig(2). A failure names `key=value` (or the key alone) as the error's path."""
    k = key.encode() if key is not None else None
    v = value.encode() if isinstance(value, str) else value
    ret = _sys_fsconfig(_nr("fsconfig"), fd, cmd, k, v, aux)
    if ret < 0:
        where = None if k is None else k if v is None else k + b"=" + v
        check(ret, "fsconfig", where)


def fsmount(fd: int, flags: int = FSMOUNT_CLOEXEC, attrs: int = 0) -> int:
    return check(_sys_fsmount(_nr("fsmount"), fd, flags, attrs), "fsmount")


def move_mount(
    from_dfd: int,
    from_path: Path,
    to_dfd: int,
    to_path: Path,
    flags: int,
) -> None:
    ret = _sys_move_mount(_nr("move_mount"), from_dfd, _b(from_path), to_dfd, _b(to_path), flags)
    check(ret, "move_mount", to_path)


def open_tree(dfd: int, path: Path, flags: int) -> int:
    return check(_sys_open_tree(_nr("open_tree"), dfd, _b(path), flags), "open_tree", path)


CLOSE_RANGE_CLOEXEC = 1 << 2


def cloexec_from(first: int) -> None:
    """Mark every descriptor from `first` up close-on-exec (close_range(2) with
    CLOSE_RANGE_CLOEXEC, Linux >= 5.11; older kernels raise ENOSYS or EINVAL)."""
    ret = _sys_close_range(_nr("close_range"), first, 0xFFFFFFFF, CLOSE_RANGE_CLOEXEC)
    check(ret, "close_range")


def mount_setattr(
    dfd: int,
    path: Path,
    flags: int,
    *,
    attr_set: int = 0,
    attr_clr: int = 0,
    propagation: int = 0,
    userns_fd: int = 0,
) -> None:
    attr = mount_attr(attr_set, attr_clr, propagation, userns_fd)
    ret = _sys_mount_setattr(
        _nr("mount_setattr"), dfd, _b(path), flags, ctypes.byref(attr), ctypes.sizeof(attr)
    )
    check(ret, "mount_setattr", path)


def syncfs(fd: int) -> None:
    check(_syncfs(fd), "syncfs")


RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2


def renameat2(olddirfd: int, old: bytes, newdirfd: int, new: bytes, flags: int) -> None:
    """renameat2(2); `RENAME_NOREPLACE` fails with EEXIST instead of replacing `new`."""
    if _renameat2(olddirfd, old, newdirfd, new, flags) < 0:
        raise SysError(ctypes.get_errno(), "renameat2", old, new)


_link_by_proc = False  # this kernel refused AT_EMPTY_PATH to this process once: use /proc


def link_fd(fd: int, newdirfd: int, new: bytes) -> None:
    """Give the open file `fd` (e.g. an O_TMPFILE) the name `new` in `newdirfd`; EEXIST if the
    name exists. linkat(AT_EMPTY_PATH), which kernels before 6.10 allow only with
    CAP_DAC_READ_SEARCH, else linkat of /proc/self/fd/N (following that one link)."""
    global _link_by_proc
    if not _link_by_proc:
        if _linkat(fd, b"", newdirfd, new, AT_EMPTY_PATH) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.ENOENT, errno.EPERM, errno.EINVAL):
            raise SysError(err, "linkat", None, new)
    proc = b"/proc/self/fd/%d" % fd
    if _linkat(AT_FDCWD, proc, newdirfd, new, AT_SYMLINK_FOLLOW) < 0:
        raise SysError(ctypes.get_errno(), "linkat", proc, new)
    # The refusal is ENOENT, which a directory removed meanwhile gives too: /proc for good
    # only once it did what AT_EMPTY_PATH did not.
    _link_by_proc = True


_getxattrat_missing = False
_XATTR_SIZE_MAX = 65536
_XA_SIZE = ctypes.sizeof(xattr_args)


def getxattr_at(dfd: int, name: bytes, attr: str) -> bytes:
    """The extended attribute `attr` of the entry `name` of the directory `dfd`, never following
    a symbolic link: lgetxattr of /proc/self/fd/N/name (from Python, twice as fast as a ctypes
    call), or where /proc is not mounted, getxattrat (Linux 6.13). OSError: ENODATA when the
    attribute is absent, ENOENT when the name is (or, before 6.13, when /proc is)."""
    global _getxattrat_missing
    try:
        return os.getxattr(b"/proc/self/fd/%d/%s" % (dfd, name), attr, follow_symlinks=False)
    except FileNotFoundError:
        if _getxattrat_missing or os.path.isdir("/proc/self/fd"):
            raise
    size = 256
    while True:
        buf = ctypes.create_string_buffer(size)
        args = xattr_args(ctypes.addressof(buf), size, 0)
        nr, flags = _nr("getxattrat"), AT_SYMLINK_NOFOLLOW
        n = _sys_getxattrat(nr, dfd, name, flags, attr.encode(), ctypes.byref(args), _XA_SIZE)
        if n >= 0:
            return buf.raw[:n]
        err = ctypes.get_errno()
        if err == errno.ERANGE and size < _XATTR_SIZE_MAX:
            size = _XATTR_SIZE_MAX
            continue
        if err == errno.ENOSYS:
            _getxattrat_missing = True
            err = errno.ENOENT  # as /proc/self/fd/N/name said
        raise SysError(err, "getxattrat", name)


def listxattr_at(dfd: int, name: bytes) -> list[str]:
    """The names of the extended attributes of the entry `name` of `dfd`, never following a
    symbolic link: as `getxattr_at`, by /proc or else listxattrat (Linux 6.13)."""
    global _getxattrat_missing
    try:
        return os.listxattr(b"/proc/self/fd/%d/%s" % (dfd, name), follow_symlinks=False)
    except FileNotFoundError:
        if _getxattrat_missing or os.path.isdir("/proc/self/fd"):
            raise
    buf = ctypes.create_string_buffer(_XATTR_SIZE_MAX)
    nr, flags = _nr("listxattrat"), AT_SYMLINK_NOFOLLOW
    n = _sys_listxattrat(nr, dfd, name, flags, buf, _XATTR_SIZE_MAX)
    if n >= 0:
        return [os.fsdecode(a) for a in buf.raw[:n].split(b"\0") if a]
    err = ctypes.get_errno()
    if err == errno.ENOSYS:
        _getxattrat_missing = True
        err = errno.ENOENT
    raise SysError(err, "listxattrat", name)


def openat2(dirfd: int, path: Path, flags: int, mode: int = 0, resolve: int = 0) -> int:
    how = open_how(flags, mode, resolve)
    ret = _sys_openat2(_nr("openat2"), dirfd, _b(path), ctypes.byref(how), ctypes.sizeof(how))
    return check(ret, "openat2", path)


def ioctl_getflags(fd: int) -> int:
    flags = ctypes.c_int(0)
    check(_ioctl_ptr(fd, FS_IOC_GETFLAGS, ctypes.byref(flags)), "ioctl(FS_IOC_GETFLAGS)")
    return flags.value


def ioctl_setflags(fd: int, flags: int) -> None:
    value = ctypes.c_int(flags)
    check(_ioctl_ptr(fd, FS_IOC_SETFLAGS, ctypes.byref(value)), "ioctl(FS_IOC_SETFLAGS)")


def ioctl_getprojid(fd: int) -> int:
    """The inode's project id (struct fsxattr's fsx_projid)."""
    buf = (ctypes.c_uint32 * 7)()
    check(_ioctl_ptr(fd, FS_IOC_FSGETXATTR, ctypes.byref(buf)), "ioctl(FS_IOC_FSGETXATTR)")
    return int(buf[3])


def ficlone(dst_fd: int, src_fd: int) -> None:
    check(_ioctl_int(dst_fd, FICLONE, src_fd), "ioctl(FICLONE)")


def enable_verity(fd: int, *, block_size: int = 4096) -> None:
    """FS_IOC_ENABLE_VERITY with SHA-256 and no salt or signature."""
    arg = fsverity_enable_arg(version=1, hash_algorithm=FS_VERITY_HASH_ALG_SHA256)
    arg.block_size = block_size
    check(_ioctl_ptr(fd, FS_IOC_ENABLE_VERITY, ctypes.byref(arg)), "ioctl(FS_IOC_ENABLE_VERITY)")


def measure_verity(fd: int) -> tuple[int, bytes]:
    """FS_IOC_MEASURE_VERITY: (hash algorithm, the file's fs-verity digest). ENODATA when the file
    has no verity; the kernel reads only the stored descriptor, never the data."""
    buf = (ctypes.c_uint8 * (4 + FS_VERITY_MAX_DIGEST_SIZE))()
    header = ctypes.cast(buf, ctypes.POINTER(ctypes.c_uint16))
    header[1] = FS_VERITY_MAX_DIGEST_SIZE  # in: room for the digest; out: its size
    check(_ioctl_ptr(fd, FS_IOC_MEASURE_VERITY, ctypes.byref(buf)), "ioctl(FS_IOC_MEASURE_VERITY)")
    size = min(int(header[1]), FS_VERITY_MAX_DIGEST_SIZE)
    return int(header[0]), bytes(buf[4 : 4 + size])


def set_dumpable(*, on: bool = True) -> None:
    """prctl(PR_SET_DUMPABLE). A process that changed its uids is non-dumpable, which makes its
    /proc/self files belong to root, so it could no longer write its own uid_map (measured)."""
    check(_prctl(PR_SET_DUMPABLE, 1 if on else 0, 0, 0, 0), "prctl(PR_SET_DUMPABLE)")


def statfs_type(path: Path) -> int:
    """statfs(2)'s f_type (a *_SUPER_MAGIC), which os.statvfs does not expose.

    f_type is the first member of struct statfs (a `long` on 64-bit Linux); the buffer is larger
    than the struct on every architecture.
    """
    buf = (ctypes.c_long * 64)()
    check(_statfs(_b(path), ctypes.byref(buf)), "statfs", path)
    return int(buf[0]) & 0xFFFFFFFF


def fstatfs_type(fd: int) -> int:
    """`statfs_type` of the filesystem the open file `fd` is on."""
    buf = (ctypes.c_long * 64)()
    check(_fstatfs(fd, ctypes.byref(buf)), "fstatfs")
    return int(buf[0]) & 0xFFFFFFFF


# --- <linux/stat.h>: statx --------------------------------------------------------------------
STATX_SIZE = 0x200
STATX_ATTR_IMMUTABLE = 0x10
# struct statx: stx_attributes at 8, stx_size at 40, stx_attributes_mask at 56 (256 bytes).
_STATX = struct.Struct("<8xQ24xQ8xQ")
_STATX_BUF = ctypes.create_string_buffer(256)  # reused: its caller (a layer build) has one thread


def statx_size_immutable(path: Path) -> tuple[int, bool | None]:
    """(size, immutable) of `path` (a symlink itself, not followed) by one statx(2): the inode
    flag without opening the file. `immutable` is None where the filesystem does not report it."""
    raw = path if isinstance(path, bytes) else os.fsencode(path)
    check(_statx(AT_FDCWD, raw, AT_SYMLINK_NOFOLLOW, STATX_SIZE, _STATX_BUF), "statx", path)
    attrs, size, mask = _STATX.unpack_from(_STATX_BUF)
    return size, bool(attrs & STATX_ATTR_IMMUTABLE) if mask & STATX_ATTR_IMMUTABLE else None


def ofd_lock(fd: int, *, write: bool, wait: bool) -> None:
    """An open-file-description lock on all of `fd` (fcntl F_OFD_SETLK(W)): a read lock, or a
    write lock, which needs `fd` open for writing (EBADF otherwise), so that a user who may
    only read the file cannot take it. Like flock it belongs to the open file description (a
    forked child shares it; the last close releases it), and like flock it is not released
    by another descriptor of the file being closed. Held by someone else and not `wait`:
    BlockingIOError. Through the fcntl module, which retries on EINTR and runs signal handlers
    (an exception from one ends the wait)."""
    arg = _FLOCK.pack(F_WRLCK if write else F_RDLCK, os.SEEK_SET, 0, 0, 0)
    try:
        fcntl.fcntl(fd, F_OFD_SETLKW if wait else F_OFD_SETLK, arg)
    except PermissionError as exc:  # EACCES: POSIX lets F_SETLK say "held" so too
        if wait:
            raise
        raise BlockingIOError(errno.EAGAIN, os.strerror(errno.EAGAIN)) from exc
