"""Capability detection by trying, in throw-away forked children and temp dirs.

Owns the answer to "what can this host do": `detect()` returns a frozen `Capabilities` whose
feature names are a stable API (tests, CI's VELO_TEST_MUST_WORK and `doctor --json` use them).
Nothing is inferred from the kernel version; it is only logged. Every probe runs the real
operation — unshare, mount an overlay, mknod a whiteout, FS_IOC_SETFLAGS, FS_IOC_ENABLE_VERITY,
FICLONE — and a failing feature's reason names the call and errno. Namespace probes run in forked
children (the calling process never unshares); temp dirs live under /dev/shm (or the temp dir) and
are removed.

Checks of one given path (may a store live there, does it hold xattrs) are `storefs.py`'s.

Imports the standard library and the kernel modules (`ns`, `mount`, `mountinfo`, `fsflags`,
`verity`, `_libc`, errors).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import stat
import tempfile
from collections.abc import Callable, Iterator

from veloverlay import _libc, files, fsflags, mount, mountinfo, ns, verity
from veloverlay.errors import Reason, SysError, VeloError
from veloverlay.records import Record

__all__ = [
    "FEATURES",
    "Feature",
    "Capabilities",
    "detect",
]

log = logging.getLogger(__name__)

FEATURES = (
    "root",
    "userns",
    "overlay_root",
    "overlay_userns",
    "overlay_native",
    "data_only_root",
    "data_only_userns",
    "data_only_native",
    "userns_root",
    "lowerdir_append",
    "fsconfig_fd",
    "whiteout_mknod",
    "chattr",
    "fsverity",
    "reflink",
    "userns_unrestricted",
    "fuse",
)

# The uid/gid a root caller drops to for the unprivileged probes.
_NOBODY = 65534
_CAP_SYS_ADMIN = 21
_OBJECT_BYTES = b"veloverlay data-only probe\n"


class Feature(Record, frozen=True):
    ok: bool
    reason: str


class Capabilities(Record, frozen=True):
    kernel: str
    features: dict[str, Feature]

    def feature(self, name: str) -> Feature:
        found = self.features.get(name)
        if found is None:
            known = ", ".join(sorted(self.features))
            return Feature(False, f"unknown feature '{name}' (known: {known})")
        return found

    def to_dict(self) -> dict[str, object]:
        return {
            "kernel": self.kernel,
            "features": {
                name: {"ok": f.ok, "reason": f.reason} for name, f in self.features.items()
            },
        }


# --- helpers ----------------------------------------------------------------------------------
def _why(exc: BaseException) -> str:
    """'call path: ERRNO (hint)' for syscall failures, the message otherwise. Paths inside a
    probe's scratch dir are left out: they are random and gone once the probe ends."""
    if isinstance(exc, OSError) and exc.errno is not None:
        name = errno.errorcode.get(exc.errno, str(exc.errno))
        call = exc.syscall if isinstance(exc, SysError) else "os"
        shown = exc.filename and _SCRATCH_PREFIX not in os.fsdecode(exc.filename)
        where = f" {exc.filename}" if shown else ""
        hint = exc.hint if isinstance(exc, SysError) else None
        return f"{call}{where}: {name} ({hint or exc.strerror})"
    if isinstance(exc, VeloError):
        return f"{exc.message} [{exc.reason.value}]"
    return f"{type(exc).__name__}: {exc}"


def _attempt(fn: Callable[[], str]) -> tuple[bool, str]:
    try:
        return True, fn()
    except Exception as exc:  # noqa: BLE001 - a probe turns every failure into a reason
        # A hint may quote paths of the scratch dir too (an overlay's options): the same
        # failure must read the same in every probe run.
        return False, _SCRATCH_PATH.sub("<scratch>", _why(exc))


_SCRATCH_PREFIX = "velo-probe-"
_SCRATCH_PATH = re.compile(r"[^\s,=:]*/" + _SCRATCH_PREFIX + r"[^/\s,:]*")


def _scratch_base() -> str:
    """/dev/shm, unless it is not writable or has under 1 MiB free (any user can fill it)."""
    with contextlib.suppress(OSError):
        sv = os.statvfs("/dev/shm")
        if os.access("/dev/shm", os.W_OK | os.X_OK) and sv.f_bavail * sv.f_frsize >= 1 << 20:
            return "/dev/shm"
    return tempfile.gettempdir()


def _force_rmtree(path: str, ident: tuple[int, int]) -> None:
    """Remove a probe dir — the directory `ident` (dev, ino) made at `path`, nothing else —
    clearing +i where set and opening up mode-000 dirs (overlay's work/work) by descriptor: a
    subdirectory of it is another user's (nobody's) while the probes run, and that user could
    swap anything in it for a link (files.force_rmtree never follows one). What cannot go stays,
    logged."""
    try:
        files.force_rmtree(path, expect=ident, unflag=fsflags.make_mutable)
    except OSError as exc:
        log.warning("probe scratch %s not removed: %s", path, _why(exc))


@contextlib.contextmanager
def _scratch(*, mode: int = 0o700, under: str | None = None) -> Iterator[str]:
    """A fresh directory of the caller's with `mode` (0711: another uid may pass through it to
    a subdirectory handed to it, `_subdir`, and can neither list, rename nor replace anything
    in it), removed afterwards."""
    # The pid in the name: whose scratch it is (a test checks that its own leave nothing).
    prefix = f"{_SCRATCH_PREFIX}{os.getpid()}-"
    path = tempfile.mkdtemp(prefix=prefix, dir=under or _scratch_base())
    st = os.lstat(path)
    try:
        os.chmod(path, mode)  # (mkdtemp made it the caller's a moment ago)
        yield path
    finally:
        _force_rmtree(path, (st.st_dev, st.st_ino))


def _subdir(base: str, name: str, *, owner: int | None = None) -> str:
    """base/name, made 0700 and, with `owner`, handed to that uid — through descriptors (the
    new directory opened without following a link, then fchown): the caller keeps `base`, and
    nothing of root's is ever reached by a path through a directory the other uid owns."""
    bfd = os.open(base, files.DIRFLAGS)
    try:
        os.mkdir(name, 0o700, dir_fd=bfd)
        fd = os.open(name, files.DIRFLAGS, dir_fd=bfd)
        try:
            os.fchmod(fd, 0o700)  # whatever the umask
            if owner is not None:
                os.fchown(fd, owner, owner)
        finally:
            os.close(fd)
    finally:
        os.close(bfd)
    return os.path.join(base, name)


# --- probes run inside a namespace child ------------------------------------------------------
def _overlay_whiteout(base: str) -> str:
    """Mount lower+upper, delete a lower file through it, expect a 0/0 char device in upper."""
    lower, upper, work, merged = (os.path.join(base, d) for d in ("l", "u", "w", "m"))
    for d in (lower, upper, work, merged):
        os.mkdir(d)
    with open(os.path.join(lower, "gone"), "wb") as f:
        f.write(b"x")
    used = mount.overlay(lowers=[lower], upper=upper, work=work, target=merged, userxattr=True)
    try:
        os.unlink(os.path.join(merged, "gone"))
        st = os.lstat(os.path.join(upper, "gone"))
        if not (stat.S_ISCHR(st.st_mode) and st.st_rdev == 0):
            raise VeloError("deleting a lower file left no whiteout", reason=Reason.SYSCALL)
    finally:
        mount.umount(merged)
    return f"overlay with userxattr mounted ({used.value} mount API), whiteout written"


def _data_only(base: str, *, prefix: str = "user") -> str:
    """A sparse metadata file with <prefix>.overlay.metacopy/redirect over a data-only lower
    (`user` with userxattr; `trusted` root-native, with its options)."""
    meta, objs, upper, work, merged = (
        os.path.join(base, d) for d in ("meta", "objs", "du", "dw", "dm")
    )
    for d in (meta, objs, os.path.join(objs, "ab"), upper, work, merged):
        os.mkdir(d)
    with open(os.path.join(objs, "ab", "cd"), "wb") as f:
        f.write(_OBJECT_BYTES)
    mfile = os.path.join(meta, "file")
    with open(mfile, "wb") as f:
        f.truncate(len(_OBJECT_BYTES))  # sparse of the real size, so stat shows it
    os.chmod(mfile, 0o640)
    os.setxattr(mfile, f"{prefix}.overlay.metacopy", b"")
    os.setxattr(mfile, f"{prefix}.overlay.redirect", b"/ab/cd")
    used = mount.overlay(
        lowers=[meta],
        data_lowers=[objs],
        upper=upper,
        work=work,
        target=merged,
        userxattr=prefix == "user",
    )
    try:
        merged_file = os.path.join(merged, "file")
        with open(merged_file, "rb") as f:
            data = f.read()
        st = os.stat(merged_file)
    finally:
        mount.umount(merged)
    if data != _OBJECT_BYTES:
        raise VeloError(
            f"read through the metadata file returned {data[:32]!r}, not the object",
            reason=Reason.OVERLAY_UNSUPPORTED,
        )
    if stat.S_IMODE(st.st_mode) != 0o640 or st.st_size != len(_OBJECT_BYTES):
        raise VeloError(
            f"merged file shows mode {oct(st.st_mode)} size {st.st_size}, not the metadata file's",
            reason=Reason.OVERLAY_UNSUPPORTED,
        )
    how = "userxattr" if prefix == "user" else "trusted.overlay.* (root-native)"
    return f"metacopy+redirect into a data-only lower with {how} ({used.value} mount API)"


def _native_rename(base: str) -> str:
    """Root-native: trusted.overlay.* xattrs and redirect_dir=on; rename(2) a lower directory
    and expect its redirect xattr on the moved upper dir and a whiteout at the old name."""
    lower, upper, work, merged = (os.path.join(base, d) for d in ("nl", "nu", "nw", "nm"))
    for d in (lower, os.path.join(lower, "d"), upper, work, merged):
        os.mkdir(d)
    with open(os.path.join(lower, "d", "f"), "wb") as f:
        f.write(b"x")
    used = mount.overlay(lowers=[lower], upper=upper, work=work, target=merged, userxattr=False)
    try:
        os.rename(os.path.join(merged, "d"), os.path.join(merged, "e"))
        with open(os.path.join(merged, "e", "f"), "rb") as f:
            seen = f.read()
    finally:
        mount.umount(merged)
    redirect = os.getxattr(os.path.join(upper, "e"), "trusted.overlay.redirect")
    st = os.lstat(os.path.join(upper, "d"))
    if seen != b"x" or redirect != b"d" or not stat.S_ISCHR(st.st_mode):
        raise VeloError(
            f"renamed lower directory: read {seen!r}, redirect {redirect!r}",
            reason=Reason.OVERLAY_UNSUPPORTED,
        )
    return (
        "overlay with trusted.overlay.* and redirect_dir=on, lower directory renamed "
        f"({used.value} mount API)"
    )


def _native_probes(base: str) -> dict[str, tuple[bool, str]]:
    """In a forked child of real root: a private mount namespace of the initial user namespace."""
    try:
        ns.enter_mountns()
        mount.make_rprivate("/")
    except Exception as exc:  # noqa: BLE001
        reason = f"no mount namespace: {_why(exc)}"
        return {"overlay_native": (False, reason), "data_only_native": (False, reason)}
    return {
        "overlay_native": _attempt(lambda: _native_rename(base)),
        "data_only_native": _attempt(lambda: _data_only(base, prefix="trusted")),
    }


def _lowerdir_append(base: str) -> tuple[tuple[bool, str], tuple[bool, str]]:
    """(`lowerdir+` validated, `FSCONFIG_SET_FD` for `lowerdir+`) in the current userns."""
    a, b = os.path.join(base, "a"), os.path.join(base, "b")
    os.mkdir(a)
    os.mkdir(b)
    fd = _libc.fsopen("overlay", _libc.FSOPEN_CLOEXEC)
    try:

        def append() -> str:
            try:
                _libc.fsconfig(fd, _libc.FSCONFIG_SET_STRING, "veloverlay-bogus-key", "1")
            except SysError:
                pass
            else:
                raise VeloError("fsconfig accepts unknown keys", reason=Reason.SYSCALL)
            _libc.fsconfig(fd, _libc.FSCONFIG_SET_STRING, "lowerdir+", a)
            try:
                _libc.fsconfig(fd, _libc.FSCONFIG_SET_STRING, "lowerdir+", base + "/missing")
            except SysError as exc:
                if exc.errno != errno.ENOENT:
                    raise
            else:
                raise VeloError("lowerdir+ accepted a missing path", reason=Reason.SYSCALL)
            return "fsconfig lowerdir+ accepted, and a missing path refused"

        def set_fd() -> str:
            dfd = os.open(b, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                _libc.fsconfig(fd, _libc.FSCONFIG_SET_FD, "lowerdir+", None, dfd)
            finally:
                os.close(dfd)
            _libc.fsconfig(fd, _libc.FSCONFIG_CMD_CREATE)
            os.close(_libc.fsmount(fd, _libc.FSMOUNT_CLOEXEC, 0))
            return "fsconfig FSCONFIG_SET_FD lowerdir+ accepted; read-only overlay created"

        appended = _attempt(append)
        if not appended[0]:
            return appended, (False, f"needs lowerdir+: {appended[1]}")
        return appended, _attempt(set_fd)
    finally:
        os.close(fd)


def _whiteout_mknod(base: str) -> str:
    path = os.path.join(base, "wh")
    os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(0, 0))
    os.unlink(path)
    return "mknod c 0 0 allowed in a user namespace"


def _namespace_probes(base: str, *, drop: bool, extras: bool) -> dict[str, tuple[bool, str]]:
    """Runs in a forked child: optionally become nobody, enter a userns, try each facility."""
    who = "unprivileged" if drop or os.getuid() != 0 else "root"
    if drop:
        ns.drop_to_user(_NOBODY, _NOBODY)
    outside_uid = os.getuid()
    suffix = "userns" if who == "unprivileged" else "root"
    names = ["overlay_" + suffix, "data_only_" + suffix]
    if extras:
        names += ["lowerdir_append", "fsconfig_fd", "whiteout_mknod"]
    try:
        ns.enter_userns(map_root=True)
        mount.make_rprivate("/")
    except Exception as exc:  # noqa: BLE001
        reason = f"no user namespace: {_why(exc)}"
        return {"userns": (False, reason), **{n: (False, reason) for n in names}}
    out: dict[str, tuple[bool, str]] = {
        "userns": (True, f"user+mount namespace created as {who} uid {outside_uid}"),
        "overlay_" + suffix: _attempt(lambda: _overlay_whiteout(base)),
        "data_only_" + suffix: _attempt(lambda: _data_only(base)),
    }
    if extras:
        try:
            out["lowerdir_append"], out["fsconfig_fd"] = _lowerdir_append(base)
        except Exception as exc:  # noqa: BLE001 - e.g. fsopen("overlay"): ENODEV, no module
            out["lowerdir_append"] = out["fsconfig_fd"] = (False, _why(exc))
        out["whiteout_mknod"] = _attempt(lambda: _whiteout_mknod(base))
    return out


def _in_child(base: str, *, drop: bool, extras: bool) -> dict[str, tuple[bool, str]]:
    """The namespace probes in a child; one that drops to nobody answers in plain data only
    (`ns.run_in_child_plain`: any process of nobody's could make it write anything)."""
    try:
        if not drop:
            return ns.run_in_child(_namespace_probes, base, drop=drop, extras=extras)
        got = ns.run_in_child_plain(_namespace_probes, base, drop=drop, extras=extras)
        return {str(k): _plain_result(v) for k, v in dict(got).items()}
    except Exception as exc:  # noqa: BLE001
        return {"userns": (False, f"probe child failed: {_why(exc)}")}


def _plain_result(value: object) -> tuple[bool, str]:
    """A (works, why) pair as JSON brings it back (a list); anything else is refused."""
    if isinstance(value, list) and len(value) == 2 and isinstance(value[0], bool):
        return value[0], str(value[1])
    raise ValueError(f"not a probe result: {value!r:.80}")


# --- probes run in the calling process --------------------------------------------------------
def _has_root() -> tuple[bool, str]:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            capeff = next(line.split()[1] for line in f if line.startswith("CapEff:"))
        with open("/proc/self/uid_map", encoding="ascii") as f:
            initial = f.read().split() == ["0", "0", "4294967295"]
    except (OSError, StopIteration) as exc:
        return False, f"cannot read /proc/self/status: {exc}"
    if not initial:
        return False, "running inside a user namespace (not the initial one)"
    if int(capeff, 16) >> _CAP_SYS_ADMIN & 1:
        return True, f"CAP_SYS_ADMIN in CapEff={capeff} of the initial user namespace"
    return False, f"no CAP_SYS_ADMIN in CapEff={capeff}"


def _where(base: str) -> str:
    return f"under {os.path.dirname(base)} ({mountinfo.fstype_at(base) or 'unknown fs'})"


def _chattr(base: str) -> str:
    path = os.path.join(base, "immutable")
    with open(path, "wb"):
        pass
    fsflags.set_immutable(path, True)
    try:
        if not fsflags.is_immutable(path):
            raise VeloError("FS_IOC_SETFLAGS did not stick", reason=Reason.IMMUTABLE_DENIED)
    finally:
        fsflags.set_immutable(path, False)
    return f"FS_IOC_SETFLAGS +i set and cleared {_where(base)}"


def _reflink(base: str) -> str:
    src, dst = os.path.join(base, "src"), os.path.join(base, "dst")
    with open(src, "wb") as f:
        f.write(b"x" * 4096)
    sfd = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    try:
        dfd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            _libc.ficlone(dfd, sfd)
        finally:
            os.close(dfd)
    finally:
        os.close(sfd)
    return f"FICLONE works {_where(base)}"


def _userns_unrestricted() -> tuple[bool, str]:
    # sysctl -> the value that means "unrestricted"; a missing file is no restriction.
    knobs = {
        "/proc/sys/kernel/apparmor_restrict_unprivileged_userns": "0",  # Ubuntu >= 23.10
        "/proc/sys/kernel/unprivileged_userns_clone": "1",  # Debian's older patch
        "/proc/sys/user/max_user_namespaces": None,  # 0 forbids them for everyone
    }
    for path, good in knobs.items():
        try:
            with open(path, encoding="ascii") as f:
                value = f.read().strip()
        except FileNotFoundError:
            continue
        except OSError as exc:
            return False, f"cannot read {path}: {_why(exc)}"
        if (good is not None and value != good) or (good is None and value == "0"):
            return False, f"{path} = {value}: unprivileged user namespaces are restricted"
    return True, "no AppArmor or sysctl restriction on unprivileged user namespaces"


def _open_fuse() -> str:
    try:
        fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise SysError(exc.errno or errno.EIO, f"open as uid {os.getuid()}", "/dev/fuse") from None
    os.close(fd)
    return f"/dev/fuse opens read-write as uid {os.getuid()}"


def _fuse(*, drop: bool) -> tuple[bool, str]:
    if not drop:
        return _attempt(_open_fuse)

    def as_nobody() -> tuple[bool, str]:
        ns.drop_to_user(_NOBODY, _NOBODY)
        return _attempt(_open_fuse)

    try:
        return _plain_result(ns.run_in_child_plain(as_nobody))
    except Exception as exc:  # noqa: BLE001
        return False, f"probe child failed: {_why(exc)}"


# --- public -----------------------------------------------------------------------------------
_cache: Capabilities | None = None


def _detect() -> Capabilities:
    kernel = os.uname().release
    log.debug("probing kernel %s (version logged only, never trusted)", kernel)
    results: dict[str, tuple[bool, str]] = {"root": _has_root()}
    is_root = results["root"][0]
    real_uid0 = os.getuid() == 0
    # The scratch stays root's (0711); nobody gets its own subdirectory only, and root works
    # in root-only ones nobody can rename or replace.
    with _scratch(mode=0o711 if real_uid0 else 0o700) as base:
        unpriv_base = _subdir(base, "unpriv", owner=_NOBODY if real_uid0 else None)
        # The unprivileged attempt: root becomes nobody in the child before unsharing.
        unpriv = _in_child(unpriv_base, drop=real_uid0, extras=not is_root)
        for name in ("overlay_userns", "data_only_userns"):
            unpriv.setdefault(name, (False, unpriv["userns"][1]))
        results.update(unpriv)
        if is_root:
            root_base = _subdir(base, "root")
            privileged = _in_child(root_base, drop=False, extras=True)
            ok, why = privileged.pop("userns", (False, "no answer from the probe child"))
            results["userns_root"] = (ok, why)
            for name in ("overlay_root", "data_only_root"):  # a child that failed says why
                privileged.setdefault(name, (False, why if not ok else "not probed"))
            results.update(privileged)
            native_base = _subdir(base, "native")
            try:
                results.update(ns.run_in_child(_native_probes, native_base))
            except Exception as exc:  # noqa: BLE001
                why = f"probe child failed: {_why(exc)}"
                results["overlay_native"] = results["data_only_native"] = (False, why)
        else:
            why = f"not root: {results['root'][1]}"
            for name in ("overlay_root", "data_only_root", "overlay_native", "data_only_native"):
                results[name] = (False, why)
            results["userns_root"] = (False, why)
        for name in ("lowerdir_append", "fsconfig_fd", "whiteout_mknod"):
            results.setdefault(name, (False, "no user namespace to try it in"))
    # chattr, fs-verity and reflink depend on the filesystem: try them where the temp dir is
    # (a disk filesystem, like the default store location), not on tmpfs.
    with _scratch(under=tempfile.gettempdir()) as tmp_dir:
        results["chattr"] = _attempt(lambda: _chattr(tmp_dir))
        ok, why = verity.usable_under(tmp_dir)
        results["fsverity"] = (ok, f"{why} {_where(tmp_dir)}" if ok else why)
        results["reflink"] = _attempt(lambda: _reflink(tmp_dir))
    results["userns_unrestricted"] = _userns_unrestricted()
    results["fuse"] = _fuse(drop=real_uid0)
    features = {name: Feature(*results[name]) for name in FEATURES}
    for name, feat in features.items():
        log.debug("feature %s: %s (%s)", name, "yes" if feat.ok else "no", feat.reason)
    return Capabilities(kernel=kernel, features=features)


def detect(*, refresh: bool = False) -> Capabilities:
    """Probe the host once per process (again with `refresh`)."""
    global _cache
    if _cache is None or refresh:
        _cache = _detect()
    return _cache
