"""fs-verity: files the kernel itself keeps immutable, for their owner, without root.

Owns FS_IOC_ENABLE_VERITY, FS_IOC_MEASURE_VERITY and the FS_VERITY_FL inode flag. Once verity is
enabled on a file (SHA-256 Merkle tree over 4096-byte blocks, no salt, no signature), the kernel
refuses every open for writing and every truncate — EPERM, for anyone, root included, forever —
and checks every page read against the tree (EIO on a mismatch). It protects content, not names:
the file can still be renamed, unlinked or chmod-ed by its owner.

Facts this module relies on (Linux fs/verity/enable.c, measured in the VM matrix): enabling needs
a regular file opened read-only, no writable fd open anywhere (else ETXTBSY), and write
*permission* on the inode (EACCES for a 0444 file unless the caller may override it), so `seal`
grants the owner u+w for the duration of the ioctl and restores the mode. It needs
CONFIG_FS_VERITY (EOPNOTSUPP/ENOTTY without it) and, on ext4, the `verity` feature bit
(`mkfs.ext4 -O verity`; EOPNOTSUPP without it); btrfs needs no bit; tmpfs has no verity.

`usable_under(dir)` tries it for real on a scratch file; `cached_support` keeps that answer per
boot, kernel, filesystem and euid in a small JSON file, so the hot path costs one read of it.

Imports only the standard library and the leaves `_libc` and `errors`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
from pathlib import Path

from veloverlay import _libc
from veloverlay.errors import SysError, VeloError
from veloverlay.files import write_json_atomic

__all__ = [
    "FS_VERITY_FL",
    "BLOCK_SIZE",
    "enable_fd",
    "seal",
    "seal_at",
    "measure_fd",
    "measure",
    "is_enabled_fd",
    "is_enabled",
    "usable_under",
    "cached_support",
    "UNSUPPORTED",
]

FS_VERITY_FL = _libc.FS_VERITY_FL
BLOCK_SIZE = 4096
HASH_ALGORITHM = "sha256"

# What FS_IOC_ENABLE_VERITY fails with where there is no fs-verity at all (see above).
UNSUPPORTED = (errno.EOPNOTSUPP, errno.ENOTTY)

StrPath = str | bytes | os.PathLike[str] | os.PathLike[bytes]
_OPEN_RO = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


def _named(path: StrPath, exc: SysError) -> SysError:
    """The ioctl only knew an fd; name the path (the hint is recomputed from syscall+errno)."""
    return SysError(exc.errno or errno.EIO, exc.syscall, path)


def enable_fd(fd: int) -> None:
    """FS_IOC_ENABLE_VERITY on a read-only fd (SHA-256, 4096-byte blocks)."""
    _libc.enable_verity(fd, block_size=BLOCK_SIZE)


def seal(path: StrPath) -> bool:
    """Enable verity on the regular file `path`; False when it had verity already.

    A file without owner write permission (a 0444 object) gets u+w for the duration of the
    ioctl — the kernel asks for write permission, not a writable fd — and its mode back after.
    """
    return seal_at(None, path)


def seal_at(dir_fd: int | None, name: StrPath) -> bool:
    """`seal` of `name` in the directory `dir_fd` (no symbolic link followed)."""
    fd = os.open(name, _OPEN_RO, dir_fd=dir_fd)
    try:
        mode = stat.S_IMODE(os.fstat(fd).st_mode)
        granted = not mode & stat.S_IWUSR
        if granted:
            os.fchmod(fd, mode | stat.S_IWUSR)
        try:
            enable_fd(fd)
        except SysError as exc:
            if exc.errno == errno.EEXIST:  # verity was on already: the content is sealed
                return False
            raise _named(name, exc) from None
        finally:
            if granted:
                os.fchmod(fd, mode)
        return True
    finally:
        os.close(fd)


def measure_fd(fd: int) -> bytes:
    """The file's fs-verity digest (SHA-256 of its descriptor); SysError ENODATA without
    verity. Costs one ioctl: the kernel reads the stored descriptor, never the data."""
    _alg, digest = _libc.measure_verity(fd)
    return digest


def measure(path: StrPath) -> bytes:
    fd = os.open(path, _OPEN_RO)
    try:
        return measure_fd(fd)
    except SysError as exc:
        raise _named(path, exc) from None
    finally:
        os.close(fd)


def is_enabled_fd(fd: int) -> bool:
    """FS_VERITY_FL in the inode flags; False where the filesystem has no inode flags."""
    try:
        return bool(_libc.ioctl_getflags(fd) & FS_VERITY_FL)
    except SysError as exc:
        if exc.errno in (errno.ENOTTY, errno.EOPNOTSUPP, errno.EINVAL):
            return False
        raise


def is_enabled(path: StrPath) -> bool:
    fd = os.open(path, _OPEN_RO)
    try:
        return is_enabled_fd(fd)
    finally:
        os.close(fd)


def _why(exc: OSError) -> str:
    name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
    call = exc.syscall if isinstance(exc, SysError) else "os"
    if exc.errno in UNSUPPORTED:
        return (
            f"{call}: {name} (no fs-verity here: the kernel lacks CONFIG_FS_VERITY or the "
            "filesystem does not support it; ext4 needs the 'verity' feature: "
            "mkfs.ext4 -O verity, or tune2fs -O verity as root)"
        )
    return f"{call}: {name} ({exc.strerror})"


def usable_under(directory: StrPath) -> tuple[bool, str]:
    """Try fs-verity for real in `directory`: seal a scratch file (0444, like an object), then
    check that the flag is set and that an open for writing is refused. (ok, reason); the
    reason never names the scratch file (it is gone once this returns)."""
    d = os.fsdecode(directory)
    path = os.path.join(d, f".velo-verity-probe-{os.getpid()}-{os.urandom(4).hex()}")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444)
        try:
            os.write(fd, b"veloverlay fs-verity probe\n" * 200)
        finally:
            os.close(fd)
        seal(path)
        if not is_enabled(path):
            return False, "FS_IOC_ENABLE_VERITY succeeded but the file shows no FS_VERITY_FL"
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CLOEXEC))
        except PermissionError:
            pass
        else:  # an open for writing must fail for everyone, root included
            return False, "a file with fs-verity could still be opened for writing"
        return (
            True,
            f"FS_IOC_ENABLE_VERITY (sha256, {BLOCK_SIZE}-byte blocks) works, writes refused",
        )
    except OSError as exc:
        return False, _why(exc)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return ""


def cached_support(cache: StrPath, directory: StrPath, *, fresh: bool = False) -> tuple[bool, str]:
    """`usable_under(directory)`, remembered in the JSON file `cache` for this boot, kernel,
    filesystem (st_dev of `directory`) and euid. A cache that cannot be written is not an error:
    the next process probes again. `fresh`: probe whatever the cache says, and write it again
    (a seal refused as unsupported where the cache said it works)."""
    key = {
        "boot_id": _boot_id(),
        "kernel": os.uname().release,
        "dev": os.stat(directory).st_dev,
        "euid": os.geteuid(),
    }
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        if fresh:
            raise ValueError("probed again")
        # never blocking on a FIFO put in its place, nor following a link
        fd = os.open(cache, _OPEN_RO)
        with open(fd, encoding="utf-8") as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ValueError("not a regular file")
            data = json.load(f)
        if data["key"] == key:
            return bool(data["ok"]), str(data["reason"])
    ok, reason = usable_under(directory)
    with contextlib.suppress(OSError, VeloError):  # not following a link, leaving no temporary
        write_json_atomic(Path(os.fsdecode(cache)), {"key": key, "ok": ok, "reason": reason})
    return ok, reason
