"""Mounts: propagation, binds (read-only too), proc, tmpfs, and the overlay itself.

Owns every mount(2) / new-mount-API call in the package; reading where things are mounted is
`mountinfo.py`'s. Imports only the standard library, `veloverlay.errors`, `veloverlay._libc` and
`veloverlay.mountinfo`. Callers are expected to be in their own mount namespace
(see `ns.enter_userns`, run inside `ns.run_in_child`); nothing here unshares.

Overlay options are pinned (STYLE C4, mkosi#1841, Documentation/filesystems/overlayfs.rst):
`index=off` (no file handles on a user-namespace upper anyway; falls back to off with a warning,
measured), `metacopy=off` and `redirect_dir=nofollow`: the kernel neither writes metacopy/redirect
xattrs nor follows directory redirects from layers, so renaming a lower directory gives EXDEV
(tools copy + delete). Data-only lowers still work with exactly this set (measured below).
"""

from __future__ import annotations

import contextlib
import enum
import errno
import os
from collections.abc import Iterator, Mapping, Sequence

from veloverlay import _libc, mountinfo
from veloverlay.errors import Reason, SysError, VeloError

__all__ = [
    "MountApi",
    "OVL_MAX_STACK",
    "LEGACY_OPTIONS_MAX",
    "FSCONFIG_VALUE_MAX",
    "PINNED_OPTIONS",
    "NATIVE_OPTIONS",
    "make_rprivate",
    "bind",
    "umount",
    "mount_proc",
    "mount_tmpfs",
    "overlay",
    "escape_option_path",
    "legacy_options",
    "pin_dir",
    "umount_exact",
    "remount_super",
]

StrPath = str | os.PathLike[str]

# The kernel's OVL_MAX_STACK: lower layers (incl. data-only) per overlay; 501 gives EINVAL.
OVL_MAX_STACK = 500
# mount(2) copies one page of options and silently truncates the rest, so an over-long string
# fails later with a misleading ENOENT for a cut path (measured at 4721 bytes).
LEGACY_OPTIONS_MAX = 4095
# fsconfig string values are capped at 256 bytes including the NUL (measured: 256 -> EINVAL).
FSCONFIG_VALUE_MAX = 255

# Measured on 6.18, as uid 1500 in its own user namespace and as root in a user namespace mapped
# 0->0: this set with `userxattr` mounts, and a data-only lower (metadata file with
# user.overlay.metacopy="" and user.overlay.redirect="/ab/obj" over `datadir+`/`::`) reads the
# object's bytes and shows the metadata file's mode/mtime/size. Adding metacopy=on, or
# redirect_dir=on/follow, to `userxattr` is EINVAL ("conflicting options", at FSCONFIG_CMD_CREATE
# for the new API, reported only in dmesg); so is redirect_dir=off, which this kernel's
# CONFIG_OVERLAY_FS_REDIRECT_ALWAYS_FOLLOW=y turns into "follow". `nofollow` is the one value
# that goes with `userxattr`, and the redirect of a metacopy file into a data-only layer is
# followed anyway.
PINNED_OPTIONS: Mapping[str, str] = {
    "index": "off",
    "metacopy": "off",
    "redirect_dir": "nofollow",
}

# Root-native sessions (real root, initial user namespace, trusted.overlay.* xattrs) change one
# pinned value: `redirect_dir=on`, so rename(2) of a lower or merged directory works (the kernel
# writes trusted.overlay.redirect on the moved upper dir and a whiteout at its old name; the
# harvester reads both). metacopy stays off: a metacopy copy-up keeps its data in the lower, and
# the harvester reads upper files directly, so a chmod-then-rename would need the origin resolved
# (copy-ups stay whole files). index stays off: no file handles to keep valid across rebuilt
# layers, and an upper reused under another lower set is never mounted. Data-only lowers with
# trusted.overlay.metacopy/redirect are followed with exactly this set (measured on 6.18, in a
# private mount namespace as root, a lower directory renamed and its redirect written).
NATIVE_OPTIONS: Mapping[str, str] = {**PINNED_OPTIONS, "redirect_dir": "on"}

# A key no overlayfs knows: if fsconfig accepts it, the kernel does not validate parameters
# through the new API, so `lowerdir+` would be silently ignored too (composefs's check).
_BOGUS_KEY = "veloverlay-unsupported-key-xyz"


class MountApi(enum.Enum):
    """How an overlay was mounted."""

    NEW = "new"
    """fsopen/fsconfig/fsmount/move_mount; layers passed as O_PATH fds (`lowerdir+`)."""
    CLASSIC = "classic"
    """mount(2) with one escaped option string (< 4096 bytes)."""


class _UseClassic(Exception):
    """Internal: the new API is missing or does not validate; fall back to mount(2)."""


# --- simple mounts ----------------------------------------------------------------------------
def make_rprivate(path: StrPath = "/") -> None:
    """Stop mount events propagating between this namespace and its parent, recursively."""
    _libc.mount(None, path, None, _libc.MS_REC | _libc.MS_PRIVATE, None)


def umount(path: StrPath, *, detach: bool = True) -> None:
    _libc.umount2(path, _libc.MNT_DETACH if detach else 0)


# --- one mount, exactly -----------------------------------------------------------------------
def pin_dir(path: str) -> int:
    """An O_PATH fd on the directory `path` (absolute, symlinks resolved by the caller), refused
    when the kernel says the fd is somewhere else: a directory on the way was swapped for a
    symlink, or renamed, between the caller's resolution and this open. Root then acts on the
    fd, never on the path again (a path under another user's directory can change under it)."""
    try:
        fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise VeloError(
            f"cannot open {path}: {exc.strerror}",
            reason=Reason.NOT_FOUND if exc.errno == errno.ENOENT else Reason.TARGET_INVALID,
            path=path,
        ) from None
    try:
        where = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:  # no /proc (a chroot, a namespace without it): walked name by name instead
        where = path if _walked_to(path, os.fstat(fd)) else "another directory"
    if where != path:
        os.close(fd)
        raise VeloError(
            f"{path} changed while it was opened: it now leads to {where}",
            reason=Reason.TARGET_INVALID,
            path=path,
            hint="a directory on the way was replaced (by a symlink, or renamed); use a path "
            "that no other user can change",
        )
    return fd


def _walked_to(path: str, held: os.stat_result) -> bool:
    """Whether `path` (absolute, resolved), opened a name at a time from / without following a
    symbolic link at any step, leads to the directory `held`: `pin_dir`'s check where
    /proc/self/fd cannot be read. A directory on the way swapped for a symlink fails (ELOOP)."""
    fd = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for name in [n for n in path.split("/") if n]:
            flags = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
            try:
                nxt = os.open(name, flags, dir_fd=fd)
            except OSError:
                return False
            os.close(fd)
            fd = nxt
        st = os.fstat(fd)
        return (st.st_dev, st.st_ino) == (held.st_dev, held.st_ino)
    finally:
        os.close(fd)


def umount_exact(path: str, mnt_id: int, *, readonly_first: bool = False) -> None:
    """Unmount mount `mnt_id` from `path` (absolute, resolved), and nothing else: the parent is
    pinned (`pin_dir`), the mount now on the entry must be `mnt_id` (not one mounted over it,
    which umount2 would take instead), and umount2 goes through the pinned parent without
    following a symlink at the last step. EBUSY (in use) is the caller's to explain.
    `readonly_first`: `remount_super` before, undone if the unmount fails."""
    parent, name = os.path.split(path)
    if not name or name in (".", ".."):
        raise VeloError(f"cannot unmount '{path}'", reason=Reason.TARGET_INVALID, path=path)
    pfd = pin_dir(parent)
    try:
        try:
            fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd)
        except OSError as exc:
            raise VeloError(
                f"cannot open {path}: {exc.strerror}", reason=Reason.TARGET_INVALID, path=path
            ) from None
        try:
            top = mountinfo.mnt_id_of(fd)
        finally:
            os.close(fd)  # an fd on the mount would make it busy
        if top != mnt_id:
            raise VeloError(
                f"something else is mounted over {path} (mount {top}, above {mnt_id})",
                reason=Reason.TARGET_INVALID,
                path=path,
                hint=f"unmount it first (umount {path}), then run this again",
            )
        where = f"/proc/self/fd/{pfd}/{name}"
        if readonly_first:
            remount_super(where, readonly=True)
        try:
            _libc.umount2(where, _libc.UMOUNT_NOFOLLOW)
        except SysError:
            if readonly_first:
                with contextlib.suppress(OSError):
                    remount_super(where, readonly=False)
            raise
    finally:
        os.close(pfd)


def remount_super(path: StrPath, *, readonly: bool) -> None:
    """The filesystem mounted at `path` read-only (EBUSY while a file of it is open for writing,
    anywhere; then every write is EROFS) or writable again. The mount's flags are repeated."""
    flags = _libc.MS_REMOUNT | _locked_flags(path) | (_libc.MS_RDONLY if readonly else 0)
    _libc.mount(None, path, None, flags, None)


def mount_proc(path: StrPath) -> None:
    """A fresh procfs (for a new pid namespace); the caller must own that pid namespace."""
    flags = _libc.MS_NOSUID | _libc.MS_NODEV | _libc.MS_NOEXEC
    _libc.mount("proc", path, "proc", flags, None)


def mount_tmpfs(path: StrPath, opts: str | None = None) -> None:
    _libc.mount("tmpfs", path, "tmpfs", _libc.MS_NOSUID | _libc.MS_NODEV, opts)


# statvfs f_flag bits a user namespace may not clear on a mount it inherited (the kernel locks
# them; a remount that drops one is EPERM), with their MS_* flag: equal values except relatime
# (ST_RELATIME is 0x1000, which is MS_BIND: passing it through made a remount a bind remount).
_LOCKED_ST_FLAGS = (
    (os.ST_NOSUID, _libc.MS_NOSUID),
    (os.ST_NODEV, _libc.MS_NODEV),
    (os.ST_NOEXEC, _libc.MS_NOEXEC),
    (os.ST_NOATIME, _libc.MS_NOATIME),
    (os.ST_NODIRATIME, _libc.MS_NODIRATIME),
    (os.ST_RELATIME, _libc.MS_RELATIME),
)


def _locked_flags(path: StrPath) -> int:
    """The MS_* flags to repeat when remounting the mount at `path`."""
    f_flag = os.statvfs(path).f_flag
    return sum(ms for st, ms in _LOCKED_ST_FLAGS if f_flag & st)


def bind(
    src: StrPath,
    dst: StrPath,
    *,
    readonly: bool = False,
    recursive: bool = True,
    api: MountApi | None = None,
) -> MountApi:
    """Bind `src` onto `dst`; with `readonly` the copy is read-only. Returns the API used.

    With the new API (default, `open_tree` + `mount_setattr` + `move_mount`) every mount of a
    recursive read-only copy is read-only; the classic fallback (bind + remount, forced with
    `api=CLASSIC`, used on ENOSYS) only makes the top mount read-only. Bind the store read-only
    only after the overlay is mounted: a read-only mount under the upper dir makes the overlay
    read-only (measured, DESIGN.md "Sessions").
    """
    if not readonly:
        flags = _libc.MS_BIND | (_libc.MS_REC if recursive else 0)
        _libc.mount(src, dst, None, flags, None)
        return MountApi.CLASSIC
    if api is not MountApi.CLASSIC:
        try:
            _bind_readonly_new(src, dst, recursive=recursive)
            return MountApi.NEW
        except SysError as exc:
            if exc.errno != errno.ENOSYS or api is MountApi.NEW:
                raise
    _bind_readonly_classic(src, dst, recursive=recursive)
    return MountApi.CLASSIC


def _bind_readonly_new(src: StrPath, dst: StrPath, *, recursive: bool) -> None:
    # open_tree(CLONE) makes a detached copy; mount_setattr applies RDONLY to every mount in it
    # at once (the classic remount only changes the top one) before it becomes visible.
    rec = _libc.AT_RECURSIVE if recursive else 0
    flags = _libc.OPEN_TREE_CLONE | _libc.OPEN_TREE_CLOEXEC | rec
    fd = _libc.open_tree(_libc.AT_FDCWD, src, flags)
    try:
        _libc.mount_setattr(fd, "", _libc.AT_EMPTY_PATH | rec, attr_set=_libc.MOUNT_ATTR_RDONLY)
        _libc.move_mount(fd, "", _libc.AT_FDCWD, dst, _libc.MOVE_MOUNT_F_EMPTY_PATH)
    finally:
        os.close(fd)


def _bind_readonly_classic(src: StrPath, dst: StrPath, *, recursive: bool) -> None:
    _libc.mount(src, dst, None, _libc.MS_BIND | (_libc.MS_REC if recursive else 0), None)
    # The remount must repeat the flags the kernel locked on the source mount, or it is EPERM in
    # a user namespace. It affects the top mount only; submounts stay writable on this path.
    flags = _libc.MS_BIND | _libc.MS_REMOUNT | _libc.MS_RDONLY | _locked_flags(dst)
    _libc.mount(None, dst, None, flags, None)


# --- overlay ----------------------------------------------------------------------------------
def escape_option_path(path: StrPath) -> str:
    r"""Escape `\`, `,` and `:` so overlay's legacy option parser keeps the path whole."""
    out = os.fspath(path)
    for ch in ("\\", ",", ":"):
        out = out.replace(ch, "\\" + ch)
    return out


def _options(userxattr: bool, extra: Mapping[str, str] | None) -> dict[str, str | None]:
    """Option name -> value (None for a flag), pinned values first, `extra` overriding them."""
    opts: dict[str, str | None] = dict(PINNED_OPTIONS if userxattr else NATIVE_OPTIONS)
    if userxattr:
        opts["userxattr"] = None
    for key, value in (extra or {}).items():
        opts[key] = value if value != "" else None
    return opts


def legacy_options(
    *,
    lowers: Sequence[StrPath],
    data_lowers: Sequence[StrPath] = (),
    upper: StrPath | None,
    work: StrPath | None,
    userxattr: bool,
    extra: Mapping[str, str] | None = None,
) -> str:
    """The mount(2) option string: `lowerdir=l1:l2::d1::d2,upperdir=..,workdir=..,<options>`."""
    lowerdir = ":".join(escape_option_path(p) for p in lowers)
    lowerdir += "".join("::" + escape_option_path(p) for p in data_lowers)
    parts = [f"lowerdir={lowerdir}"]
    if upper is not None and work is not None:
        parts += [f"upperdir={escape_option_path(upper)}", f"workdir={escape_option_path(work)}"]
    for key, value in _options(userxattr, extra).items():
        parts.append(key if value is None else f"{key}={value}")
    return ",".join(parts)


def _precheck(
    lowers: Sequence[StrPath],
    data_lowers: Sequence[StrPath],
    upper: StrPath | None,
    work: StrPath | None,
    target: StrPath,
) -> None:
    if not lowers:
        raise VeloError("an overlay needs at least one lower directory", reason=Reason.USAGE)
    if (upper is None) != (work is None):
        raise VeloError("upperdir and workdir go together", reason=Reason.USAGE)
    count = len(lowers) + len(data_lowers)
    if count > OVL_MAX_STACK:
        raise VeloError(
            f"{count} lower layers exceed the kernel's limit of {OVL_MAX_STACK}",
            reason=Reason.TOO_MANY_LAYERS,
            hint="flatten the stacked layers into one",
        )
    # mount(2) and fsconfig would not say which directory is missing; we do (mkosi).
    named: list[tuple[str, StrPath]] = [("lowerdir", p) for p in lowers]
    named += [("data-only lowerdir", p) for p in data_lowers]
    if upper is not None and work is not None:
        named += [("upperdir", upper), ("workdir", work)]
    named.append(("mount point", target))
    for what, path in named:
        if not os.path.isdir(path):
            raise VeloError(
                f"overlay {what} is not a directory: {os.fspath(path)}",
                reason=Reason.NOT_FOUND if not os.path.lexists(path) else Reason.NOT_A_DIRECTORY,
                path=os.fspath(path),
            )


def overlay(
    *,
    lowers: Sequence[StrPath],
    data_lowers: Sequence[StrPath] = (),
    upper: StrPath | None,
    work: StrPath | None,
    target: StrPath,
    userxattr: bool,
    extra: Mapping[str, str] | None = None,
    api: MountApi | None = None,
    target_fd: int | None = None,
) -> MountApi:
    """Mount an overlay on `target` and return the API that did it.

    `lowers` are topmost first; `data_lowers` are data-only layers (reachable only through a
    metacopy file's redirect). `upper`/`work` both None gives a read-only overlay. `extra` adds or
    overrides options (value "" = a flag). `api` forces one path (tests); by default the new API
    is tried and mount(2) is the fallback. `target_fd` (an O_PATH fd on `target`, `pin_dir`): mount
    on that directory whatever its path leads to by then.
    """
    _precheck(lowers, data_lowers, upper, work, target)
    if api is not MountApi.CLASSIC:
        try:
            options = _options(userxattr, extra)
            _overlay_new(lowers, data_lowers, upper, work, target, options, target_fd)
            return MountApi.NEW
        except _UseClassic as why:
            if api is MountApi.NEW:
                raise VeloError(
                    f"the new mount API cannot mount this overlay: {why}",
                    reason=Reason.OVERLAY_UNSUPPORTED,
                ) from None
    opts = legacy_options(
        lowers=lowers,
        data_lowers=data_lowers,
        upper=upper,
        work=work,
        userxattr=userxattr,
        extra=extra,
    )
    size = len(os.fsencode(opts))
    if size > LEGACY_OPTIONS_MAX:
        raise VeloError(
            f"overlay options are {size} bytes; mount(2) takes at most {LEGACY_OPTIONS_MAX}",
            reason=Reason.TOO_MANY_LAYERS,
            hint="this kernel lacks lowerdir+ (new mount API); use fewer or shorter layer paths",
        )
    where = target if target_fd is None else f"/proc/self/fd/{target_fd}"
    try:
        _libc.mount("overlay", where, "overlay", 0, opts)
    except SysError as exc:
        raise _explain(exc, opts, "") from None
    return MountApi.CLASSIC


def _kernel_log(fd: int) -> str:
    """Drain the fs context's message log ("e overlay: ..." lines); empty if none."""
    lines: list[str] = []
    with contextlib.suppress(OSError):  # ENODATA once drained
        while msg := os.read(fd, 4096):
            lines.append(msg.decode(errors="replace").strip())
    return "; ".join(lines)


def _explain(exc: SysError, opts: str, log: str) -> SysError:
    """Re-raise a failed overlay step with the kernel's words and the options it was given."""
    parts = [p for p in (exc.hint, log and f"kernel: {log}") if p]
    if exc.errno == errno.EINVAL:
        if not log:
            parts.append("the kernel log (dmesg) names the rejected option")
        parts.append(f"options ({len(os.fsencode(opts))} bytes): {opts}")
    return SysError(
        exc.errno or errno.EIO,
        exc.syscall,
        exc.filename,
        exc.filename2,
        hint="; ".join(parts) or None,
    )


@contextlib.contextmanager
def _dirfd(path: StrPath) -> Iterator[int]:
    fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield fd
    finally:
        os.close(fd)


class _NewApiContext:
    """One fsopen("overlay") context and the way it takes directories (fd, else string)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.use_fd = True
        self.rendered: list[str] = []

    def _set_dir_string(self, key: str, path: StrPath) -> None:
        value = os.fspath(path)
        if len(os.fsencode(value)) > FSCONFIG_VALUE_MAX:
            raise _UseClassic(f"{key} path longer than {FSCONFIG_VALUE_MAX} bytes and no SET_FD")
        _libc.fsconfig(self.fd, _libc.FSCONFIG_SET_STRING, key, value)

    def set_dir(self, key: str, path: StrPath, *, first: bool = False) -> None:
        """Pass a directory. The first call finds out what the kernel supports: SET_FD refused
        (EINVAL; EBADF on 6.12, which has `lowerdir+` but takes no fds for it — found by the VM
        matrix) falls back to SET_STRING, and an EINVAL for that means no `lowerdir+`."""
        self.rendered.append(f"{key}={os.fspath(path)}")
        if self.use_fd:
            try:
                with _dirfd(path) as dfd:
                    _libc.fsconfig(self.fd, _libc.FSCONFIG_SET_FD, key, None, dfd)
                return
            except SysError as exc:
                if not (first and exc.errno in (errno.EINVAL, errno.EBADF, errno.EOPNOTSUPP)):
                    raise
                _kernel_log(self.fd)  # discard the rejection message
                self.use_fd = False
        try:
            self._set_dir_string(key, path)
        except SysError as exc:
            if first and exc.errno == errno.EINVAL:
                raise _UseClassic(f"{key} rejected: {_kernel_log(self.fd)}") from None
            raise

    def set_option(self, key: str, value: str | None) -> None:
        self.rendered.append(key if value is None else f"{key}={value}")
        if value is None:
            _libc.fsconfig(self.fd, _libc.FSCONFIG_SET_FLAG, key)
        else:
            _libc.fsconfig(self.fd, _libc.FSCONFIG_SET_STRING, key, value)


def _overlay_new(
    lowers: Sequence[StrPath],
    data_lowers: Sequence[StrPath],
    upper: StrPath | None,
    work: StrPath | None,
    target: StrPath,
    opts: Mapping[str, str | None],
    target_fd: int | None,
) -> None:
    try:
        fd = _libc.fsopen("overlay", _libc.FSOPEN_CLOEXEC)
    except SysError as exc:
        if exc.errno == errno.ENOSYS:
            raise _UseClassic("no fsopen") from None
        raise
    ctx = _NewApiContext(fd)
    try:
        try:
            _libc.fsconfig(fd, _libc.FSCONFIG_SET_STRING, _BOGUS_KEY, "1")
        except SysError:
            _kernel_log(fd)  # "e overlay: Unknown parameter ..." is the answer we want
        else:
            raise _UseClassic("fsconfig accepts unknown keys (no parameter validation)")
        try:
            # Options, then layers: the order mount(2)'s string gives them to the kernel.
            for key, value in opts.items():
                ctx.set_option(key, value)
            for i, path in enumerate(lowers):
                ctx.set_dir("lowerdir+", path, first=i == 0)
            for path in data_lowers:
                ctx.set_dir("datadir+", path)
            if upper is not None and work is not None:
                ctx.set_dir("upperdir", upper)
                ctx.set_dir("workdir", work)
            _libc.fsconfig(fd, _libc.FSCONFIG_CMD_CREATE)
            mfd = _libc.fsmount(fd, _libc.FSMOUNT_CLOEXEC, 0)
        except SysError as exc:
            raise _explain(exc, ",".join(ctx.rendered), _kernel_log(fd)) from None
        try:
            if target_fd is None:
                _libc.move_mount(mfd, "", _libc.AT_FDCWD, target, _libc.MOVE_MOUNT_F_EMPTY_PATH)
            else:
                flags = _libc.MOVE_MOUNT_F_EMPTY_PATH | _libc.MOVE_MOUNT_T_EMPTY_PATH
                _libc.move_mount(mfd, "", target_fd, "", flags)
        finally:
            os.close(mfd)
    finally:
        os.close(fd)
