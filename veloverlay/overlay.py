"""The overlay a session mounts: which layers, which options (plan, then execute).

Option policy (STYLE C4), two modes (session/select.py picks one):
* userns (root-free, and root where the root-native mount is impossible): `userxattr` — the mount
  is made inside a user namespace, where trusted.* xattrs are out of reach, and the layers carry
  `user.overlay.*` xattrs (metacopy/redirect, opaque, whiteouts); a userns-made layer read without
  `userxattr` loses its opaque markers (measured). `mount.PINNED_OPTIONS` adds index=off,
  metacopy=off and redirect_dir=nofollow: copy-ups are whole files, renaming a lower directory is
  EXDEV (tools copy + delete, which harvest sees as delete + create).
* native (real root, initial user namespace): no `userxattr`; the kernel reads and writes
  `trusted.overlay.*`, so the layers must carry that prefix (lower/layers.py writes them per
  prefix), and `mount.NATIVE_OPTIONS` turns redirect_dir on: directory renames work.
Data-only lowers are followed in both.

This module is the only caller of `mount.overlay`. It knows plain layer paths only (the session's
process side lives in session/overlay/pid1.py); imports only the leaves and `mount`.
"""

from __future__ import annotations

import errno
import os
import time

from veloverlay import mount, mountinfo
from veloverlay.errors import Reason, SysError, VeloError
from veloverlay.records import Record

__all__ = ["OverlaySpec", "seal"]

_SEAL_INTERVAL = 0.02


class OverlaySpec(Record, frozen=True):
    lowers: tuple[str, ...]  # topmost first
    data_lowers: tuple[str, ...]
    upper: str
    work: str
    target: str
    userxattr: bool = True  # False: root-native (trusted.overlay.*, redirect_dir=on)

    def describe(self) -> str:
        return (
            mount.legacy_options(
                lowers=self.lowers,
                data_lowers=self.data_lowers,
                upper=self.upper,
                work=self.work,
                userxattr=self.userxattr,
            )
            + f" on {self.target}"
        )

    def check(self) -> None:
        count = len(self.lowers) + len(self.data_lowers)
        if count > mount.OVL_MAX_STACK:
            raise VeloError(
                f"{count} layers exceed the kernel's limit of {mount.OVL_MAX_STACK}",
                reason=Reason.TOO_MANY_LAYERS,
            )

    def mount(self, target_fd: int | None = None) -> mount.MountApi:
        """Mount on `target` (call inside the session's mount namespace); with `target_fd`
        (`mount.pin_dir(target)`), on that directory whatever `target` leads to by then."""
        self.check()
        return mount.overlay(
            lowers=self.lowers,
            data_lowers=self.data_lowers,
            upper=self.upper,
            work=self.work,
            target=self.target,
            userxattr=self.userxattr,
            target_fd=target_fd,
        )


def pin_root(spec: OverlaySpec, target_fd: int) -> int:
    """An O_PATH fd on the root of the overlay just mounted over `target_fd` (`pin_dir` of
    `spec.target`), for everything done to the projection afterwards. Not by its path: the
    directory outside the session belongs to the tree's owner, who can rename it and leave a
    symlink there at any time (a remount by path would then make whatever it leads to read-only,
    for every namespace). Found beneath the pinned parent without following a symlink, and
    refused unless it is the root of an overlay mount other than the one `target_fd` is on, with
    this session's upper dir."""
    parent, name = os.path.split(spec.target)
    pfd = mount.pin_dir(parent or "/")
    try:
        fd = os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd)
    except OSError as exc:
        raise VeloError(
            f"cannot open the projection at {spec.target}: {exc.strerror}",
            reason=Reason.TARGET_INVALID,
            path=spec.target,
        ) from None
    finally:
        os.close(pfd)
    mnt = mountinfo.mnt_id_of(fd)
    entry = mountinfo.mount_entry(mnt)
    ours = (
        entry is not None
        and mnt != mountinfo.mnt_id_of(target_fd)
        and mountinfo.overlay_upper(entry) in (spec.upper, mount.escape_option_path(spec.upper))
    )
    if not ours:
        os.close(fd)
        raise VeloError(
            f"{spec.target} no longer shows the session's overlay (replaced while it was mounted)",
            reason=Reason.TARGET_INVALID,
            path=spec.target,
            hint="a directory on the way was renamed or replaced; use a path no other user can "
            "change",
        )
    return fd


def seal(target: str, wait: float) -> str | None:
    """Make the session's overlay (at `target`: "." after an fchdir to `pin_root`'s fd)
    read-only before its upper dir is harvested: a process outside the session's pid namespace
    (nsenter without --pid, an fd passed out, a /proc/PID/root path) could otherwise write on
    while the harvest reads, and what it wrote would be lost without an error. After the seal
    such writes fail with EROFS.

    A file open for writing makes the remount EBUSY: retried for up to `wait` seconds (a writer
    finishing). Returns None when sealed, else why not (the caller must not harvest while
    anything can still write: session/holders.py)."""
    deadline = time.monotonic() + wait
    while True:
        try:
            mount.remount_super(target, readonly=True)
            return None
        except SysError as exc:
            if exc.errno != errno.EBUSY:
                return str(exc)
        except OSError as exc:
            return f"statvfs {target}: {exc.strerror}"
        if time.monotonic() >= deadline:
            return "files of the projection are still open for writing"
        time.sleep(_SEAL_INTERVAL)
