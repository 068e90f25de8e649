"""The overlay a session mounts: which layers, which options (plan, then execute).

Option policy (STYLE C4): always `userxattr` — sessions mount inside a user namespace, root
included (0->0), where trusted.* xattrs are out of reach, and the layers carry `user.overlay.*`
xattrs (metacopy/redirect, opaque, whiteouts); a userns-made layer read without `userxattr` loses
its opaque markers (measured). `mount.PINNED_OPTIONS` adds index=off, metacopy=off and
redirect_dir=nofollow: copy-ups are whole files, renaming a lower directory is EXDEV (tools copy +
delete, which harvest sees as delete + create). Data-only lowers are followed regardless.

This module is the only caller of `mount.overlay`. It knows plain layer paths only (the session's
process side lives in session/overlay/pid1.py); imports only the leaves and `mount`.
"""

from __future__ import annotations

from veloverlay import mount
from veloverlay.errors import Reason, VeloError
from veloverlay.records import Record

__all__ = ["OverlaySpec"]


class OverlaySpec(Record, frozen=True):
    lowers: tuple[str, ...]  # topmost first
    data_lowers: tuple[str, ...]
    upper: str
    work: str
    target: str
    userxattr: bool = True

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

    def mount(self) -> mount.MountApi:
        """Mount on `target` (call inside the session's mount namespace)."""
        self.check()
        return mount.overlay(
            lowers=self.lowers,
            data_lowers=self.data_lowers,
            upper=self.upper,
            work=self.work,
            target=self.target,
            userxattr=self.userxattr,
        )
