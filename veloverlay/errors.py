"""Errors with a machine-readable reason.

Every failure the user can meet is a `VeloError` carrying a `Reason` (a stable slug that scripts
and tests match on, never the wording), an optional `hint`, and an optional `detail`. Failed
syscalls raise `SysError`, an `OSError` that also names the call and the path(s), so library users
can keep catching `OSError`. This module imports nothing from the package.
"""

from __future__ import annotations

import enum
import errno as _errno
import os

__all__ = ["Reason", "VeloError", "SysError", "errno_hint", "syscall_hint"]


class Reason(enum.Enum):
    """Why an operation failed. The value is the slug printed as `reason: <slug>`. Each one is
    raised somewhere and listed in docs/errors.md (tests/e2e/test_docs.py checks both); a
    command that is not found is `run`'s exit status 127, not a reason."""

    # input and names
    BAD_NAME = "bad-name"
    BAD_PATH = "bad-path"
    BAD_REF = "bad-ref"
    NOT_FOUND = "not-found"
    EXISTS = "exists"
    SPECIAL_FILE = "special-file"
    TOO_DEEP = "too-deep"
    NOT_A_DIRECTORY = "not-a-directory"
    # store and manifests
    STORE_MISSING = "store-missing"
    STORE_PERMISSION = "store-permission"
    STORE_READ_ONLY = "store-read-only"
    STORE_UNSAFE = "store-unsafe"
    STORE_ON_NFS = "store-on-nfs"
    STORE_FULL = "store-full"
    MAP_FULL = "map-full"
    OBJECT_MISSING = "object-missing"
    OBJECT_CORRUPT = "object-corrupt"
    MANIFEST_CORRUPT = "manifest-corrupt"
    MANIFEST_SCHEMA = "manifest-schema"
    BUNDLE_INVALID = "bundle-invalid"
    REF_MOVED = "ref-moved"
    CONFLICT = "conflict"
    SOURCE_UNSTABLE = "source-unstable"
    SOURCE_UNREADABLE = "source-unreadable"
    OTHER_SOURCE = "other-source"  # a ref ingested from another directory than this one
    LOCKED = "locked"
    # kernel facilities
    SYSCALL = "syscall"
    OVERLAY_UNSUPPORTED = "overlay-unsupported"
    IMMUTABLE_DENIED = "immutable-denied"
    FALLBACK_FORBIDDEN = "fallback-forbidden"
    TOO_MANY_LAYERS = "too-many-layers"
    # sessions
    TARGET_INVALID = "target-invalid"
    BAKED_PATHS = "baked-paths"  # the tree names its source's path, which the shim cannot hide
    SESSION_NOT_FOUND = "session-not-found"
    SESSION_ACTIVE = "session-active"
    BACKEND_UNAVAILABLE = "backend-unavailable"
    # remotes (OCI registries)
    REMOTE_UNREACHABLE = "remote-unreachable"
    REMOTE_TLS = "remote-tls"
    REMOTE_AUTH = "remote-auth"
    REMOTE_DENIED = "remote-denied"
    REMOTE_ERROR = "remote-error"
    REMOTE_INVALID = "remote-invalid"
    REMOTE_REDIRECT = "remote-redirect"
    USAGE = "usage"


class VeloError(Exception):
    """A failure with a stable `reason`, a one-line message and an optional hint."""

    def __init__(
        self,
        message: str,
        *,
        reason: Reason,
        hint: str | None = None,
        detail: str | None = None,
        path: str | bytes | os.PathLike[str] | os.PathLike[bytes] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason
        self.hint = hint
        self.detail = detail
        self.path = os.fsdecode(path) if path is not None else None

    def __reduce__(self) -> tuple[object, ...]:
        # Errors cross process boundaries (forked namespace children, worker pools).
        return (_rebuild_velo, (self.message, self.reason, self.hint, self.detail, self.path))

    def as_dict(self) -> dict[str, str | None]:
        return {
            "error": self.message,
            "reason": self.reason.value,
            "hint": self.hint,
            "detail": self.detail,
            "path": self.path,
        }


def _rebuild_velo(
    message: str, reason: Reason, hint: str | None, detail: str | None, path: str | None
) -> VeloError:
    return VeloError(message, reason=reason, hint=hint, detail=detail, path=path)


# Canned advice for the traps we know, keyed by (syscall, errno).
_HINTS: dict[tuple[str, int], str] = {
    ("unshare", _errno.EPERM): (
        "unprivileged user namespaces are restricted on this host (e.g. AppArmor's "
        "kernel.apparmor_restrict_unprivileged_userns=1); use --backend shim or run as root"
    ),
    ("unshare", _errno.EINVAL): (
        "a multi-threaded process cannot create a user namespace; this is a veloverlay bug"
    ),
    ("unshare", _errno.ENOSPC): "user.max_user_namespaces is exhausted or 0 on this host",
    ("ioctl(FS_IOC_SETFLAGS)", _errno.EPERM): (
        "chattr +i needs CAP_LINUX_IMMUTABLE in the initial user namespace (real root)"
    ),
    ("rename", _errno.EXDEV): (
        "overlay cannot rename a directory that comes from a lower layer without redirect_dir; "
        "tools such as mv fall back to copy + delete"
    ),
    ("mount", _errno.ELOOP): "overlay directories may not overlap",
    ("fsconfig", _errno.ELOOP): "overlay directories may not overlap",
    ("mount", _errno.ENOSPC): "mount limit reached: check /proc/sys/fs/mount-max",
    ("fsopen", _errno.ENODEV): "this kernel has no overlayfs",
    ("mount", _errno.ENODEV): "this kernel has no overlayfs",
}


def errno_hint(err: int | None) -> str | None:
    """Advice that holds for `err` whichever call failed: a limit of this process or of the
    system, which retrying alone does not lift (also for an OSError that is no SysError)."""
    if err == _errno.EFBIG:
        return "a file size limit (ulimit -f) or the filesystem's largest file size was reached"
    if err == _errno.EMFILE:
        return "this process may open no more files: raise its limit (ulimit -n) and retry"
    if err == _errno.ENFILE:
        return "the system may open no more files (fs.file-max): retry when fewer are open"
    return None


def syscall_hint(syscall: str, err: int) -> str | None:
    if err == _errno.ENOSYS:
        return f"the kernel ({os.uname().release}) or a seccomp filter does not provide {syscall}"
    if errno_hint(err) is not None:
        return errno_hint(err)
    if syscall in ("fork", "posix_spawn") and err == _errno.EAGAIN:
        return (
            "no more processes may be started: this user's limit (ulimit -u) or the system's "
            "is reached; retry when fewer run, or raise the limit"
        )
    return _HINTS.get((syscall, err))


def _shown(name: object) -> str:
    """A file name in a message: as it is (a bytes one decoded as os.fsdecode does), in quotes
    the message adds; the renderer escapes it once (repr() escaped it, and it was again)."""
    return os.fsdecode(name) if isinstance(name, (str, bytes, os.PathLike)) else str(name)


class SysError(OSError):
    """A failed system call: carries errno, the call's name and the path(s) it acted on."""

    def __init__(
        self,
        err: int,
        syscall: str,
        path: str | bytes | os.PathLike[str] | os.PathLike[bytes] | None = None,
        path2: str | bytes | os.PathLike[str] | os.PathLike[bytes] | None = None,
        *,
        hint: str | None = None,
    ) -> None:
        p1 = os.fsdecode(path) if path is not None else None
        p2 = os.fsdecode(path2) if path2 is not None else None
        super().__init__(err, os.strerror(err), p1, None, p2)
        self.syscall = syscall
        self.hint = hint if hint is not None else syscall_hint(syscall, err)

    def __str__(self) -> str:
        where = ""
        if self.filename is not None:
            where = f" '{_shown(self.filename)}'"
            if self.filename2 is not None:
                where += f" -> '{_shown(self.filename2)}'"
        code = _errno.errorcode.get(self.errno, str(self.errno)) if self.errno else "?"
        return f"{self.syscall}{where}: {self.strerror} ({code})"

    def __reduce__(self) -> tuple[object, ...]:
        return (
            _rebuild_sys,
            (self.errno, self.syscall, self.filename, self.filename2, self.hint),
        )


def _rebuild_sys(
    err: int, syscall: str, path: str | None, path2: str | None, hint: str | None
) -> SysError:
    return SysError(err, syscall, path, path2, hint=hint)
